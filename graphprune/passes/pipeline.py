"""The planning core shared by PyTorch models (api.py) and ONNX files (onnx.py): budget and option checks, then
one list of passes over a `Job`: score -> select -> build the plan.

A pass follows one contract, in the spirit of onnx-ir's PassBase: it names the Job fields it `requires` and
those it `ensures`, and `run` checks both around each call, so a new criterion, pass or frontend is one new file
that plugs into the same list. The frontends only record the model and fill in what is theirs (the analysis,
the tensors, kept components, lockstep groups, a scorer); everything after that is this module.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..analysis.channels import Analysis
from ..analysis.cost import CostModel
from ..errors import UsageError
from ..plan import PruningPlan, indices_by_axis
from .select import AUTO_ROUND, select

log = logging.getLogger(__name__)

ROUND_AUTO = "auto"  # multiples of 8 for layers of at least 32 channels, exact below (see select.py)
MISS = 0.01  # a plan further than this under its target says so


@dataclass
class Job:
    """Everything planning passes read and write. Frontends set the first block; passes fill the rest."""

    an: Analysis
    tensors: dict[str, Any]  # parameter / initializer name -> tensor (the importance criteria read them)
    kind: str  # "flops", "params" or "latency"
    ratio: float
    scorer: Any  # (analysis, tensors) -> one score per component
    target: dict[str, Any]  # what was asked, recorded in the plan
    round_to: int | str | None = ROUND_AUTO
    max_ratio: float = 0.9
    keep: np.ndarray | None = None  # components kept whole (ignore=, uniform's inexpressible widths)
    lockstep: list[list[int]] | None = None  # families that lose the same widths (uniform=True)
    force: np.ndarray | None = None  # components removed already (HESSO's earlier decisions), taken first
    multiple: dict[int, int] = field(default_factory=dict)  # family -> units it loses at a time (uniform)
    flops: CostModel | None = None
    params: CostModel | None = None
    latency: CostModel | None = None  # passes/latency.py's LatencyModel, for kind "latency"
    auto_round: int = AUTO_ROUND  # round_to="auto"'s multiple (a latency table's channel block)
    scores: np.ndarray | None = None
    removed: np.ndarray | None = None
    plan: PruningPlan | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def budget(self) -> CostModel:
        return {"flops": self.flops, "params": self.params, "latency": self.latency}[self.kind]


class Pass:
    """One step of planning: reads `requires`, writes `ensures` (Job field names)."""

    requires: tuple[str, ...] = ()
    ensures: tuple[str, ...] = ()

    def __call__(self, job: Job) -> None:
        raise NotImplementedError


def run(passes: list[Pass], job: Job) -> Job:
    """Run `passes` in order, checking each one's contract."""
    for p in passes:
        missing = [name for name in p.requires if getattr(job, name) is None]
        if missing:
            raise RuntimeError(f"{type(p).__name__} needs {missing}, which no earlier pass set")
        p(job)
        unset = [name for name in p.ensures if getattr(job, name) is None]
        if unset:
            raise RuntimeError(f"{type(p).__name__} did not set {unset}")
    return job


class CostModels(Pass):
    """FLOPs and parameter counts of the analysed graph (the budgets and the plan's totals)."""

    requires = ("an",)
    ensures = ("flops", "params")

    def __call__(self, job: Job) -> None:
        job.flops = job.flops or CostModel(job.an, job.an.flop_terms)
        job.params = job.params or CostModel(job.an, job.an.param_terms)


class Score(Pass):
    """One importance score per component (higher = keep), from the job's criterion."""

    requires = ("an", "tensors", "scorer")
    ensures = ("scores",)

    def __call__(self, job: Job) -> None:
        job.scores = np.asarray(job.scorer(job.an, job.tensors), dtype=np.float64)
        if job.scores.shape != (len(job.an.prunable),):
            raise UsageError(f"the importance criterion returned {job.scores.shape} scores, expected one per "
                             f"component ({len(job.an.prunable)})")


class Select(Pass):
    """The components to remove: the least important per unit of cost saved, until the budget is met."""

    requires = ("an", "scores", "flops", "params")
    ensures = ("removed",)

    def __call__(self, job: Job) -> None:
        name = {"flops": "FLOPs", "params": "parameters", "latency": "latency"}[job.kind]
        job.removed = select(job.an, job.scores, job.budget, job.ratio, max_ratio=job.max_ratio,
                             round_to=job.round_to, keep=job.keep, lockstep=job.lockstep, budget_name=name,
                             mass=weight_slices_per_component(job.an),
                             normalize=not getattr(job.scorer, "absolute", False), force=job.force,
                             multiple=job.multiple, auto_round=job.auto_round)
        achieved = job.budget.total(job.removed) / max(job.budget.total(), 1e-300)
        if job.ratio - achieved > MISS:
            note = (f"landed at {achieved:.3f} of the {name} for a target of {job.ratio:.3f}: the units left to "
                    "remove (whole groups of a grouped convolution, heads, round_to multiples) are too coarse to "
                    "land closer" + (" (round_to=None may)" if job.round_to else ""))
            log.warning(note)
            job.notes.append(note)


