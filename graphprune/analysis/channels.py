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

import logging
import re
from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..ir.graph import BUFFER, CONST, INPUT, PARAM, Graph, Node, Value

log = logging.getLogger(__name__)

ZERO, INDEP, DEP = 0, 1, 2
_DEFAULT_STATE = {PARAM: ZERO, BUFFER: INDEP, CONST: INDEP, INPUT: DEP}  # parameters are zeroed by mask()


@dataclass
class CostTerm:
    """cost = coef * prod(kept width of each factor space); one per FLOP-bearing op or parameter."""

    coef: float
    spaces: list[int]
    label: str


@dataclass
class Record:
    """A module whose attributes hold a width that pruning changes: "heads" (a reshape into heads x
    head_dim: num_heads, split_size, ...) or "rms" (an RMS norm over a pruned axis, made exact by rescaling
    its weight and eps). `space` is the pruned axis; `head_dim` the width of one head."""

    kind: str
    module: str
    space: int
    head_dim: int = 0


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


class Context:
    """What a rule sees: ties, pins, states, consumer marks and cost terms, all over element ids."""

    def __init__(self, graph: Graph, allow_lossy: bool = False):
        self.graph = graph
        self.allow_lossy = allow_lossy
        self.offsets: list[int] = []
        self.sizes: list[int] = []
        self.keys: list[tuple[int, int]] = []
        self.index: dict[tuple[int, int], int] = {}
        self.n = 0
        self.edge_a: list[np.ndarray] = []
        self.edge_b: list[np.ndarray] = []
        self.pinned: list[np.ndarray] = []
        self.pin_why: list[tuple[str, str]] = []
        self.lossy_ids: list[np.ndarray] = []
        self.consumer_ids: list[np.ndarray] = []
        self.producer_ids: list[np.ndarray] = []
        self.records: list[Record] = []
        self.states: dict[tuple[int, int], np.ndarray] = {}
        self.flop_terms: list[CostTerm] = []
        self.node: Node | None = None
        self.handled: set[tuple[int, int]] = set()

    # ----- element ids -------------------------------------------------------------------------
    def space(self, v: Value, axis: int) -> int:
        axis = axis % max(v.ndim, 1)
        key = (v.id, axis)
        s = self.index.get(key)
        if s is None:
            s = len(self.offsets)
            self.index[key] = s
            self.offsets.append(self.n)
            self.sizes.append(v.shape[axis])
            self.keys.append(key)
            self.n += v.shape[axis]
        return s

    def ids(self, v: Value, axis: int, idx=None) -> np.ndarray:
        s = self.space(v, axis)
        base = self.offsets[s]
        if idx is None:
            return np.arange(base, base + self.sizes[s], dtype=np.int64)
        return base + np.asarray(idx, dtype=np.int64)

    # ----- ties and pins ---------------------------------------------------------------------
    def tie(self, v1: Value, a1: int, v2: Value, a2: int, i1=None, i2=None) -> None:
        """Tie element i1[k] of (v1, a1) to i2[k] of (v2, a2); identity when both are None."""
        a = self.ids(v1, a1, i1)
        b = self.ids(v2, a2, i2)
        if a.shape != b.shape:
            raise ValueError(f"tie of unequal lengths {a.shape} vs {b.shape} at {self.node.where()}")
        self.edge_a.append(a)
        self.edge_b.append(b)
        self.handled.add((v1.id, a1 % max(v1.ndim, 1)))
        self.handled.add((v2.id, a2 % max(v2.ndim, 1)))

    def pin(self, v: Value, axis: int | None = None, idx=None, reason: str = "") -> None:
        axes = range(v.ndim) if axis is None else [axis]
        for a in axes:
            self.handled.add((v.id, a % v.ndim))
            if v.shape[a] > 1 or idx is not None:
                self.pin_ids(self.ids(v, a, idx), reason)

    def pin_ids(self, ids: np.ndarray, reason: str) -> None:
        self.pinned.append(ids)
        self.pin_why.append((reason, self.node.where() if self.node is not None else "graph boundary"))

    def mark_lossy(self, v: Value, axis: int) -> None:
        self.lossy_ids.append(self.ids(v, axis))

    def mark_consumer(self, v: Value, axis: int) -> None:
        """Record that a parameter (or a view of one) is read along `axis` as a consumer (columns)."""
        axis = axis % v.ndim
        self.handled.add((v.id, axis))
        if v.kind in (PARAM, BUFFER):
            self.consumer_ids.append(self.ids(v, axis))
        elif v.param_view is not None:
            root, axes, offs = v.param_view
            if axes[axis] is not None:
                self.consumer_ids.append(self.ids(root, axes[axis], offs[axis] + np.arange(v.shape[axis])))

    def mark_producer(self, v: Value, axis: int) -> None:
        """A parameter axis that writes channels (embedding columns), even if it is also read as a consumer
        elsewhere (a tied output projection): mask() zeroes it."""
        self.producer_ids.append(self.ids(v, axis))

    def record(self, kind: str, v: Value, axis: int, head_dim: int = 0) -> None:
        if self.node is not None:
            self.records.append(Record(kind, self.node.scope, self.space(v, axis), head_dim))

    def is_param_like(self, v: Value) -> bool:
        return v.kind in (PARAM, BUFFER) or v.param_view is not None

    # ----- states --------------------------------------------------------------------------------
    def whole(self, v) -> int:
        """State of a value broadcast along an axis it lacks: it is not masked with the channel."""
        if not isinstance(v, Value):
            return INDEP
        return DEP if v.depends_on_input else INDEP

    def state(self, v: Value, axis: int) -> np.ndarray:
        axis = axis % v.ndim
        st = self.states.get((v.id, axis))
        if st is None:
            st = np.full(v.shape[axis], ZERO if v.zero else _DEFAULT_STATE.get(v.kind, DEP), dtype=np.int8)
        return st

    def set_state(self, v: Value, axis: int, st) -> None:
        n = v.shape[axis]
        if isinstance(st, np.ndarray) and st.shape == (n,) and st.dtype == np.int8:
            arr = st  # states are never written in place, so sharing is safe
        else:
            arr = np.broadcast_to(np.asarray(st, dtype=np.int8), (n,)).copy()
        self.states[(v.id, axis % v.ndim)] = arr

    def forbid_zero(self, v: Value, axis: int, reason: str) -> None:
        """Pin elements of (v, axis) that would be exactly zero once masked, where zero is not allowed
        (a divisor, the argument of log or rsqrt)."""
        st = self.state(v, axis)
        if (st == ZERO).any():
            self.pin_ids(self.ids(v, axis, np.nonzero(st == ZERO)[0]), reason)

    def require_zero(self, v: Value, axis: int, reason: str, ok: np.ndarray | None = None) -> None:
        """Pin elements of (v, axis) that would not be exactly zero once their channel is masked."""
        st = self.state(v, axis)
        bad = st != ZERO
        if ok is not None:
            bad &= ~ok
        self.handled.add((v.id, axis % v.ndim))
        if bad.any():
            self.pin_ids(self.ids(v, axis, np.nonzero(bad)[0]), f"{reason}: a removed channel would not be zero there")

    # ----- cost ----------------------------------------------------------------------------------
    def add_flops(self, coef: float, factors: list[tuple[Value, int]]) -> None:
        self.flop_terms.append(CostTerm(float(coef), [self.space(v, a) for v, a in factors],
                                        self.node.scope or self.node.op))


def analyze(graph: Graph, allow_lossy: bool = False) -> Analysis:
    """Run every op's rule over the recorded graph and group channels into components."""
    from .rules import lookup  # the registry imports this module

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


def pin_all(ctx: Context, node: Node, reason: str) -> None:
    """Keep whole every axis the node touches, and every width a folded input was computed from."""
    for v in node.tensor_inputs() + node.outputs:
        ctx.pin(v, reason=reason)
        for vid, axis in v.reads:
            ctx.pin(ctx.graph.values[vid], axis, reason=reason)


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
        for lo, hi in zip(starts[:-1], starts[1:]):
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
