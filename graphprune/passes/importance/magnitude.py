"""Group magnitude: the Lp norm over every parameter slice a component owns (rows and columns alike)."""

from __future__ import annotations

import numpy as np
import torch

from ...analysis.channels import Analysis


class MagnitudeImportance:
    def __init__(self, p: int = 2):
        self.p = p

    def __call__(self, an: Analysis, tensors: dict[str, torch.Tensor]) -> np.ndarray:
        n_comp = int(an.component.max()) + 1
        comp_parts, value_parts = [], []
        for name, v in an.graph.params.items():
            if v.kind != "param" or name not in tensors or v.ndim == 0:
                continue
            t = tensors[name].detach().float()
            t = t.abs() if self.p == 1 else t * t
            for axis in range(v.ndim):
                ids = an.elements(v, axis)
                comps = an.component[ids]
                if not an.prunable[comps].any():
                    continue
                other = [a for a in range(v.ndim) if a != axis]
                comp_parts.append(comps)
                value_parts.append((t.sum(dim=other) if other else t).numpy().astype(np.float64))
        if not comp_parts:
            return np.zeros(n_comp)
        score = np.bincount(np.concatenate(comp_parts), weights=np.concatenate(value_parts), minlength=n_comp)
        return np.sqrt(score) if self.p == 2 else score
