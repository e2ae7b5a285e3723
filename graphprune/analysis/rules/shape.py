"""Shape ops: view / reshape / flatten, permute / transpose, squeeze / unsqueeze, expand, repeat, flip, roll.

A reshape is split into groups of axes whose sizes multiply to the same number. A merge (flatten
(C,H,W) -> C*H*W) keeps the outermost axis: channel c owns a block of the merged axis, and the other
merged axes are pinned, since their elements are smeared across it. A split of one axis into several
(C -> heads x head_dim) ties each channel to its head, so heads go whole and head_dim stays.
"""

from __future__ import annotations

import math

import numpy as np

from ..context import pin_all
from . import rule
from .common import arg, copy_param_view


def _groups(a: tuple[int, ...], b: tuple[int, ...]):
    """Pair up runs of axes of equal product; size-1 axes outside any run are left out."""
    ia = [i for i, s in enumerate(a) if s != 1]
    ib = [j for j, s in enumerate(b) if s != 1]
    groups = []
    i = j = 0
    while i < len(ia) and j < len(ib):
        gi, gj = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i += 1
        j += 1
        while pa != pb:
            if pa < pb:
                if i >= len(ia):
                    return None
                gi.append(ia[i])
                pa *= a[ia[i]]
                i += 1
            else:
                if j >= len(ib):
                    return None
                gj.append(ib[j])
                pb *= b[ib[j]]
                j += 1
        groups.append((gi, gj))
    if i != len(ia) or j != len(ib):
        return None
    return groups


@rule("aten.view", "aten._unsafe_view", "aten.reshape", "aten._reshape_alias", "aten.view_copy",
      "aten.unflatten", "aten.flatten", "aten.expand_copy")
def reshape(ctx, node):
    src, out = node.args[0], node.outputs[0]
    if not hasattr(src, "shape") or math.prod(src.shape) != math.prod(out.shape) or 0 in src.shape:
        pin_all(ctx, node, "reshape with a shape graphprune cannot follow")
        return
    groups = _groups(src.shape, out.shape)
    if groups is None:
        pin_all(ctx, node, "reshape with a shape graphprune cannot follow")
        return
    axis_map: list[int | None] = [None] * out.ndim
    plain = True
    for gi, gj in groups:
        if len(gi) == 1 and len(gj) == 1:
            ctx.tie(src, gi[0], out, gj[0])
            ctx.set_state(out, gj[0], ctx.state(src, gi[0]))
            axis_map[gj[0]] = gi[0]
            continue
        plain = False
        ii, jj = gi[0], gj[0]
        if len(gi) == 1 and len(gj) > 1:
            _split_axis(ctx, src, ii, out, gj)
            continue
        if len(gi) > 1 and len(gj) > 1:
            for k in gi:
                ctx.pin(src, k, reason="reshape regroups several axes into several others")
            for k in gj:
                ctx.pin(out, k, reason="reshape regroups several axes into several others")
            continue
        inner_in = math.prod(src.shape[k] for k in gi[1:])
        inner_out = math.prod(out.shape[k] for k in gj[1:])
        n_in, n_out = src.shape[ii], out.shape[jj]
        if inner_in % inner_out == 0:  # the source side is coarser: each output element has one source
            y = np.arange(n_out)
            x = y * inner_out // inner_in
        elif inner_out % inner_in == 0:
            x = np.arange(n_in)
            y = x * inner_in // inner_out
        else:
            ctx.pin(src, ii, reason="reshape regroups this axis unevenly")
            ctx.pin(out, jj, reason="reshape regroups this axis unevenly")
            continue
        ctx.tie(src, ii, out, jj, x, y)
        st = np.zeros(n_out, dtype=np.int8)
        np.maximum.at(st, y, ctx.state(src, ii)[x])
        ctx.set_state(out, jj, st)
        for k in gi[1:]:
            ctx.pin(src, k, reason="reshape merges this axis into an outer one")
        for k in gj[1:]:
            ctx.pin(out, k, reason="reshape splits this axis off an outer one")
    for k in range(src.ndim):
        ctx.handled.add((src.id, k))
    if plain:
        copy_param_view(src, out, axis_map)


