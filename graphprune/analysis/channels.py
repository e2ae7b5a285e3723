"""Channel analysis: which channels must be removed together, and which may not be removed at all.

Every axis of every tensor in the graph gets a range of element ids, one per index along that axis.
Op rules (analysis/rules/) tie elements that must go together (a conv's output channel c with row c
of its weight, both operands of an add, a concat's segments, ...), pin elements that must stay (graph
inputs and outputs, anything an op without a rule touches) and record, per element, what the tensor
holds there once the channel's producer parameters are zeroed: exactly ZERO, a constant (INDEP) or
something input-dependent (DEP). Consumers (conv/linear inputs, sums, attention) require ZERO, which is
what makes removing a channel exact. Ties become connected components (vectorised, near-linear): each
prunable component is one zero-invariant group, a "channel" in the user's sense.
"""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..ir.graph import PARAM, Graph, Value
from .context import DEP, INDEP, ZERO, Context, CostTerm, Record, pin_all
from .rules import lookup

# the rule-facing names live in context.py; re-exported for code that imports them from here
__all__ = ["DEP", "INDEP", "ZERO", "Analysis", "Context", "CostTerm", "Record", "analyze", "pin_all"]

log = logging.getLogger(__name__)


@dataclass
class Analysis:
    """Result of the channel analysis; everything later stages need, with no reference to the model."""

    graph: Graph
    n_elements: int
    space_offset: np.ndarray  # per space: first element id
    space_size: np.ndarray  # per space: number of elements
    space_key: list[tuple[int, int]]  # per space: (value id, axis)
    component: np.ndarray  # per element: component id
    prunable: np.ndarray  # per component: bool
    zeroed: np.ndarray  # per element: True where mask() zeroes a parameter element (producer role)
    flop_terms: list[CostTerm]
    param_terms: list[CostTerm]
    pin_reasons: dict[int, tuple[str, str]]  # component -> (first reason it was pinned, where)
    lossy: np.ndarray  # per component: bool, removing it changes outputs (allowed lossy rule)
    has_producer: np.ndarray  # per component: bool, owns parameter elements mask() can zero
    records: list[Record] = field(default_factory=list)  # sites whose module attributes follow the widths
    families: list[np.ndarray] = field(default_factory=list)  # prunable components grouped by spaces
    family_label: list[str] = field(default_factory=list)
    family_role: list[str] = field(default_factory=list)  # parameter names with layer indices blanked
    space_index: dict[tuple[int, int], int] = field(default_factory=dict)

    def elements(self, value: Value, axis: int) -> np.ndarray | None:
        s = self.space_index.get((value.id, axis))
        if s is None:
            return None
        return np.arange(self.space_offset[s], self.space_offset[s] + self.space_size[s])


def analyze(graph: Graph, allow_lossy: bool = False) -> Analysis:
    """Run every op's rule over the recorded graph and group channels into components."""
    ctx = Context(graph, allow_lossy)
    for v in graph.inputs:
        ctx.node = None
        ctx.pin(v, reason="graph input")
    for node in graph.nodes:
        ctx.node = node
        ctx.handled = set()
        rule = lookup(node.op)
        if rule is None:
            pin_all(ctx, node, f"no rule for op {node.op}")
        else:
            rule(ctx, node)
            for v in node.tensor_inputs():
                for a in range(v.ndim):
                    if (v.id, a) not in ctx.handled and v.shape[a] > 1:
                        ctx.pin(v, a, reason=f"{node.op} reads axis {a} in a way no rule describes")
    ctx.node = None
    for v in graph.outputs:
        ctx.pin(v, reason="graph output")
    return _finish(ctx, graph)


