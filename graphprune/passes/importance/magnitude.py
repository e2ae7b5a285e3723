"""Group magnitude: the Lp norm over every parameter slice a component owns (rows and columns alike)."""

from __future__ import annotations

import numpy as np
import torch

from ...analysis.channels import Analysis


def group_sum(an: Analysis, values: dict[str, torch.Tensor]) -> np.ndarray:
    """Per component, the sum of `values[name]` (a non-negative tensor shaped like parameter `name`) over
    every slice of every parameter the component owns."""
    n_comp = int(an.component.max()) + 1
    comp_parts, value_parts = [], []
    for name, v in an.graph.params.items():
        if v.kind != "param" or name not in values or v.ndim == 0:
            continue
        t = values[name]
        for axis in range(v.ndim):
            comps = an.component[an.elements(v, axis)]
            if not an.prunable[comps].any():
                continue
            other = [a for a in range(v.ndim) if a != axis]
            comp_parts.append(comps)
            value_parts.append((t.sum(dim=other) if other else t).double().numpy())
    if not comp_parts:
        return np.zeros(n_comp)
    return np.bincount(np.concatenate(comp_parts), weights=np.concatenate(value_parts), minlength=n_comp)


class MagnitudeImportance:
    def __init__(self, p: int = 2):
        self.p = p

    def __call__(self, an: Analysis, tensors: dict[str, torch.Tensor]) -> np.ndarray:
        values = {}
        for name, t in tensors.items():
            t = t.detach().float()
            values[name] = t.abs() if self.p == 1 else t * t
        score = group_sum(an, values)
        return np.sqrt(score) if self.p == 2 else score
