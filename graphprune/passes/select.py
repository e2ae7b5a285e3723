"""Global selection under a budget: remove the components with the least importance per unit of cost
saved until the cost (FLOPs or parameters) reaches the target.

Importance is normalized by its family's mean (one layer's channels), so layers compare, then scaled by
how much of the network one unit of the family is (`mass`: weight rows and columns it owns), so a whole
attention head or a residual-stream channel is not priced like one MLP channel. A layer gets
more precious as it thins: the j-th of n channels taken from a family counts n / (n - j) times its own
importance. Without that, the layer whose channels each save the most FLOPs would be stripped to
max_ratio before any other is touched, since trained magnitudes within a layer differ by only ~20%.

Within a family candidates are taken least-important first, in units that keep its width a multiple of
`round_to` when set (round_to channels, fewer heads when a head is several channels wide; "auto" rounds
families of at least 32 channels to multiples of 8 (causal LMs: 256 channels to multiples of 64) and leaves
narrower ones exact, or keeps every width exact when the rounded units cannot reach the target or land within
0.01 of it), never more
than `max_ratio` of the family and never all of it. Units from all families are ranked together; the exact
cost of each prefix of that ranking is monotone, so a binary search finds the shortest prefix that meets
the budget. If that prefix's last unit (a whole head, a lockstep group of layers) overshoots, the units ranked
after it are added instead while the cost stays above target, and a last unit is chosen among the next ones
to land as close under the target as can be.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from ..analysis.channels import Analysis
from ..analysis.cost import CostModel
from ..errors import BudgetError

log = logging.getLogger(__name__)

# round_to="auto": multiples of 8 in layers of 32 channels or more, unless that misses the target by more than
# AUTO_TOLERANCE of the cost (a small model of a few such layers), then exact widths everywhere
AUTO_ROUND, AUTO_MIN_WIDTH, AUTO_TOLERANCE = 8, 32, 0.01
# round_to="auto" in causal LMs: multiples of 64 in layers of 256 channels or more, what GPU GEMM kernels tile
# (DeciLM's MLP grid of 256 is a multiple)
LLM_ROUND = 64
_FILL_WINDOW = 64  # candidates for the last pick
_FILL_LIMIT = 4096  # units examined at most for the last picks


def select(an: Analysis, importance: np.ndarray, cost: CostModel, target_ratio: float, *,
           max_ratio: float = 1.0, round_to: int | str | None = None, keep: np.ndarray | None = None,
           budget_name: str = "FLOPs", mass: np.ndarray | None = None,
           lockstep: list[list[int]] | None = None, normalize: bool = True,
           force: np.ndarray | None = None, multiple: dict[int, int] | None = None,
           auto_round: int = AUTO_ROUND) -> np.ndarray:
    """Return the ids of the components to remove.

    lockstep: groups of family indices that lose the same number of channels (uniform widths, see
    passes/uniform.py); families in no group move alone. normalize=False compares raw
    importance across families (for scores already on one scale, such as calibration-based ones).
    force: components removed already (HESSO's earlier decisions, a bool per component): each family takes
    them first, and the units holding them rank before every other unit.
    multiple: per family index, the number of components it must lose at a time (a config's divisibility).
    auto_round: the multiple round_to="auto" keeps in layers of at least 4x that many channels (8, or the
    channel block a latency table measured fastest)."""
    base = cost.total()
    if base <= 0:
        raise BudgetError(f"the model has no {budget_name} graphprune can count, so a {budget_name} target "
                          "cannot be met; use the other budget")
    target = target_ratio * base
    if base <= target:
        return np.zeros(0, dtype=np.int64)
    saving = cost.first_order_saving()
    scores, family_of, rank_of, members, sizes = [], [], [], [], []
    for f, (fams, n_all, ids) in enumerate(_lockstep_groups(an, keep, lockstep)):
        # unit j of a group is the j-th least important component of each member family
        norms = [_normalized(importance[fam].astype(np.float64), mass, fam, normalize) for fam in fams]
        if force is not None:
            for norm, fam in zip(norms, fams):
                norm[force[fam]] = -1.0  # below any importance: first in the family's order
        orders = [np.argsort(norm, kind="stable") for norm in norms]
        n_free = len(fams[0])
        limit = min(n_free, n_all - 1, int(math.floor(max_ratio * n_all + 1e-9)))
        unit = _unit_round(cost, fams[0], n_all, round_to, auto_round) or 1
        unit = math.lcm(unit, max((multiple or {}).get(i, 1) for i in ids))
        chunk = np.asarray(_chunks(n_all, n_free, limit, unit if unit > 1 else None),
                           dtype=np.int64)
        if len(chunk) == 0:
            continue
        used = int(chunk.sum())
        taken = np.stack([fam[order[:used]] for fam, order in zip(fams, orders)], axis=1)  # units x members
        unit_norm = np.sum([norm[order[:used]] for norm, order in zip(norms, orders)], axis=0)
        starts = np.concatenate([[0], np.cumsum(chunk)[:-1]])
        chunk_saving = np.add.reduceat(saving[taken].sum(axis=1), starts)
        chunk_norm = np.add.reduceat(unit_norm, starts)
        thinning = n_all / np.maximum(n_all - starts - chunk / 2, 1)
        with np.errstate(divide="ignore"):
            score = np.where(chunk_saving > 0, thinning * chunk_norm / np.maximum(chunk_saving, 1e-300), np.inf)
        if force is not None:
            score[np.add.reduceat(force[taken].any(axis=1).astype(np.int64), starts) > 0] = -1.0
        score = np.maximum.accumulate(score)  # keep the family's own order
        finite = np.isfinite(score)
        scores.append(score[finite])
        family_of.append(np.full(finite.sum(), f))
        rank_of.append(np.arange(len(chunk))[finite])
        sizes.append(chunk[finite] * len(fams))
        members.append(taken.reshape(-1)[:chunk[finite].sum() * len(fams)])
    if not scores or not sum(len(x) for x in scores):
        raise BudgetError(f"nothing in this model can be pruned to save {budget_name} (every channel is "
                          "pinned; see plan.explain()); the smallest reachable ratio is 1.0", reachable=1.0)
    score, family, rank, size = (np.concatenate(x) for x in (scores, family_of, rank_of, sizes))
    flat = np.concatenate(members)
    unit_start = np.concatenate([[0], np.cumsum(size)[:-1]])
    ranking = np.lexsort((rank, family, score))
    units = [flat[unit_start[u]:unit_start[u] + size[u]] for u in ranking]
    comps = np.concatenate(units)
    ends = np.cumsum(size[ranking])
    floor_cost = cost.total(comps)

    def exact_widths() -> np.ndarray:
        return select(an, importance, cost, target_ratio, max_ratio=max_ratio, round_to=None, keep=keep,
                      budget_name=budget_name, mass=mass, lockstep=lockstep, normalize=normalize, force=force,
                      multiple=multiple)

    if floor_cost > target * (1 + 1e-9):
        if round_to == "auto":  # "auto" never puts a target out of reach: exact widths go further
            log.info("multiples of %d cannot reach the target: exact widths instead", auto_round)
            return exact_widths()
        reachable = floor_cost / base
        raise BudgetError(f"target {budget_name} ratio {target_ratio:.3f} is out of reach: removing every "
                          f"prunable channel (within max_ratio={max_ratio}) leaves {reachable:.3f} of the "
                          f"{budget_name}; ask for at least {math.ceil(reachable * 1000) / 1000:.3f}, raise "
                          "max_ratio, or drop `ignore` entries", reachable=reachable)

    def prefix(k: int) -> np.ndarray:
        return comps[:ends[k - 1]] if k > 0 else comps[:0]

    lo, hi = 0, len(units)  # smallest k with cost(prefix k) <= target; cost(prefix len) <= target
    while lo < hi:
        mid = (lo + hi) // 2
        if cost.total(prefix(mid)) <= target:
            hi = mid
        else:
            lo = mid + 1
    chosen = prefix(lo)
    if lo > 0:  # the lo-th unit may overshoot (a whole head); smaller units ranked soon after may land closer
        window = slice(lo - 1, lo - 1 + _FILL_LIMIT)
        chosen = _fill(cost, prefix(lo - 1), units[window], family[ranking][window], target, chosen)
    if round_to == "auto" and target - cost.total(chosen) > AUTO_TOLERANCE * base:
        log.info("multiples of %d land %.3f under the target: exact widths instead", auto_round,
                 (target - cost.total(chosen)) / base)
        return exact_widths()
    log.info("removing %d of %d prunable components", len(chosen), int(an.prunable.sum()))
    return chosen


def _normalized(imp: np.ndarray, mass: np.ndarray | None, fam: np.ndarray, normalize: bool) -> np.ndarray:
    if not normalize:
        return imp
    mean = imp.mean()
    norm = imp / mean if mean > 0 else np.ones_like(imp)
    if mass is not None:  # a whole head is not one channel
        norm = norm * max(mass[fam].mean(), 1e-12)
    return norm


def _lockstep_groups(an: Analysis, keep: np.ndarray | None, lockstep: list[list[int]] | None):
    """(member families, full family size, family indices) per group; a family whose free count differs moves
    alone."""
    free = [fam if keep is None else fam[~keep[fam]] for fam in an.families]
    grouped: set[int] = set()
    for group in lockstep or []:
        by_size: dict[tuple[int, int], list[int]] = {}
        for f in group:
            by_size.setdefault((len(an.families[f]), len(free[f])), []).append(f)
        for (n_all, n_free), fs in by_size.items():
            grouped.update(fs)
            if n_free:
                yield [free[f] for f in fs], n_all, fs
    for f, fam in enumerate(free):
        if f not in grouped and len(fam):
            yield [fam], len(an.families[f]), [f]


def _fill(cost: CostModel, base: np.ndarray, following: list[np.ndarray], families: np.ndarray, target: float,
          fallback: np.ndarray) -> np.ndarray:
    """From `base` (still over target), add the following units in rank order while they keep the cost
    above target (smaller units after a whole head that would overshoot), until _FILL_WINDOW units would
    each cross it; finish with the one that lands closest under the target; `fallback` if none is closer.
    A family whose unit was passed over adds no later unit, so each family still loses a prefix of its
    order (and round_to widths stay multiples)."""
    kept = cost.kept_widths(base)
    added: list[np.ndarray] = []
    finishers: list[np.ndarray] = []
    passed: set[int] = set()
    for unit, fam in zip(following, families):
        if fam in passed:
            continue
        after = kept - cost.lost_widths(unit)
        if cost.total_at(after) > target:
            added.append(unit)
            kept = after
        else:
            finishers.append(unit)
            passed.add(fam)
            if len(finishers) >= _FILL_WINDOW:
                break
    best_cost, best = cost.total(fallback), fallback
    for unit in finishers:
        c = cost.total_at(kept - cost.lost_widths(unit))
        if best_cost < c <= target:
            best_cost, best = c, np.concatenate([base, *added, unit])
    return best


def _unit_round(cost: CostModel, fam: np.ndarray, n_all: int, round_to: int | str | None,
                auto_round: int = AUTO_ROUND) -> int | None:
    """round_to in components: a component that is several channels wide (a head of head_dim channels)
    needs only round_to / gcd(round_to, width) of them for the width to stay a multiple of round_to.
    "auto": auto_multiple's (8 for layers of at least 32 channels, which kernels run fastest; exact below, where a
    narrow layer would otherwise lose most of its prunability)."""
    if len(fam) == 0:
        return None
    width = max(int(cost.members[fam[:1]].max()), 1)
    if round_to == "auto":
        round_to = auto_multiple(n_all * width, auto_round)
    if not round_to or round_to <= 1:
        return None
    return round_to // math.gcd(round_to, width)


def auto_multiple(width: int, auto_round: int = AUTO_ROUND) -> int | None:
    """round_to="auto" for a layer `width` channels wide: `auto_round` from four times that width, halved
    (down to 8) for narrower layers (with 32 measured fastest, a 64-channel layer keeps multiples of 16),
    exact below 32 channels, where rounding would take most of a layer's choices."""
    multiple = auto_round
    while multiple > AUTO_ROUND and width < AUTO_MIN_WIDTH // AUTO_ROUND * multiple:
        multiple //= 2
    return multiple if multiple > 1 and width >= AUTO_MIN_WIDTH // AUTO_ROUND * multiple else None


def _chunks(n_all: int, n_free: int, limit: int, round_to: int | None) -> list[int]:
    """Sizes of successive removal units for a family of n_all components (n_free removable)."""
    if not round_to or round_to <= 1:
        return [1] * limit
    sizes = []
    removed = 0
    first = n_all % round_to
    if first:
        sizes.append(first)
        removed = first
    while removed + round_to <= limit and n_all - removed - round_to >= round_to:
        sizes.append(round_to)
        removed += round_to
    total = 0
    out = []
    for s in sizes:
        if total + s > min(limit, n_free):
            break
        out.append(s)
        total += s
    return out