class Build(Pass):
    """The PruningPlan: removed and zeroed indices per tensor, totals, per-layer rows, attribute rewrites."""

    requires = ("an", "removed", "flops", "params")
    ensures = ("plan",)

    def __call__(self, job: Job) -> None:
        from ..report import family_rows, layer_rows, pinned_rows

        an, removed = job.an, job.removed
        gone = np.zeros(int(an.component.max()) + 1, dtype=bool)
        gone[removed] = True
        removed_idx, zeroed_idx = removed_and_zeroed(an, gone)
        job.plan = PruningPlan(
            removed=removed_idx, zeroed=zeroed_idx,
            fingerprint={n: list(t.shape) for n, t in job.tensors.items()},
            target=dict(job.target, kind=job.kind, ratio=job.ratio),
            flops={"before": job.flops.total(), "after": job.flops.total(removed)},
            params={"before": job.params.total(), "after": job.params.total(removed)},
            lossy=bool(an.lossy[removed].any()) if len(removed) else False,
            rewrites=_rewrites(an, gone),
            notes=list(job.notes),
        )
        if job.latency is not None:
            table = job.latency.table
            job.plan.latency = {"runtime": table.runtime, "threads": table.threads, "block": table.block,
                                "before": job.latency.total(), "after": job.latency.total(removed)}
        job.plan._analysis, job.plan._gone = an, gone  # in memory only, for the regenerated-graph fallback
        readers: dict[str, str] = {}
        for node in an.graph.nodes:
            for v in node.tensor_inputs():
                if v.name is not None:
                    readers.setdefault(v.name, node.scope or node.op)
        job.plan.layers = layer_rows(job.flops, job.params, removed, readers)
        job.plan.groups = family_rows(an, gone)
        job.plan.pinned = pinned_rows(an)


PLAN = [CostModels(), Score(), Select(), Build()]


def parse_budget(target_flops: Any, target_params: Any, target_latency: Any = None) -> tuple[str, float]:
    """("flops" | "params" | "latency", ratio) from the budget arguments, exactly one of which is given."""
    given = [(k, r) for k, r in (("flops", target_flops), ("params", target_params), ("latency", target_latency))
             if r is not None]
    if len(given) != 1:
        raise UsageError("give exactly one budget: target_flops=R, target_params=R or target_latency=R, with R in "
                         "(0, 1] the fraction of the original cost (measured latency) to keep")
    kind, ratio = given[0]
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio <= 1:
        raise UsageError(f"target_{kind} must be a number in (0, 1] (the fraction of {kind} to keep), got "
                         f"{ratio!r}")
    return kind, float(ratio)


def check_options(round_to: Any, max_ratio: Any) -> int | str | None:
    """The round_to to use (None for exact widths); bad values raise UsageError."""
    if isinstance(max_ratio, bool) or not isinstance(max_ratio, numbers.Real) or not 0 < max_ratio <= 1:
        raise UsageError(f"max_ratio must be in (0, 1], got {max_ratio!r}")
    if round_to == ROUND_AUTO or round_to is None:
        return round_to
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise UsageError(f"round_to must be a positive integer, None (exact widths) or 'auto' (multiples of 8 for "
                         f"layers of 32 channels or more), got {round_to!r}")
    return None if round_to == 1 else round_to


def weight_slices_per_component(an: Analysis) -> np.ndarray:
    """How much of the network one component is: the rows and columns it owns across weight matrices. An
    MLP channel is 3 (up, gate, down), a conv channel 2, a residual-stream channel every matrix it crosses,
    a whole attention head head_dim rows of q, k, v and columns of o. Spatial size does not count."""
    mass = np.zeros(len(an.prunable))
    for v in an.graph.params.values():
        if v.ndim >= 2:
            for axis in range(v.ndim):
                mass += np.bincount(an.component[an.elements(v, axis)], minlength=len(mass))
    return np.maximum(mass, 1)


def removed_and_zeroed(an: Analysis, gone: np.ndarray) -> tuple[dict, dict]:
    """Per parameter name and axis: the indices removed, and those mask() zeroes (the producer rows)."""
    removed_idx: dict[str, dict[int, list[int]]] = {}
    zeroed_idx: dict[str, dict[int, list[int]]] = {}
    for name, v in an.graph.params.items():
        rem, zer = {}, {}
        for axis in range(v.ndim):
            ids = an.elements(v, axis)
            hit = gone[an.component[ids]]
            rem[axis] = hit
            zer[axis] = hit & an.zeroed[ids]
        if any(m.any() for m in rem.values()):
            removed_idx[name] = indices_by_axis(rem)
            z = indices_by_axis(zer)
            if z:
                zeroed_idx[name] = z
    return removed_idx, zeroed_idx


def gone_from_removed(an: Analysis, removed: dict[str, dict[int, list[int]]]) -> np.ndarray:
    """The removed components of `an`, from a plan's removed indices by tensor name (names `an` lacks skipped)."""
    gone = np.zeros(int(an.component.max()) + 1, dtype=bool)
    for name, axes in removed.items():
        v = an.graph.params.get(name)
        if v is not None:
            for axis, idx in axes.items():
                gone[an.component[an.elements(v, int(axis))[idx]]] = True
    return gone


def _rewrites(an: Analysis, gone: np.ndarray) -> list[dict[str, Any]]:
    """Width-holding module attributes the backend must update, one entry per module, kind and width."""
    out: list[dict[str, Any]] = []
    for r in an.records:
        lo = an.space_offset[r.space]
        before = int(an.space_size[r.space])
        after = before - int(gone[an.component[lo:lo + before]].sum())
        entry = {"kind": r.kind, "module": r.module, "before": before, "after": after, "head_dim": r.head_dim}
        if r.offset:  # an RMS norm that scales by (offset + weight), such as Gemma's (1 + w)
            entry["offset"] = r.offset
        if after != before and entry not in out:
            out.append(entry)
    return out
