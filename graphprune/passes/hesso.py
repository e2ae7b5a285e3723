"""HESSO's saliency and schedule (Only-Train-Once's training-aware pruning) on graphprune's units.

A unit (a channel, a head, a KV group: one prunable component of the analysis) owns slices of several
parameters: producer rows, the batch norm that rides on them, and the readers' input columns. HESSO scores
a unit from those slices x and the base optimizer's update d over them, with five terms, each normalized by
its largest value so that they mix:

    magnitude      ||x||                   avg_magnitude  ||x|| / size
    cosine         cos(x, d) + 1           (small when the optimizer is shrinking the unit)
    taylor_first   |<x, d>|                taylor_second  <x, d>^2 / 2

Scores are averaged over every step since the previous decision (not read off one minibatch), and the units
to remove are chosen by graphprune's budgeted selection, so a budget is a cost, not a group count.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from ..analysis.channels import Analysis
from ..errors import UsageError

TERMS = ("magnitude", "avg_magnitude", "cosine", "taylor_first", "taylor_second")
NEEDS_UPDATE = ("cosine", "taylor_first", "taylor_second")  # terms that read the optimizer's update d
NAMED = {
    "hesso": dict.fromkeys(TERMS, 0.2),
    "l2": {"magnitude": 1.0},
    "taylor": {"taylor_first": 1.0},
}


def term_weights(importance) -> dict[str, float] | None:
    """The term weights for `importance` (a name or a {term: weight} dict); None for a callable."""
    if callable(importance):
        return None
    if isinstance(importance, str):
        if importance not in NAMED:
            raise UsageError(f"unknown HESSO importance {importance!r}; choose one of {sorted(NAMED)}, a dict of "
                             f"weights over {list(TERMS)}, or a callable (analysis, tensors) -> scores")
        return dict(NAMED[importance])
    if isinstance(importance, dict):
        bad = [k for k in importance if k not in TERMS]
        if bad or any(not isinstance(w, numbers.Real) or w < 0 for w in importance.values()) or not any(
                importance.values()):
            raise UsageError(f"importance weights must map terms of {list(TERMS)} to non-negative numbers, not all "
                             f"zero, got "
                             f"{importance!r}")
        return {k: float(w) for k, w in importance.items() if w > 0}
    raise UsageError(f"importance must be a name, a dict of term weights or a callable, got {type(importance).__name__}")


class Slices:
    """Where each unit lives: per parameter, the axes that hold prunable units and the unit of each index."""

    def __init__(self, an: Analysis, params: dict[str, torch.Tensor]):
        self.n = int(an.component.max()) + 1
        self.axes: dict[str, list[tuple[int, np.ndarray]]] = {}
        for name in params:
            v = an.graph.params.get(name)
            if v is None or v.kind != "param":
                continue
            found = []
            for axis in range(v.ndim):
                comps = an.component[an.elements(v, axis)]
                if an.prunable[comps].any():
                    found.append((axis, comps))
            if found:
                self.axes[name] = found
        self._index = {name: [(a, torch.from_numpy(c).to(params[name].device)) for a, c in axes]
                       for name, axes in self.axes.items()}
        self.size = self.sums({n: torch.ones_like(params[n], dtype=torch.float64) for n in self.axes})

    def sums(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per unit, the sum of `values[name]` (shaped like the parameter) over every slice the unit owns."""
        out = None
        for name, axes in self._index.items():
            t = values[name]
            for axis, comps in axes:
                other = [a for a in range(t.ndim) if a != axis]
                s = (t.sum(dim=other) if other else t).double()
                if out is None:
                    out = torch.zeros(self.n, dtype=torch.float64, device=s.device)
                out.index_add_(0, comps, s)
        return (out if out is not None else torch.zeros(self.n, dtype=torch.float64)).cpu()

    def masks(self, units: np.ndarray, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per parameter holding any of `units` (a bool per unit), a bool tensor of the elements they own."""
        out = {}
        for name, axes in self.axes.items():
            t = like[name]
            mask = None
            for axis, comps in axes:
                hit = units[comps]
                if hit.any():
                    shape = [1] * t.ndim
                    shape[axis] = len(hit)
                    m = torch.from_numpy(hit).to(t.device).view(shape)
                    mask = m if mask is None else mask | m
            if mask is not None:
                out[name] = mask.expand(t.shape).contiguous()
        return out


class Saliency:
    """HESSO's five terms per unit, summed over steps; `scores` averages and mixes them."""

    def __init__(self, slices: Slices):
        self.slices = slices
        self.reset()

    def reset(self) -> None:
        self.sums = {t: torch.zeros(self.slices.n, dtype=torch.float64) for t in TERMS}
        self.count = 0

    def add(self, x: dict[str, torch.Tensor], d: dict[str, torch.Tensor] | None) -> None:
        """One step: x the parameters before the update, d the update (None: magnitude terms only)."""
        norm_x = self.slices.sums({n: t.float() * t.float() for n, t in x.items()}).sqrt()
        self.sums["magnitude"] += norm_x
        self.sums["avg_magnitude"] += norm_x / self.slices.size.clamp_min(1)
        if d is not None:
            xd = self.slices.sums({n: x[n].float() * d[n].float() for n in x})
            norm_d = self.slices.sums({n: t.float() * t.float() for n, t in d.items()}).sqrt()
            denom = norm_x * norm_d
            self.sums["cosine"] += torch.where(denom > 0, xd / denom.clamp_min(1e-300), torch.zeros_like(xd)) + 1
            self.sums["taylor_first"] += xd.abs()
            self.sums["taylor_second"] += xd * xd / 2
        self.count += 1

    def scores(self, weights: dict[str, float], candidates: np.ndarray) -> np.ndarray:
        """The weighted mix of each term's mean over the steps, each normalized by its largest candidate value."""
        total = np.zeros(self.slices.n)
        for term, w in weights.items():
            mean = self.sums[term].numpy() / max(self.count, 1)
            top = mean[candidates].max() if candidates.any() else 0.0
            if top > 0:
                total += w * mean / top
        return total

    def state(self) -> dict:
        return {"sums": {t: s.clone() for t, s in self.sums.items()}, "count": self.count}

    def load(self, state: dict) -> None:
        self.sums = {t: state["sums"][t].clone().double() for t in TERMS}
        self.count = int(state["count"])


@dataclass(frozen=True)
class Schedule:
    """Warm-up until `start`, then `periods` pruning periods over `steps` steps. Decision k (0-based) is taken
    after step decision(k) and its units reach zero at step decision(k + 1); steps count from 1."""

    start: int
    steps: int
    periods: int

    def __post_init__(self):
        for name in ("start", "steps", "periods"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise UsageError(f"{'start_step' if name == 'start' else 'pruning_' + name} must be a non-negative "
                                 f"integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.periods < 1 or self.steps < self.periods:
            raise UsageError(f"pruning_periods must be at least 1 and at most pruning_steps (each period needs a "
                             f"step to ramp in), got {self.periods} periods over {self.steps} steps")

    def decision(self, k: int) -> int:
        return self.start + (k * self.steps) // self.periods

    @property
    def end(self) -> int:
        return self.start + self.steps

    def ratio(self, k: int, target: float) -> float:
        """The cost to keep after decision k: the target reached in equal steps of cost."""
        return 1.0 - (1.0 - target) * (k + 1) / self.periods

    def scoring(self, step: int) -> bool:
        """Whether the step numbered `step` (from 1) feeds a later decision: the period before each one."""
        first = max(self.decision(0) - max(self.decision(1) - self.decision(0), 1), 0)
        return first < step <= self.decision(self.periods - 1)
