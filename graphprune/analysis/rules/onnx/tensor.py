"""Concat, Split, Slice, Gather, GatherND, Pad, pooling, Resize, reductions, Softmax, ArgMax/TopK, CumSum."""

from __future__ import annotations

import numpy as np

from ....ir.graph import CONST, Value
from ...context import DEP, INDEP, ZERO, pin_all
from ..common import norm_dims
from .common import aten, attr, const, onnx_rule, opset, target_elements


@onnx_rule("Concat")
def concat(ctx, node):
    aten(ctx, node, "aten.cat.default", ([v for v in node.args if isinstance(v, Value)], attr(node, "axis")))


@onnx_rule("Split")
def split(ctx, node):
    src = node.args[0]
    aten(ctx, node, "aten.split_with_sizes.default",
         (src, [o.shape[attr(node, "axis", 0) % src.ndim] for o in node.outputs], attr(node, "axis", 0)))


def slice_indices(node, src: Value) -> dict[int, tuple[int, int, int]] | None:
    """axis -> (start, end, step) of a Slice, from its attributes (opset < 10) or constant inputs."""
    if opset(node) < 10 or "starts" in node.kwargs:
        starts, ends, axes, steps = (attr(node, "starts"), attr(node, "ends"), attr(node, "axes"), None)
    else:
        parts = [const(node, i) for i in range(1, 5)]
        if parts[0] is None or parts[1] is None or any(
                p is None and i + 1 < len(node.args) and node.args[i + 1] is not None for i, p in enumerate(parts)):
            return None
        starts, ends, axes, steps = [None if p is None else p.reshape(-1).tolist() for p in parts]
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    return {int(a) % src.ndim: (int(s), int(e), int(st)) for a, s, e, st in zip(axes, starts, ends, steps)}


@onnx_rule("Slice")
def slice_(ctx, node):
    """Each sliced axis keeps its source positions; a strided slice keeps its axis whole (the kept set of
    a pruned axis is no longer a stride)."""
    src, out = node.args[0], node.outputs[0]
    bounds = slice_indices(node, src)
    if bounds is None:
        pin_all(ctx, node, "Slice bounds computed at run time")
        return
    dynamic = any(isinstance(v, Value) and v.reads for v in node.args[1:3])
    for a in range(src.ndim):
        if a not in bounds:
            ctx.tie(src, a, out, a)
            ctx.set_state(out, a, ctx.state(src, a))
            continue
        start, end, step = bounds[a]
        idx = np.arange(src.shape[a])[slice(start, end, step)]
        if len(idx) != out.shape[a]:
            pin_all(ctx, node, "Slice bounds graphprune could not follow")
            return
        if step != 1:
            ctx.pin(src, a, reason="strided Slice of this axis")
        if dynamic:  # the backend could not move bounds computed at run time
            ctx.pin(src, a, reason="Slice bounds of this axis are computed at run time")
        ctx.tie(src, a, out, a, idx, None)
        ctx.set_state(out, a, ctx.state(src, a)[idx])


@onnx_rule("Gather")
def gather(ctx, node):
    data, index, out = node.args[0], node.args[1], node.outputs[0]
    axis = attr(node, "axis", 0) % data.ndim
    if index.kind != CONST:
        if ctx.is_param_like(data) and data.ndim == 2 and axis == 0:  # an embedding lookup
            aten(ctx, node, "aten.embedding.default", (data, index))
            return
        ctx.pin(data, axis, reason="Gather picks data-chosen indices of this axis")
        for a in range(index.ndim):
            ctx.handled.add((index.id, a))
        _tie_around(ctx, data, axis, out, index.ndim)
        return
    _gather_fixed(ctx, data, axis, np.asarray(index.data).astype(np.int64), out)


