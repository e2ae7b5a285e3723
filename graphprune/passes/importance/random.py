"""Random importance: a baseline, and a way to test the machinery without any signal."""

from __future__ import annotations

import numpy as np
import torch

from ...analysis.channels import Analysis


class RandomImportance:
    def __init__(self, seed: int = 0):
        self.seed = seed

    def __call__(self, an: Analysis, tensors: dict[str, torch.Tensor]) -> np.ndarray:
        return np.random.default_rng(self.seed).random(int(an.component.max()) + 1)