def _finish(ctx: Context, graph: Graph) -> Analysis:
    # every parameter and buffer gets its spaces, even if unused, so backends can look them up
    for v in graph.params.values():
        for a in range(v.ndim):
            ctx.space(v, a)
    n = ctx.n
    if ctx.edge_a:
        a = np.concatenate(ctx.edge_a)
        b = np.concatenate(ctx.edge_b)
    else:
        a = b = np.zeros(0, dtype=np.int64)
    adj = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    n_comp, comp = connected_components(adj, directed=False)
    offsets = np.asarray(ctx.offsets, dtype=np.int64)
    sizes = np.asarray(ctx.sizes, dtype=np.int64)

    pinned = np.zeros(n_comp, dtype=bool)
    pin_comps = comp[np.concatenate(ctx.pinned)] if ctx.pinned else np.zeros(0, dtype=np.int64)
    pinned[pin_comps] = True
    is_param = np.zeros(n, dtype=bool)
    is_stored = np.zeros(n, dtype=bool)  # parameters and buffers
    for v in graph.params.values():
        for ax in range(v.ndim):
            is_stored[ctx.ids(v, ax)] = True
            if v.kind == PARAM:
                is_param[ctx.ids(v, ax)] = True
    consumer = np.zeros(n, dtype=bool)
    for ids in ctx.consumer_ids:
        consumer[ids] = True
    for ids in ctx.producer_ids:
        consumer[ids] = False
    zeroed = is_param & ~consumer
    has_producer = np.zeros(n_comp, dtype=bool)
    has_producer[comp[zeroed]] = True
    # a channel is something that flows: a parameter axis tied to no tensor (a grouped conv's per-group
    # width, a kernel axis, also through a view of the parameter such as a dequantized weight) is not one
    for v in graph.values:
        if v.param_view is not None:
            for ax in range(v.ndim):
                key = (v.id, ax)
                if key in ctx.index:
                    is_stored[ctx.ids(v, ax)] = True
    has_flow = np.zeros(n_comp, dtype=bool)
    has_flow[comp[~is_stored]] = True
    has_producer &= has_flow
    prunable = has_producer & ~pinned
    # the first reason each weighted component was pinned, for plan.explain()
    which = np.repeat(np.arange(len(ctx.pinned)), [len(ids) for ids in ctx.pinned])
    keep = has_producer[pin_comps]
    first, at = _first_occurrences(pin_comps[keep])
    reasons = {int(c): ctx.pin_why[w] for c, w in zip(first, which[keep][at])}
    lossy = np.zeros(n_comp, dtype=bool)
    for ids in ctx.lossy_ids:
        lossy[comp[ids]] = True

    param_terms = [CostTerm(1.0, [ctx.index[(v.id, ax)] for ax in range(v.ndim)], v.name)
                   for v in graph.params.values() if v.kind == PARAM]
    result = Analysis(graph, n, offsets, sizes, list(ctx.keys), comp, prunable, zeroed, ctx.flop_terms,
                      param_terms, reasons, lossy, has_producer, ctx.records, space_index=dict(ctx.index))
    _group_families(result)
    return result


def _first_occurrences(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values of x and the index of each one's first occurrence (a sort, not a hash)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.ones(len(xs), dtype=bool)
    new[1:] = xs[1:] != xs[:-1]
    return xs[new], order[new]


def _group_families(an: Analysis) -> None:
    """Prunable components that live in the same set of tensor axes form one family (a layer's channels)."""
    n_spaces = len(an.space_size)
    space_of = np.repeat(np.arange(n_spaces), an.space_size)
    comp = an.component
    mask = an.prunable[comp]
    codes, _ = _first_occurrences(comp[mask].astype(np.int64) * n_spaces + space_of[mask])  # (comp, space)
    pair_comp, pair_space = codes // n_spaces, codes % n_spaces
    families: dict[tuple, list[int]] = {}
    if len(codes):
        starts = np.concatenate([[0], np.nonzero(np.diff(pair_comp))[0] + 1, [len(codes)]])
        spaces = pair_space.tolist()
        for lo, hi in itertools.pairwise(starts):
            families.setdefault(tuple(spaces[lo:hi]), []).append(int(pair_comp[lo]))
    graph = an.graph
    by_id = {v.id: v for v in graph.params.values()}
    for key, comps in families.items():
        an.families.append(np.asarray(comps, dtype=np.int64))
        names = []
        for s in key:
            vid, axis = an.space_key[s]
            v = by_id.get(vid)
            if v is not None and v.kind == PARAM:
                names.append(f"{v.name}[{axis}]")
        an.family_label.append(", ".join(names[:4]) + (f" (+{len(names) - 4})" if len(names) > 4 else ""))
        an.family_role.append(re.sub(r"\.\d+\.", ".#.", ",".join(names)))
