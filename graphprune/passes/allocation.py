"""allocation="search" and allocation="flap": how many channels each layer loses, decided per family (an MLP's
channels, a layer's heads) instead of by per-channel scores compared raw across layers.

allocation="flap" is FLAP's adaptive structure (An et al. 2024, its "AL-AM"): the fluctuation metric of every
input column of a layer's reader (input variance x squared weight column: o_proj for heads, down_proj for MLP
channels) is standardized over that reader's columns, a head takes the mean over its columns, and one global
threshold over all of them removes components, each priced at what it saves, until the budget is met. It sets
only how many components each family loses; which ones is the importance criterion's choice.

Per-channel errors are measured in each layer's own output; what a layer's error costs at the model's output
differs from layer to layer (an LLM's first MLP is many times more sensitive than its middle ones), so a single
threshold over them thins the wrong layers. Here every family whose channels have one compensable reader (an
MLP's hidden channels, a layer's attention heads or KV groups) is cut alone to a few candidate widths, the least
important components first and the reader compensated as the plan will be; the model runs on the held-out
calibration batches (from the first block the cut reaches, the blocks before it replaying their dense outputs)
and the distance of its outputs to the dense model's is recorded (the KL divergence of the
next-token distributions for a model that returns logits, else the relative squared error). Each family's curve
of distance against components removed is made convex, and the budget is spent greedily where a unit of cost
adds the least distance (optimal for convex curves under the assumption that the distances add up). Families
not measured (the residual stream, channels read by several layers) are kept whole. With compensate="obs" a
candidate width loses the components structured OBS's greedy order removes first (what Reselect will choose).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..errors import GraphPruneError, UsageError
from ..ir.from_torch import eval_mode, normalize_inputs
from .calibration import HOLDOUT, Cut, Reader, _column_sums, _readers_per_component, compensate, whole_family_readers
from .pipeline import Pass
from .propagate import find_stack
from .reselect import greedy_order
from .select import auto_multiple

log = logging.getLogger(__name__)

# candidates: fractions removed from a wide family (1/16 steps up to 3/8, where 20% plans land: 17.32 against
# 17.40 for SmolLM2 at 20% with the 1/8 steps alone; see benchmarks/results_llm_obs_search.md)
FRACTIONS = (0.0625, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.5, 0.625, 0.75)
NARROW = 8  # families of at most this many components (heads) try every count
# held-out batches the candidates run on (SmolLM2 at 20%, 16 against 8: 17.24 against 17.28, twice the search's
# time; see benchmarks/results_llm_obs_search.md)
MAX_BATCHES = 16
KEEP, TAKE = 1e12, 1e-6  # forced scores: what the selection keeps, and the scale of what it removes


class Allocate(Pass):
    """Replace the scores so the selection removes, in each family, the number of components the allocation
    chose (its least important ones), and nothing elsewhere. how="search" measures each family's curve of output
    distance against components removed; how="flap" reads it from FLAP's standardized metric."""

    requires = ("an", "tensors", "scores", "flops", "params")
    ensures = ("scores",)

    def __init__(self, model: nn.Module, readers: list[Reader], calibration: list, method: str | bool,
                 how: str = "search", standardized: Any = None, greedy: bool = False):
        self.model, self.readers, self.method, self.how, self.greedy = model, readers, method or None, how, greedy
        if how == "flap":  # (analysis, tensors) -> FLAP's metric per component (prune-hf reads it from its table)
            self.standardized = standardized or (lambda an, tensors: standardized_fluctuation(an, readers, tensors))
            return
        self.batches = [b for i, b in enumerate(calibration) if i % HOLDOUT == HOLDOUT - 1][:MAX_BATCHES]
        if not self.batches:
            raise UsageError(f"allocation='search' measures candidates on held-out calibration batches (every "
                             f"{HOLDOUT}th): pass at least {HOLDOUT} batches")

    def __call__(self, job) -> None:
        started = time.perf_counter()
        an, cost = job.an, job.budget
        # flap: the families its metric covers (a reader alone reads each whole), whatever their statistics
        families = searchable(an, self.readers if self.how == "search" else None, job.scores, job.keep)
        if not families:
            raise GraphPruneError(f"allocation={self.how!r} found no family with one reader to allocate over (MLP "
                                  "channels, attention heads); use the default allocation")
        replay = None
        if self.how == "search":
            searched = np.zeros(len(an.prunable), dtype=bool)
            searched[np.concatenate(list(families.values()))] = True
            replay = _Replay.record(self.model, sorted({r.module for r in self.readers if searched[r.columns].any()}),
                                    self.batches)
        z = self.standardized(an, job.tensors) if self.how == "flap" else None
        base = cost.total()
        curves, saving, unit = {}, {}, {}
        greedy = _reader_of_family(an, self.readers) if self.greedy else {}
        for f, order in families.items():
            n = len(order)
            unit[f] = (auto_multiple(n, job.auto_round) if job.round_to == "auto" else job.round_to) or 1
            limit = min(n - 1, int(np.floor(job.max_ratio * n + 1e-9)))
            saving[f] = base - cost.total(order[:1])  # every component of an internal family saves the same
            if self.how == "flap":
                if np.isfinite(z[order]).all():  # a unit's step: its mean metric per cost saved
                    curves[f] = np.concatenate([[0.0], np.cumsum(np.sort(z[order])[:limit] * saving[f])])
                continue
            counts = sorted({r for r in (range(1, n) if n <= NARROW else (round(n * c / unit[f]) * unit[f]
                                                                          for c in FRACTIONS)) if 0 < r <= limit})
            if not counts:
                continue
            if f in greedy:  # compensate="obs": candidates lose what Reselect will remove at their widths
                first = greedy_order(job.tensors, *greedy[f], max(counts))
                order = families[f] = np.concatenate([first, order[~np.isin(order, first)]])
            distances = [self._distance(an, order[:r], replay) for r in counts]
            curves[f] = _convex([0] + counts, [0.0] + distances)
            log.info("allocation search: %d of %d families measured (%.0f s)", len(curves), len(families),
                     time.perf_counter() - started)
        removed = _spend(curves, saving, unit, base - job.ratio * base)
        scores = np.full(len(an.prunable), KEEP)
        for f, r in removed.items():
            scores[families[f][:r]] = TAKE * np.arange(1, r + 1) / max(r, 1)
        job.scores = scores
        widths = [len(families[f]) - removed.get(f, 0) for f in sorted(curves)]
        how = (f"{len(curves)} families measured at {sum(len(c) for c in curves.values())} widths on "
               f"{len(self.batches)} held-out calibration batches" if self.how == "search"
               else f"{len(curves)} families' fluctuation standardized per layer, one threshold")
        job.notes.append(f"allocation {self.how}: {how} in {time.perf_counter() - started:.0f} s; widths kept "
                         f"{min(widths)}..{max(widths)} (families in model order: {', '.join(map(str, widths))})")

    def _distance(self, an, gone_ids: np.ndarray, replay: _Replay) -> float:
        """The output distance to the dense model with `gone_ids` removed (their readers' input columns zeroed and
        the readers compensated), the model restored afterwards."""
        gone = np.zeros(len(an.prunable), dtype=bool)
        gone[gone_ids] = True
        with _cut(self.model, self.readers, an, gone, self.method):
            got = replay.run([r.module for r in self.readers if gone[r.columns].any()])
        dense = replay.dense
        if dense[0].ndim > 1:  # log-probabilities: KL(dense || cut), mean over positions
            return float(np.mean([(d.exp() * (d - g)).sum(-1).mean() for d, g in zip(dense, got)]))
        return float(sum((g - d).square().sum() for d, g in zip(dense, got)) / sum(d.square().sum() for d in dense))


