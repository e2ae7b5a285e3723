"""Channel permutation before N:M masking (NVIDIA ASP's idea, on graphprune's channel groups).

N:M masks keep N of every M consecutive input channels of a layer, so which channels sit together decides how much
weight magnitude survives. Reordering the channels of one prunable family (every producer's output rows, every
reader's input columns, the norms and biases along them: the tensors the channel analysis ties together) leaves the
model's function exactly as it was, and a better order keeps more magnitude. The order is searched on the family's
eligible readers (each reading exactly that family, one column per channel, in one order): their |W| columns are
stacked and channels are swapped between groups of M, greedily, while the magnitude the masks keep grows, within
windows of WINDOW columns. Swaps are accepted only when they gain, so the kept magnitude never drops below the
identity order's. The caller checks the permuted model against the original.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..analysis.channels import Analysis
from .calibration import Reader, _weight_columns, reader_kind

WINDOW = 128  # columns searched together (swaps stay within a window): cost R x C x WINDOW per sweep
SWEEPS = 4
ROWS = 2048  # rows the search reads at most (evenly spaced); acceptance is decided on all of them


@dataclass
class Permutation:
    """New order of one family, as the index each position of each tensor axis it spans takes its data from."""

    family: int
    sources: dict[tuple[str, int], np.ndarray]  # (tensor name, axis) -> source index per position
    readers: list[str]
    kept_before: float  # |W| the N:M masks keep on the readers, identity order
    kept_after: float


def search(magnitude: torch.Tensor, n: int, m: int, window: int = WINDOW, sweeps: int = SWEEPS) -> torch.Tensor:
    """A column order of `magnitude` [rows, C] (C % m == 0) under which N:M masks keep at least as much as under
    the identity: greedy swaps between groups of m, each window of columns on its own."""
    channels = magnitude.shape[1]
    window = max(m, window - window % m)
    perm = torch.arange(channels)
    for lo in range(0, channels, window):
        hi = min(lo + window, channels)
        perm[lo:hi] = lo + _search_window(magnitude[:, lo:hi], n, m, sweeps)
    return perm


def kept(magnitude: torch.Tensor, n: int, m: int) -> float:
    """Sum of the N largest of every M consecutive columns, over all rows."""
    rows, channels = magnitude.shape
    return float(magnitude.reshape(rows, channels // m, m).topk(n, dim=-1).values.sum())


def _search_window(block: torch.Tensor, n: int, m: int, sweeps: int) -> torch.Tensor:
    rows, width = block.shape
    groups = width // m
    order = torch.arange(width)
    if groups < 2:
        return order
    x = block.float().clone()
    value, base, nth = torch.empty(groups), torch.empty(width), torch.empty(rows, width)

    def refresh(*changed: int) -> None:  # the statistics of the groups whose members changed
        for g in changed:
            cols = slice(g * m, g * m + m)
            rest_sum, rest_nth = _without_each(x[:, cols], n)
            value[g] = x[:, cols].topk(n, dim=-1).values.sum()
            base[cols] = (rest_sum - rest_nth).sum(0)
            nth[:, cols] = rest_nth

    refresh(*range(groups))
    tolerance = 1e-6 * float(x.sum()) / groups
    for _ in range(sweeps):
        improved = False
        for a in range(groups):
            own = slice(a * m, a * m + m)
            # i in group a swapped with column j: group a loses i and gains x_j, j's group loses j and gains x_i
            gain = (base[own, None] + torch.maximum(nth[:, own].T[:, None, :], x.T[None]).sum(-1) - value[a]
                    + base[None, :] + torch.maximum(nth.T[None], x[:, own].T[:, None, :]).sum(-1)
                    - value.repeat_interleave(m)[None, :])
            gain[:, own] = -float("inf")
            i, j = divmod(int(gain.argmax()), width)
            if float(gain[i, j]) > tolerance:
                swap = [a * m + i, j]
                order[swap], x[:, swap] = order[swap[::-1]], x[:, swap[::-1]]
                refresh(a, j // m)
                improved = True
        if not improved:
            break
    return order


def _without_each(group: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each member of a group [rows, m]: the sum of the n largest of the other members, and the n-th largest
    of them (what a newcomer must beat to count), each [rows, m]."""
    values, ranks = group.sort(dim=-1, descending=True)
    top = values[:, :n].sum(-1, keepdim=True)
    # a member among the n largest leaves room for the (n+1)-th; any other member leaves the top n as they are
    inside = torch.arange(group.shape[1]) < n
    rest_sum = torch.where(inside, top - values + values[:, n:n + 1], top)
    rest_nth = torch.where(inside, values[:, n:n + 1], values[:, n - 1:n])
    return (torch.empty_like(group).scatter_(1, ranks, rest_sum),
            torch.empty_like(group).scatter_(1, ranks, rest_nth))


