"""Importance criteria. Each maps (analysis, named tensors) -> one score per component (higher = keep).

A criterion is any callable with that signature; `get_importance` resolves the built-in names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from ...analysis.channels import Analysis
from .magnitude import MagnitudeImportance
from .random import RandomImportance


class Importance(Protocol):
    def __call__(self, an: Analysis, tensors: dict[str, torch.Tensor]) -> np.ndarray: ...


BUILTIN: dict[str, Callable[[], Importance]] = {
    "l2": lambda: MagnitudeImportance(p=2),
    "l1": lambda: MagnitudeImportance(p=1),
    "random": lambda: RandomImportance(seed=0),
}


def get_importance(spec) -> Importance:
    if isinstance(spec, str):
        if spec not in BUILTIN:
            raise ValueError(f"unknown importance '{spec}'; choose one of {sorted(BUILTIN)} or pass a callable "
                             "(analysis, tensors) -> per-component scores")
        return BUILTIN[spec]()
    if callable(spec):
        return spec
    raise ValueError(f"importance must be a name or a callable, got {type(spec).__name__}")


__all__ = ["Importance", "MagnitudeImportance", "RandomImportance", "get_importance"]
