"""First-order Taylor: removing a weight w changes the loss by about w * dL/dw, so a component's score is
sum |w * g| over every parameter slice it owns, with g the gradient of the user's loss summed over the
calibration batches. The scores are in loss units, so they compare across layers as they are."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from ...analysis.channels import Analysis
from ...errors import GraphPruneError
from ...ir.from_torch import eval_mode
from .magnitude import group_sum

log = logging.getLogger(__name__)


class TaylorImportance:
    absolute = True

    def __init__(self, model: torch.nn.Module, batches: Iterable[Any],
                 loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor]):
        self.model, self.batches, self.loss_fn = model, batches, loss_fn

    def __call__(self, an: Analysis, tensors: dict[str, torch.Tensor]) -> np.ndarray:
        params = {n: t for n, t in tensors.items() if isinstance(t, torch.nn.Parameter) and t.requires_grad}
        saved = {n: t.grad for n, t in params.items()}  # the user's gradients come back untouched
        grads = {n: torch.zeros_like(t) for n, t in params.items()}
        count = 0
        try:
            with eval_mode(self.model), torch.enable_grad():
                for batch in self.batches:
                    for t in params.values():
                        t.grad = None
                    loss = self.loss_fn(self.model, batch)
                    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                        raise GraphPruneError("loss_fn(model, batch) must return a scalar tensor")
                    loss.backward()
                    for n, t in params.items():
                        if t.grad is not None:
                            grads[n] += t.grad
                    count += 1
                    log.info("taylor: batch %d, loss %.4f", count, float(loss.detach()))
        finally:
            for n, t in params.items():
                t.grad = saved[n]
        if count == 0:
            raise GraphPruneError("calibration is empty: pass at least one batch")
        return group_sum(an, {n: (t.detach() * grads[n]).abs() for n, t in params.items()})
