"""Helpers shared by rules: argument access, broadcasting ties and state algebra."""

from __future__ import annotations

import numpy as np

from ...ir.graph import Value
from ..context import DEP, INDEP, ZERO, Context


def arg(node, i: int, name: str, default=None):
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name, default)


def norm_dims(dims, ndim: int) -> list[int]:
    if dims is None:
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    if len(dims) == 0:
        return list(range(ndim))
    return sorted(d % ndim for d in dims)


CASTS = ("aten._to_copy.", "aten.to.", "aten.type_as.", "aten.clone.", "aten.contiguous.", "aten.alias.",
         "aten.detach.", "aten._to_dtype")


def root(v):
    """The value `v` is a dtype cast or copy of (itself if none)."""
    while getattr(v, "producer", None) is not None and v.producer.op.startswith(CASTS):
        v = v.producer.args[0]
    return v


def combine_add(states):
    """Masked state of a sum: zero only if every term is zero."""
    out = np.zeros_like(_first_array(states), dtype=np.int8)
    for s in states:
        out = np.maximum(out, s)
    return out


def combine_mul(states):
    """Masked state of a product: zero if any factor is zero."""
    arrs = [np.broadcast_to(np.asarray(s, dtype=np.int8), _first_array(states).shape) for s in states]
    any_zero = np.zeros(arrs[0].shape, dtype=bool)
    worst = np.zeros(arrs[0].shape, dtype=np.int8)
    for a in arrs:
        any_zero |= a == ZERO
        worst = np.maximum(worst, a)
    return np.where(any_zero, ZERO, worst).astype(np.int8)


def _first_array(states):
    for s in states:
        if isinstance(s, np.ndarray):
            return s
    return np.asarray(states[0], dtype=np.int8).reshape(())


def broadcast(ctx: Context, operands: list, out: Value, combine) -> None:
    """Tie aligned axes of broadcasting operands to the output and combine their masked states."""
    for j in range(out.ndim):
        k = out.ndim - j
        states = []
        for op in operands:
            if isinstance(op, Value) and op.ndim >= k:
                ax = op.ndim - k
                if op.shape[ax] == out.shape[j]:
                    ctx.tie(op, ax, out, j)
                    states.append(ctx.state(op, ax))
                    continue
                ctx.handled.add((op.id, ax))  # size-1 axis, broadcast
            states.append(np.int8(ctx.whole(op)) if isinstance(op, Value) else np.int8(
                ZERO if op in (0, 0.0, False) else INDEP))
        if not any(isinstance(s, np.ndarray) for s in states):
            states[0] = np.full(out.shape[j], states[0], dtype=np.int8)
        ctx.set_state(out, j, combine(states))


def identity(ctx: Context, src: Value, out: Value, f0_zero: bool = True) -> None:
    """Same-shape map applied element by element; f0_zero says whether it maps 0 to 0."""
    for a in range(out.ndim):
        ctx.tie(src, a, out, a)
        st = ctx.state(src, a)
        ctx.set_state(out, a, st if f0_zero else np.where(st == ZERO, INDEP, st))


def copy_param_view(src: Value, out: Value, axis_map: list[int | None], offsets: list[int] | None = None):
    """Carry the 'view of a parameter' label through a view op (axis_map[i]: source axis of out axis i)."""
    if src.param_view is None and src.kind not in ("param", "buffer"):
        return
    root, raxes, roffs = src.param_view if src.param_view is not None else (
        src, tuple(range(src.ndim)), (0,) * src.ndim)
    axes, offs = [], []
    for i, a in enumerate(axis_map):
        extra = offsets[i] if offsets else 0
        if a is None or raxes[a] is None:
            axes.append(None)
            offs.append(0)
        else:
            axes.append(raxes[a])
            offs.append(roffs[a] + extra)
    out.param_view = (root, tuple(axes), tuple(offs))


__all__ = [
    "CASTS",
    "DEP",
    "INDEP",
    "ZERO",
    "arg",
    "broadcast",
    "combine_add",
    "combine_mul",
    "copy_param_view",
    "identity",
    "norm_dims",
    "root",
]