@onnx_rule("GatherND")
def gather_nd(ctx, node):
    """Constant indices of one coordinate each (shape [..., 1], no batch dims) are a Gather on axis 0: the dynamo
    exporter writes x[:, [0, 3]] that way, after moving the indexed axis first. Other forms pin."""
    data, index, out = node.args[0], node.args[1], node.outputs[0]
    if index.kind != CONST or attr(node, "batch_dims", 0) or index.ndim < 1 or index.shape[-1] != 1:
        pin_all(ctx, node, "GatherND with indices computed at run time, several coordinates or batch dims")
        return
    _gather_fixed(ctx, data, 0, np.asarray(index.data).astype(np.int64)[..., 0], out)


def _gather_fixed(ctx, data: Value, axis: int, idx: np.ndarray, out: Value) -> None:
    idx = idx % max(data.shape[axis], 1)
    if idx.ndim == 1 and len(np.unique(idx)) == len(idx):  # a fixed selection: positions follow the source
        ctx.tie(data, axis, out, axis, idx, None)
        ctx.set_state(out, axis, ctx.state(data, axis)[idx])
        _tie_around(ctx, data, axis, out, 1)
        return
    ctx.pin(data, axis, idx.reshape(-1), reason="Gather reads fixed indices of this axis as whole tensors")
    ctx.handled.add((data.id, axis))
    for a in range(out.ndim):
        ctx.set_state(out, a, DEP if data.depends_on_input else INDEP)
    _tie_around(ctx, data, axis, out, idx.ndim)


def _tie_around(ctx, data: Value, axis: int, out: Value, index_ndim: int) -> None:
    """Tie data's axes before and after `axis` to the output (whose index axes replace `axis`)."""
    for a in range(data.ndim):
        if a == axis:
            continue
        j = a if a < axis else a - 1 + index_ndim
        if j < out.ndim and data.shape[a] == out.shape[j]:
            ctx.tie(data, a, out, j)
            ctx.set_state(out, j, ctx.state(data, a))