def _reader_of_family(an, readers: list[Reader]) -> dict[int, tuple[Reader, np.ndarray]]:
    """family -> (the reader that alone reads it and gathered X^T X, its components)."""
    family_of = {int(c): f for f, fam in enumerate(an.families) for c in fam}
    return {family_of[int(comps[0])]: (r, comps) for r, comps in whole_family_readers(an, readers)
            if r.gram is not None}


def _run(model: nn.Module, batch: Any) -> torch.Tensor:
    """The model's output on one batch: log-probabilities where it returns logits, else its tensors flattened."""
    args, kwargs = normalize_inputs(batch)
    with eval_mode(model), torch.no_grad():
        out = model(*args, **kwargs)
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return torch.log_softmax(logits.float(), -1)
    return torch.cat([t.float().reshape(-1) for t in tree_flatten(out)[0]
                      if isinstance(t, torch.Tensor) and t.is_floating_point()])


class _Replay:
    """The held-out batches' dense outputs and, where every searched family's reader sits in one stack of blocks
    (an LLM's decoder layers), each block's dense output: a candidate's run then replays the blocks before the
    first one it cuts instead of computing them (they see nothing of the cut): about half the forward work. (On
    SmolLM2 the search's time barely moved: each MLP candidate's compensation, its held-out ridge choice with an
    eigendecomposition of the kept inputs' covariance, takes about as long as its runs.)"""

    def __init__(self, model: nn.Module, batches: list, blocks: nn.ModuleList | None, owner: dict[str, int]):
        self.model, self.batches, self.blocks, self.owner = model, batches, blocks, owner
        self.dense: list[torch.Tensor] = []
        self.outputs: list[list[Any]] = []  # per batch, per block

    @classmethod
    def record(cls, model: nn.Module, names: list[str], batches: list) -> _Replay:
        """One dense pass per batch (`names`: the modules candidates cut)."""
        found = find_stack(model, names)
        replay = cls(model, batches, *(found[1:] if found else (None, {})))
        blocks = list(replay.blocks or [])
        for batch in batches:
            outputs: list[Any] = []
            hooks = [b.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for b in blocks]
            try:
                replay.dense.append(_run(model, batch))
            finally:
                for h in hooks:
                    h.remove()
            if len(outputs) != len(blocks):  # a block ran twice or not at all: compute every candidate whole
                replay.blocks, replay.owner = None, {}
            replay.outputs.append(outputs)
        return replay

    def run(self, cut: list[str]) -> list[torch.Tensor]:
        """The model's outputs on the batches, the blocks before the first holding a module in `cut` replayed."""
        first = min((self.owner.get(n, 0) for n in cut), default=0) if self.blocks is not None else 0
        got = []
        for outputs, batch in zip(self.outputs, self.batches):
            own = [self.blocks[j].__dict__.get("forward") for j in range(first)]  # a wrapper set on the instance
            for j in range(first):
                self.blocks[j].forward = lambda *_a, _out=outputs[j], **_k: _out
            try:
                got.append(_run(self.model, batch))
            finally:
                for j, forward in enumerate(own):
                    if forward is None:
                        del self.blocks[j].forward
                    else:
                        self.blocks[j].forward = forward
        return got