def _split_axis(ctx, src, axis, out, parts):
    """One axis split into several, e.g. C -> (heads, head_dim) or 3C -> (3, heads, head_dim).

    The carrier is the head axis: the outer one of two parts, the second-last of more (leading parts are
    segments such as q/k/v, the last part is head_dim). Each source channel is tied to its head, so a head
    is removed whole; the other parts keep their sizes (pinned). Forward code that rebuilds the shape from
    module attributes (num_heads, head_dim) or from -1 follows; prune() verifies that it does.
    """
    channels = parts[0] == 1 and _reaches_channel_op(ctx, out)
    carrier = 0 if len(parts) == 2 or channels else len(parts) - 2
    inner = math.prod(out.shape[k] for k in parts[carrier + 1:])
    x = np.arange(src.shape[axis])
    y = (x // inner) % out.shape[parts[carrier]]
    ctx.tie(src, axis, out, parts[carrier], x, y)
    st = np.zeros(out.shape[parts[carrier]], dtype=np.int8)
    np.maximum.at(st, y, ctx.state(src, axis))
    ctx.set_state(out, parts[carrier], st)
    if not channels:
        ctx.record("heads", out, parts[carrier], head_dim=inner)
    for k, part in enumerate(parts):
        if k != carrier:
            ctx.pin(out, part, reason="reshape splits a channel axis into parts; only whole heads are removed")


# ops whose axis 1 is a channel axis: a split that feeds one of them is (channels, spatial...)
_CHANNELS_AT_1 = ("aten.convolution.", "aten._convolution.", "aten.conv1d.", "aten.conv2d.", "aten.conv3d.",
                  "aten.conv_transpose", "aten.native_batch_norm.", "aten._native_batch_norm_legit",
                  "aten.batch_norm.", "aten.native_group_norm.", "aten.group_norm.")


def _reaches_channel_op(ctx, out, limit: int = 16) -> bool:
    """True if `out` flows, through ops that keep its shape, into the data input of a convolution or a batch or
    group norm, whose axis 1 holds channels. Only picks which axis of a split carries the source channels:
    either choice is exact, this one lets the consumer's channels be removed (Linear -> view(B, C, H, W) ->
    ConvTranspose2d) instead of pinning them."""
    todo, seen = [out], 0
    while todo and seen < limit:
        v = todo.pop()
        for node in ctx.users(v):
            seen += 1
            if node.op.startswith(_CHANNELS_AT_1) and node.args and node.args[0] is v:
                return True
            if node.outputs and node.outputs[0].shape == v.shape:
                todo.append(node.outputs[0])
    return False


@rule("aten.permute")
def permute(ctx, node):
    src, out = node.args[0], node.outputs[0]
    dims = [d % src.ndim for d in arg(node, 1, "dims")]
    _reorder(ctx, src, out, dims)


@rule("aten.transpose.int", "aten.transpose_.default", "aten.swapaxes", "aten.t", "aten.t_", "aten.numpy_T",
      "aten.mT", "aten.adjoint")
def transpose(ctx, node):
    src, out = node.args[0], node.outputs[0]
    dims = list(range(src.ndim))
    if src.ndim >= 2:
        if node.op.startswith(("aten.t.", "aten.t_.", "aten.numpy_T")):
            d0, d1 = 0, src.ndim - 1
        elif node.op.startswith(("aten.mT", "aten.adjoint")):
            d0, d1 = src.ndim - 2, src.ndim - 1
        else:
            d0, d1 = node.args[1] % src.ndim, node.args[2] % src.ndim
        dims[d0], dims[d1] = dims[d1], dims[d0]
    _reorder(ctx, src, out, dims)


def _reorder(ctx, src, out, dims):
    for j, d in enumerate(dims):
        ctx.tie(src, d, out, j)
        ctx.set_state(out, j, ctx.state(src, d))
    copy_param_view(src, out, list(dims))


@rule("aten.unsqueeze", "aten.unsqueeze_", "aten.squeeze", "aten.squeeze_")
def squeeze(ctx, node):
    src, out = node.args[0], node.outputs[0]
    kept = [a for a in range(src.ndim) if src.shape[a] != 1]
    dest = [j for j in range(out.ndim) if out.shape[j] != 1]
    if len(kept) != len(dest):
        pin_all(ctx, node, "squeeze/unsqueeze changed a non-unit axis")
        return
    axis_map: list[int | None] = [None] * out.ndim
    for a, j in zip(kept, dest):
        ctx.tie(src, a, out, j)
        ctx.set_state(out, j, ctx.state(src, a))
        axis_map[j] = a
    for a in range(src.ndim):
        ctx.handled.add((src.id, a))
    copy_param_view(src, out, axis_map)


@rule("aten.expand", "aten.expand_as", "aten.broadcast_to")
def expand(ctx, node):
    src, out = node.args[0], node.outputs[0]
    lead = out.ndim - src.ndim
    axis_map: list[int | None] = [None] * out.ndim
    for a in range(src.ndim):
        j = a + lead
        if src.shape[a] == out.shape[j]:
            ctx.tie(src, a, out, j)
            ctx.set_state(out, j, ctx.state(src, a))
            axis_map[j] = a
        else:
            ctx.handled.add((src.id, a))
            ctx.set_state(out, j, ctx.whole(src))
    for j in range(lead):
        ctx.set_state(out, j, ctx.whole(src))
    copy_param_view(src, out, axis_map)


@rule("aten.repeat")
def repeat(ctx, node):
    src, out = node.args[0], node.outputs[0]
    reps = list(arg(node, 1, "repeats"))
    lead = out.ndim - src.ndim
    for a in range(src.ndim):
        j = a + lead
        if reps[j] == 1:
            ctx.tie(src, a, out, j)
            ctx.set_state(out, j, ctx.state(src, a))
        else:
            ctx.pin(src, a, reason="repeat tiles this axis")
            ctx.pin(out, j, reason="repeat tiles this axis")


@rule("aten.flip", "aten.roll")
def flip_roll(ctx, node):
    """A flip stays a flip after pruning; a roll of a pruned axis would rotate differently, so it pins."""
    src, out = node.args[0], node.outputs[0]
    is_flip = node.op.startswith("aten.flip")
    if is_flip:
        moves = {d % src.ndim: None for d in arg(node, 1, "dims")}
    else:
        shifts, dims = arg(node, 1, "shifts"), arg(node, 2, "dims", [])
        shifts = [shifts] if isinstance(shifts, int) else list(shifts)
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not dims:  # roll of the flattened tensor
            pin_all(ctx, node, "roll without dims mixes every axis")
            return
        moves = {d % src.ndim: s for d, s in zip(dims, shifts)}
    for a in range(src.ndim):
        n = src.shape[a]
        i = np.arange(n)
        if a in moves and not is_flip:
            ctx.pin(src, a, reason="roll rotates this axis")
            ctx.pin(out, a, reason="roll rotates this axis")
            p = (i - moves[a]) % n
        elif a in moves:
            p = n - 1 - i
        else:
            p = i
        ctx.tie(src, a, out, a, p, i)
        ctx.set_state(out, a, ctx.state(src, a)[p])
