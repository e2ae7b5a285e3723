"""Ops that move channels between tensors: cat / stack, split / chunk / unbind, slice / select,
index_select, padding, pixel shuffle and channel shuffle. Index maps bind to operand positions, so each
concat input and each split output gets exactly its own segment."""

from __future__ import annotations

import numpy as np

from ...ir.graph import Value
from ..context import pin_all
from . import rule
from .common import arg, copy_param_view


def _same_other_axes(ctx, a: Value, b: Value, skip_a: int | None, skip_b: int | None) -> None:
    """Tie every axis except the one being cut/joined (axes are matched in order)."""
    axes_a = [k for k in range(a.ndim) if k != skip_a]
    axes_b = [k for k in range(b.ndim) if k != skip_b]
    for ka, kb in zip(axes_a, axes_b):
        if a.shape[ka] == b.shape[kb]:
            ctx.tie(a, ka, b, kb)
            ctx.set_state(b, kb, ctx.state(a, ka))


@rule("aten.cat", "aten.concat", "aten.concatenate")
def cat(ctx, node):
    tensors = [t for t in arg(node, 0, "tensors") if isinstance(t, Value)]
    out = node.outputs[0]
    dim = arg(node, 1, "dim", 0) % out.ndim
    st = np.zeros(out.shape[dim], dtype=np.int8)
    offset = 0
    for t in tensors:
        if t.ndim == 1 and t.shape[0] == 0:  # legacy empty tensors are skipped by cat
            continue
        n = t.shape[dim]
        ctx.tie(t, dim, out, dim, None, np.arange(offset, offset + n))
        st[offset:offset + n] = ctx.state(t, dim)
        _same_other_axes(ctx, t, out, dim, dim)
        offset += n
    ctx.set_state(out, dim, st)


@rule("aten.stack")
def stack(ctx, node):
    tensors = [t for t in arg(node, 0, "tensors") if isinstance(t, Value)]
    out = node.outputs[0]
    dim = arg(node, 1, "dim", 0) % out.ndim
    for t in tensors:
        _same_other_axes(ctx, t, out, None, dim)
    ctx.pin(out, dim, reason="stack makes a new axis out of whole tensors")


@rule("aten.split.Tensor", "aten.split_with_sizes", "aten.unsafe_split", "aten.unsafe_split_with_sizes",
      "aten.split.sizes", "aten.chunk", "aten.tensor_split")
def split(ctx, node):
    """Each segment is tied to its source range. Equal pieces (chunk, split by one size) stay equal after
    pruning only if piece k loses the same positions as piece 0, so those positions are tied across pieces
    (gate/up halves of a fused SwiGLU, q/k/v of a fused projection). Split sizes held by forward code
    follow through module attributes or are rewritten by the regenerated graph; prune() verifies."""
    src = node.args[0]
    dim = arg(node, 2, "dim", 0) % src.ndim
    offset = 0
    for out in node.outputs:
        n = out.shape[dim]
        ctx.tie(src, dim, out, dim, np.arange(offset, offset + n), None)
        ctx.set_state(out, dim, ctx.state(src, dim)[offset:offset + n])
        _same_other_axes(ctx, src, out, dim, dim)
        offsets = [offset if k == dim else 0 for k in range(out.ndim)]
        copy_param_view(src, out, list(range(out.ndim)), offsets)
        offset += n
    first = node.outputs[0]
    by_one_size = node.op.split(".")[1] in ("chunk", "split", "unsafe_split") and isinstance(node.args[1], int)
    if by_one_size and all(o.shape[dim] == first.shape[dim] for o in node.outputs):
        for out in node.outputs[1:]:
            ctx.tie(first, dim, out, dim)


@rule("aten.unbind")
def unbind(ctx, node):
    src = node.args[0]
    dim = arg(node, 1, "dim", 0) % src.ndim
    ctx.pin(src, dim, reason="unbind turns each index of this axis into a whole tensor")
    for out in node.outputs:
        _same_other_axes(ctx, src, out, dim, None)


@rule("aten.slice.Tensor", "aten.slice_copy.Tensor", "aten.narrow")
def slice_(ctx, node):
    """The slice keeps its source positions; bounds held by forward code follow through module attributes
    (q/k/v slices of a fused projection) or are rewritten by the regenerated graph; prune() verifies."""
    src, out = node.args[0], node.outputs[0]
    dim = arg(node, 1, "dim", 0) % src.ndim
    if node.op.startswith("aten.narrow"):
        start, step = arg(node, 2, "start"), 1
        idx = np.arange(start % src.shape[dim] if start < 0 else start, (start % src.shape[dim] if start < 0
                                                                          else start) + out.shape[dim])
    else:
        start, end, step = arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1) or 1
        idx = np.arange(src.shape[dim])[slice(start, end, step)]
    if len(idx) != out.shape[dim]:
        pin_all(ctx, node, "slice bounds graphprune could not follow")
        return
    ctx.tie(src, dim, out, dim, idx, None)
    ctx.set_state(out, dim, ctx.state(src, dim)[idx])
    _same_other_axes(ctx, src, out, dim, dim)
    if step == 1 and len(idx):
        copy_param_view(src, out, list(range(out.ndim)), [int(idx[0]) if k == dim else 0 for k in range(out.ndim)])