def plan_permutations(model: nn.Module, an: Analysis, layers: list[tuple[str, nn.Module]], n: int, m: int
                      ) -> list[Permutation]:
    """For every family read in full by at least one of `layers` (the N:M-eligible ones), the searched order,
    if it keeps more magnitude and the family can be reordered in every tensor it spans."""
    family_of = {int(c): f for f, comps in enumerate(an.families) for c in comps}
    readers: dict[int, list[tuple[str, torch.Tensor]]] = {}
    orders: dict[int, np.ndarray] = {}
    for name, module in layers:
        v = an.graph.params.get(f"{name}.weight" if name else "weight")
        kind, in_axis = reader_kind(module)
        elements = an.elements(v, in_axis) if v is not None else None
        if elements is None:
            continue
        comps = an.component[elements]
        families = {family_of.get(int(c)) for c in comps}
        if len(families) != 1 or None in families or len(np.unique(comps)) != len(comps):
            continue  # reads several families, pinned channels, or several columns per channel
        f = families.pop()
        if len(comps) != len(an.families[f]) or (f in orders and not np.array_equal(orders[f], comps)):
            continue
        orders[f] = comps
        columns = _weight_columns({"weight": module.weight}, Reader(name, "weight", in_axis, kind)).abs()
        readers.setdefault(f, []).append((name, columns))
    found = []
    for f, items in readers.items():
        stacked = torch.cat([columns for _, columns in items])
        sample = stacked[torch.linspace(0, len(stacked) - 1, ROWS).long()] if len(stacked) > ROWS else stacked
        perm = search(sample, n, m)
        before, after = kept(stacked, n, m), kept(stacked[:, perm], n, m)
        sources = _sources(an, orders[f], perm.numpy()) if after > before else None
        if sources is not None:
            found.append(Permutation(f, sources, [name for name, _ in items], before, after))
    return found


def _sources(an: Analysis, order: np.ndarray, perm: np.ndarray) -> dict[tuple[str, int], np.ndarray] | None:
    """Per (tensor name, axis) the family spans: the index each position takes its data from (the channel of
    component order[p] takes the data of component order[perm[p]]); None when some tensor holds the family's
    channels unevenly (then it cannot be reordered)."""
    to = dict(zip(order.tolist(), order[perm].tolist()))  # component -> the component whose data it takes
    members = set(to)
    sources = {}
    for name, v in an.graph.params.items():
        for axis in range(v.ndim):
            elements = an.elements(v, axis)
            if elements is None:
                continue
            comps = an.component[elements]
            hit = np.isin(comps, list(members))
            if not hit.any():
                continue
            positions: dict[int, list[int]] = {}
            for p in np.flatnonzero(hit):
                positions.setdefault(int(comps[p]), []).append(int(p))
            if positions.keys() != members or len({len(p) for p in positions.values()}) != 1:
                return None
            source = np.arange(len(comps))
            for c, where in positions.items():
                source[where] = positions[to[c]]
            sources[(name, axis)] = source
    return sources


def apply_permutations(model: nn.Module, found: list[Permutation], inverse: bool = False) -> None:
    """Reorder the model's tensors in place (inverse=True puts them back: a pure data move, bit-identical)."""
    from ..plan import named_tensors

    tensors = named_tensors(model)
    with torch.no_grad():
        for p in found:
            for (name, axis), source in p.sources.items():
                t = tensors[name]
                index = np.argsort(source) if inverse else source
                t.copy_(t.index_select(axis, torch.as_tensor(index, device=t.device)))
