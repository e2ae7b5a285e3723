"""compensate="obs": which of a layer's components go, chosen one at a time by structured Optimal Brain Surgeon
(ZipLM's greedy order), before least squares rewrites the layer.

The selection decides how many components each family loses; ranked one-shot, each component's score is the
error its removal alone leaves, so two channels that carry the same signal both look cheap and both go. Here, for
each family read by one layer that gathered X^T X, the same number are removed one at a time: the next is the
one whose removal, with the layer's weights already updated for those gone, adds the least output error
(w_B (Theta_BB)^-1 w_B^T for its columns B, Theta = (covariance + ridge)^-1), then W and Theta are updated as
OBS does. The counts, and so the cost, stay the selection's; the compensation after it is the usual least
squares of the final set (the joint OBS update).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from .calibration import Reader, _ridge_precision, _weight_columns, _writable, whole_family_readers
from .pipeline import Pass

log = logging.getLogger(__name__)


class Reselect(Pass):
    """Within each family whose components one X^T X-gathering reader reads (an MLP's channels, a layer's
    heads), the selection's count of components, re-chosen greedily by structured OBS."""

    requires = ("an", "tensors", "removed")
    ensures = ("removed",)

    def __init__(self, readers: list[Reader]):
        self.readers = readers

    def __call__(self, job) -> None:
        started = time.perf_counter()
        gone = np.zeros(len(job.an.prunable), dtype=bool)
        gone[job.removed] = True
        changed = families = 0
        for r, comps in whole_family_readers(job.an, self.readers):
            k = int(gone[comps].sum())
            if r.gram is None or k == 0 or k == len(comps) or (job.keep is not None and job.keep[comps].any()):
                continue
            chosen = greedy_order(job.tensors, r, comps, k)
            changed += int((~gone[chosen]).sum())
            families += 1
            gone[comps] = False
            gone[chosen] = True
        job.removed = np.nonzero(gone)[0]
        job.notes.append(f"compensate='obs': {families} families' removed components re-chosen greedily by "
                         f"structured OBS ({changed} differ from the selection's; "
                         f"{time.perf_counter() - started:.0f} s)")


def greedy_order(tensors: dict[str, torch.Tensor], r: Reader, comps: np.ndarray, k: int) -> np.ndarray:
    """The first `k` of `comps` (the components reader `r` alone reads) in the order structured OBS removes them
    (a prefix of any longer order: the greedy choice does not look ahead)."""
    theta, _ = _ridge_precision(r)
    w = _writable(_weight_columns(tensors, r), tensors[r.weight])
    return comps[greedy_obs(theta, w, [r.columns == c for c in comps], k)]


def greedy_obs(theta: torch.Tensor, w: torch.Tensor, masks: list[np.ndarray], k: int) -> list[int]:
    """Indices into `masks` (each a component's input columns) of `k` components removed one at a time, each the
    one adding the least output error given the ones before (theta: the inputs' regularized precision, w: the
    weight as [out, in]; both float64, overwritten)."""
    blocks = [torch.from_numpy(np.nonzero(m)[0]) for m in masks]
    single = all(len(b) == 1 for b in blocks)
    cols = torch.cat(blocks) if single else None
    alive = np.ones(len(blocks), dtype=bool)
    out: list[int] = []
    for _ in range(k):
        if single:  # one column each: every error at once
            err = w[:, cols].square().sum(0) / theta.diagonal()[cols]
        else:
            err = torch.tensor([float(((w[:, b] @ torch.linalg.inv(theta[b][:, b])) * w[:, b]).sum())
                                if alive[i] else 0.0 for i, b in enumerate(blocks)], dtype=torch.float64)
        err[torch.from_numpy(~alive)] = float("inf")
        j = int(err.argmin())
        b = blocks[j]
        inv = torch.linalg.inv(theta[b][:, b])
        w -= (w[:, b] @ inv) @ theta[b]  # the OBS update: the removed columns become zero
        theta -= theta[:, b] @ inv @ theta[b]  # the precision of the inputs left
        alive[j] = False
        out.append(j)
    return out