@rule("aten.select.int", "aten.select_copy.int")
def select(ctx, node):
    src, out = node.args[0], node.outputs[0]
    dim = arg(node, 1, "dim") % src.ndim
    index = arg(node, 2, "index") % src.shape[dim]
    ctx.pin(src, dim, [index], reason="select reads one index of this axis as a whole tensor")
    ctx.handled.add((src.id, dim))
    _same_other_axes(ctx, src, out, dim, None)


@rule("aten.index_select")
def index_select(ctx, node):
    src, out = node.args[0], node.outputs[0]
    dim = arg(node, 1, "dim") % src.ndim
    ctx.pin(src, dim, reason="index_select picks data-chosen indices of this axis")
    ctx.pin(out, dim, reason="index_select picks data-chosen indices of this axis")
    _same_other_axes(ctx, src, out, dim, dim)
    index = arg(node, 2, "index")
    if isinstance(index, Value):
        ctx.handled.add((index.id, 0))


@rule("aten.index.Tensor", "aten._unsafe_index.Tensor")
def index(ctx, node):
    """x[i, :, j] (advanced indexing): the indexed axes are read at data-chosen positions, so they are pinned,
    as are the output axes the broadcast index tensors make; every other axis passes through whole. Where
    those go follows PyTorch: if the indexed axes are adjacent, the index axes replace them in place,
    otherwise the index axes come first and the other axes follow in order (relative position bias tables,
    table[index] with the heads axis passing through, are the common case)."""
    src, out = node.args[0], node.outputs[0]
    indices = list(arg(node, 1, "indices"))
    at = [k for k, t in enumerate(indices) if t is not None]
    if not at or any(not isinstance(indices[k], Value) or "bool" in indices[k].dtype or "uint8" in indices[k].dtype
                     for k in at):
        pin_all(ctx, node, "indexing with a boolean mask (or a non-tensor index) selects a data-dependent set")
        return
    b_ndim = max(indices[k].ndim for k in at)
    rest = [a for a in range(src.ndim) if a not in at]
    adjacent = at == list(range(at[0], at[-1] + 1))
    first = at[0] if adjacent else 0  # output position of the broadcast index axes
    if out.ndim != len(rest) + b_ndim:
        pin_all(ctx, node, "indexing result of a shape graphprune does not expect")
        return
    reason = "advanced indexing reads this axis at data-chosen positions"
    for i, a in enumerate(rest):
        j = (a if a < first else a - len(at) + b_ndim) if adjacent else b_ndim + i
        ctx.tie(src, a, out, j)
        ctx.set_state(out, j, ctx.state(src, a))
    gathered = max(int(ctx.state(src, a).max(initial=0)) for a in at)
    for j in range(first, first + b_ndim):
        ctx.pin(out, j, reason=reason)
        ctx.set_state(out, j, gathered)
    for a in at:
        ctx.pin(src, a, reason=reason)
        ctx.pin(indices[a], reason=reason)


@rule("aten.constant_pad_nd")
def constant_pad(ctx, node):
    src, out = node.args[0], node.outputs[0]
    pad = list(arg(node, 1, "pad"))
    value = arg(node, 2, "value", 0) or 0
    before = [0] * src.ndim
    for k in range(len(pad) // 2):
        before[src.ndim - 1 - k] = pad[2 * k]
        if pad[2 * k] < 0 or pad[2 * k + 1] < 0:
            pin_all(ctx, node, "negative padding crops the tensor")
            return
    for a in range(src.ndim):
        n = src.shape[a]
        ctx.tie(src, a, out, a, None, np.arange(before[a], before[a] + n))
        st = np.full(out.shape[a], 0 if value == 0 else 1, dtype=np.int8)
        st[before[a]:before[a] + n] = ctx.state(src, a)
        if value != 0:
            st = np.maximum(st, 1)
        ctx.set_state(out, a, st)


@rule("aten.pixel_shuffle", "aten.pixel_unshuffle")
def pixel_shuffle(ctx, node):
    """pixel_shuffle(r): output channel c is made of input channels c*r^2 ... c*r^2 + r^2 - 1."""
    src, out = node.args[0], node.outputs[0]
    c = src.ndim - 3
    if node.op.startswith("aten.pixel_shuffle"):
        x = np.arange(src.shape[c])
        y = x * out.shape[c] // src.shape[c]
    else:
        y = np.arange(out.shape[c])
        x = y * src.shape[c] // out.shape[c]
    ctx.tie(src, c, out, c, x, y)
    st = np.zeros(out.shape[c], dtype=np.int8)
    np.maximum.at(st, y, ctx.state(src, c)[x])
    ctx.set_state(out, c, st)
    for a in range(c):
        ctx.tie(src, a, out, a)
        ctx.set_state(out, a, ctx.state(src, a))
    for a in range(c + 1, src.ndim):
        ctx.pin(src, a, reason="pixel shuffle moves this axis")


@rule("aten.channel_shuffle", "aten.native_channel_shuffle")
def channel_shuffle(ctx, node):
    """After removing channels the shuffle permutation is a different one, so the axis stays whole."""
    src, out = node.args[0], node.outputs[0]
    ctx.pin(src, 1, reason="channel shuffle interleaves groups; a pruned width reshuffles differently")
    ctx.pin(out, 1, reason="channel shuffle interleaves groups; a pruned width reshuffles differently")
    for a in range(src.ndim):
        if a != 1:
            ctx.tie(src, a, out, a)
            ctx.set_state(out, a, ctx.state(src, a))
