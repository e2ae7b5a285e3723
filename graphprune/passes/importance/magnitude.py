"""Group magnitude: the Lp norm over every parameter slice a component owns (rows and columns alike)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ...analysis.channels import Analysis


def group_sum(an: Analysis, values: Mapping[str, torch.Tensor]) -> np.ndarray:
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
        def value(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().float()
            return t.abs() if self.p == 1 else t * t

        score = group_sum(an, _Computed(tensors, value))
        return np.sqrt(score) if self.p == 2 else score


class _Computed(Mapping):
    """tensors[name] passed through `fn` when read: group_sum reads each once, so only one tensor's |w| or w^2
    exists at a time (a dict of them all would be a float32 copy of the whole model)."""

    def __init__(self, tensors: dict[str, torch.Tensor], fn):
        self.tensors, self.fn = tensors, fn

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.fn(self.tensors[name])

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)