@onnx_rule("Pad")
def pad(ctx, node):
    src, out = node.args[0], node.outputs[0]
    pads = attr(node, "pads") if opset(node) < 11 else const(node, 1)
    value = attr(node, "value", 0.0) if opset(node) < 11 else const(node, 2)
    value = 0.0 if value is None or np.size(value) == 0 else float(np.asarray(value).reshape(-1)[0])
    axes = const(node, 3)
    if pads is None:
        pin_all(ctx, node, "Pad widths computed at run time")
        return
    pads = np.asarray(pads).reshape(-1).tolist()
    axes = list(range(src.ndim)) if axes is None else [int(a) % src.ndim for a in axes.reshape(-1)]
    before, after = [0] * src.ndim, [0] * src.ndim
    for k, a in enumerate(axes):
        before[a], after[a] = pads[k], pads[k + len(axes)]
    if min(before + after) < 0:
        pin_all(ctx, node, "negative padding crops the tensor")
        return
    mode = attr(node, "mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    for a in range(src.ndim):
        n = src.shape[a]
        if (before[a] or after[a]) and mode != "constant":
            ctx.pin(src, a, reason=f"{mode} padding copies elements of this axis")
        ctx.tie(src, a, out, a, None, np.arange(before[a], before[a] + n))
        st = np.full(out.shape[a], ZERO if value == 0 and mode == "constant" else INDEP, dtype=np.int8)
        st[before[a]:before[a] + n] = ctx.state(src, a)
        ctx.set_state(out, a, st if value == 0 else np.maximum(st, INDEP))


def _channelwise(ctx, node) -> None:
    """Each channel on its own over the spatial axes (the ATen pooling rule, N-d)."""
    x = node.args[0]
    if not 1 <= x.ndim - 2 <= 3:
        pin_all(ctx, node, f"{node.op} on a {x.ndim}-d tensor")
        return
    aten(ctx, node, f"aten.adaptive_avg_pool{x.ndim - 2}d.default", (x,))


@onnx_rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def pool(ctx, node):
    _channelwise(ctx, node)
    if len(node.outputs) > 1:  # MaxPool's indices are flat positions that count the channels before
        ctx.pin(node.args[0], 1, reason="MaxPool indices number positions across the channels")
        for a in range(node.outputs[1].ndim):
            ctx.set_state(node.outputs[1], a, DEP)


@onnx_rule("Resize", "Upsample", shape_inputs=(3,))
def resize(ctx, node):
    """Axes whose size does not change pass through (batch, channels, in any layout); resized axes mix
    positions and stay whole, as does every axis a tf_crop_and_resize region or an `axes` list names."""
    x, out = node.args[0], node.outputs[0]
    mode = attr(node, "coordinate_transformation_mode", "half_pixel")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    listed = {int(a) % x.ndim for a in attr(node, "axes", [])}
    for a in range(x.ndim):
        if x.shape[a] == out.shape[a] and mode != "tf_crop_and_resize" and a not in listed:
            ctx.tie(x, a, out, a)
            ctx.set_state(out, a, ctx.state(x, a))
        else:
            ctx.pin(x, a, reason=f"{node.op} resamples this axis")
            ctx.pin(out, a, reason=f"{node.op} resamples this axis")
    if len(node.args) > 3 and not listed:  # sizes, one per axis
        target_elements(ctx, node, 3, out)


_SUM_LIKE = {"ReduceSum", "ReduceSumSquare", "ReduceL1"}  # a removed zero adds nothing (|0| = 0^2 = 0)


@onnx_rule("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin")
def reduce(ctx, node):
    x, out = node.args[0], node.outputs[0]
    op = node.op.split(".", 1)[1]
    if op in ("ArgMax", "ArgMin"):
        axes = [attr(node, "axis", 0)]
    elif "axes" in node.kwargs or opset(node) < (13 if op == "ReduceSum" else 18):
        axes = attr(node, "axes")
    else:
        data = const(node, 1)
        if data is None and len(node.args) > 1 and node.args[1] is not None:
            pin_all(ctx, node, "reduction axes computed at run time")
            return
        axes = None if data is None else data.reshape(-1).tolist()
        if not axes and attr(node, "noop_with_empty_axes", 0):
            aten(ctx, node, "aten.clone.default", (x,))
            return
    dims = norm_dims(axes, x.ndim)
    for a in dims:
        if op in _SUM_LIKE:
            ctx.require_zero(x, a, f"{op} over this axis")
        else:
            ctx.pin(x, a, reason=f"{op} over this axis depends on how many channels there are")
    if op == "ReduceLogSum":  # log(sum of zeros) = -inf
        for a in range(x.ndim):
            if a not in dims:
                ctx.forbid_zero(x, a, "ReduceLogSum of a removed (zero) channel is not finite")
    keepdims = attr(node, "keepdims", 1)
    kept = [a for a in range(x.ndim) if a not in dims]
    for i, a in enumerate(kept):
        j = a if keepdims else i
        if j < out.ndim and out.shape[j] == x.shape[a]:
            ctx.tie(x, a, out, j)
            st = ctx.state(x, a)
            ctx.set_state(out, j, st if op not in ("ArgMax", "ArgMin", "ReduceLogSumExp") else
                          np.where(st == ZERO, INDEP, st))


@onnx_rule("Softmax", "LogSoftmax", "Hardmax")
def softmax(ctx, node):
    x = node.args[0]
    axis = attr(node, "axis", -1 if opset(node) >= 13 else 1) % x.ndim
    if opset(node) < 13:  # the input is flattened to 2-d at `axis`: every later axis is normalized together
        for a in range(axis + 1, x.ndim):
            ctx.pin(x, a, reason=f"{node.op} (opset < 13) normalizes over this axis")
    aten(ctx, node, "aten._softmax.default", (x, axis, False))


@onnx_rule("TopK", "CumSum")
def scan(ctx, node):
    x = node.args[0]
    axis = attr(node, "axis", -1)
    if node.op == "onnx.CumSum":
        data = const(node, 1)
        axis = 0 if data is None else int(data.reshape(-1)[0])
    aten(ctx, node, "aten.sort.default", (x, axis % x.ndim))
