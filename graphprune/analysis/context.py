"""What a rule sees: the analysis Context (element ids, ties, pins, states, cost terms), the masked-state
constants and the records rules leave for the backends. Rules import this module, never the engine in
channels.py that runs them, so data flows one way."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ir.graph import BUFFER, CONST, INPUT, PARAM, Graph, Node, Value

ZERO, INDEP, DEP = 0, 1, 2
_DEFAULT_STATE = {PARAM: ZERO, BUFFER: INDEP, CONST: INDEP, INPUT: DEP}  # parameters are zeroed by mask()


@dataclass
class CostTerm:
    """cost = coef * prod(kept width of each factor space); one per FLOP-bearing op or parameter."""

    coef: float
    spaces: list[int]
    label: str
    node: int = -1  # id of the graph node it counts (latency tables time that node)


@dataclass
class Record:
    """A module whose attributes hold a width that pruning changes: "heads" (a reshape into heads x
    head_dim: num_heads, split_size, ...) or "rms" (an RMS norm over a pruned axis, made exact by rescaling
    its weight and eps). `space` is the pruned axis; `head_dim` the width of one head; `offset` the constant
    an RMS norm adds to its weight before scaling (0 for x_hat * w, 1 for Gemma's x_hat * (1 + w))."""

    kind: str
    module: str
    space: int
    head_dim: int = 0
    offset: float = 0.0  # "rms" only: the norm multiplies by (offset + weight), as Gemma's (1 + w) does


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
        self._users: dict[int, list[Node]] | None = None

    def users(self, v: Value) -> list[Node]:
        """Nodes that read `v`, in execution order (an index built once, for rules that must see how a value
        is used later, such as an RMS norm's weight)."""
        if self._users is None:
            self._users = {}
            for node in self.graph.nodes:
                for u in {t.id: t for t in node.tensor_inputs()}:
                    self._users.setdefault(u, []).append(node)
        return self._users.get(v.id, [])

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

    def record(self, kind: str, v: Value, axis: int, head_dim: int = 0, offset: float = 0.0) -> None:
        if self.node is not None:
            self.records.append(Record(kind, self.node.scope, self.space(v, axis), head_dim, offset))

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
                                        self.node.scope or self.node.op, self.node.id))


def pin_all(ctx: Context, node: Node, reason: str) -> None:
    """Keep whole every axis the node touches, and every width a folded input was computed from."""
    for v in node.tensor_inputs() + node.outputs:
        ctx.pin(v, reason=reason)
        for vid, axis in v.reads:
            ctx.pin(ctx.graph.values[vid], axis, reason=reason)