def searchable(an, readers: list[Reader] | None, scores: np.ndarray, keep: np.ndarray | None
               ) -> dict[int, np.ndarray]:
    """Families whose components each have one reader that gathered X^T X (zeroing its input columns is removing
    them, and compensation applies; readers=None: no such condition), none kept whole and all scored: family ->
    components, least important first."""
    single = np.ones(len(an.prunable), dtype=bool)
    if readers is not None:
        single = _readers_per_component(readers, len(an.prunable)) == 1
        has_gram = np.zeros(len(an.prunable), dtype=bool)
        for r in readers:
            if r.gram is not None or r.kk is not None:
                has_gram[r.columns] = True
        single &= has_gram
    out = {}
    for f, fam in enumerate(an.families):
        fam = np.asarray(fam)
        if (len(fam) < 2 or not an.prunable[fam].all() or not single[fam].all()
                or (keep is not None and keep[fam].any()) or not np.isfinite(scores[fam]).all()):
            continue
        out[f] = fam[np.argsort(scores[fam], kind="stable")]
    return out


@contextlib.contextmanager
def _cut(model: nn.Module, readers: list[Reader], an, gone: np.ndarray, method: str | None):
    """Context: the readers of removed components get their compensated weights with those input columns zeroed."""
    touched = [r for r in readers if gone[r.columns].any()]
    tensors = {r.weight: model.get_submodule(r.module).weight for r in touched}
    for r in touched:
        bias = model.get_submodule(r.module).bias
        if bias is not None:
            tensors[r.bias_name] = bias
    updates = compensate(touched, an, gone, tensors, method)[0] if method else {}
    with Cut(model) as cut:
        for r in touched:
            cut(r, gone, updates)
        yield


def standardized_fluctuation(an, readers: list[Reader], tensors: dict[str, torch.Tensor]) -> np.ndarray:
    """FLAP's structure metric per component (NaN where no reader alone reads its whole family): each input column's
    fluctuation (input variance x squared weight column) as a z-score over its reader's columns, averaged over the
    component's columns."""
    out = np.full(len(an.prunable), np.nan)
    for r, comps in whole_family_readers(an, readers):
        metric = (r.var * _column_sums(tensors[r.weight], r.in_axis, square=True)).numpy()
        spread = metric.std()
        z = (metric - metric.mean()) / spread if spread > 0 else np.zeros_like(metric)
        out[comps] = np.bincount(r.columns, weights=z, minlength=len(out))[comps] / np.bincount(
            r.columns, minlength=len(out))[comps]
    return out


def _convex(counts: list[int], distances: list[float]) -> np.ndarray:
    """The lower convex hull of (components removed, distance), read at every count from 0 to the largest."""
    hull: list[tuple[int, float]] = []
    for p in zip(counts, np.maximum.accumulate(np.maximum(distances, 0.0))):
        while len(hull) >= 2 and ((hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])
                                  >= (p[1] - hull[-2][1]) * (hull[-1][0] - hull[-2][0])):
            hull.pop()
        hull.append(p)
    xs, ys = zip(*hull)
    return np.interp(np.arange(xs[-1] + 1), xs, ys)


def _spend(curves: dict[int, np.ndarray], saving: dict[int, float], unit: dict[int, int], need: float
           ) -> dict[int, int]:
    """Components to remove per family: units taken where the least distance is added per cost saved, until the
    savings reach `need` (convex curves: each family's next unit costs at least its last)."""
    removed = {f: 0 for f in curves}
    heap: list[tuple[float, int]] = []

    def push(f: int) -> None:
        r, step = removed[f], unit[f]
        if r + step < len(curves[f]):
            heapq.heappush(heap, ((curves[f][r + step] - curves[f][r]) / max(step * saving[f], 1e-300), f))

    for f in curves:
        push(f)
    got = 0.0
    while got < need and heap:
        _, f = heapq.heappop(heap)
        removed[f] += unit[f]
        got += unit[f] * saving[f]
        push(f)
    return removed
