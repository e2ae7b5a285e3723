"""QuantizeLinear / DequantizeLinear, per tensor or per channel (scale and zero point along `axis`).

dq(q(x)) with the same scale and zero point maps 0 to 0, so a Q -> DQ pair keeps a removed channel zero.
A dequantized weight is a view of its integer initializer: its rows are zeroed (with their scales) and
sliced like a float weight's, its zero points sliced along.
"""

from __future__ import annotations

import numpy as np

from ....ir.graph import Value
from ...context import INDEP, ZERO
from ..common import combine_mul, copy_param_view
from .common import attr, onnx_rule


def _axes(ctx, node):
    """Tie the input to the output axis by axis, and per-channel scale / zero point to `axis`."""
    x, out = node.args[0], node.outputs[0]
    axis = attr(node, "axis", 1) % max(x.ndim, 1)
    for a in range(x.ndim):
        ctx.tie(x, a, out, a)
    channel = []
    for p in node.args[1:3]:
        if isinstance(p, Value) and p.ndim == 1 and p.shape[0] == x.shape[axis] and x.shape[axis] > 1:
            ctx.tie(p, 0, out, axis)
            channel.append(p)
        elif isinstance(p, Value) and p.ndim >= 1 and max(p.shape) > 1:  # blocked (opset 21 block_size)
            for a in range(p.ndim):
                ctx.pin(p, a, reason=f"{node.op} with blocked scales")
            for a in range(x.ndim):
                ctx.pin(x, a, reason=f"{node.op} with blocked scales")
    return x, out, axis, channel


def _zero_point_is_zero(node) -> bool:
    zp = node.args[2] if len(node.args) > 2 else None
    return zp is None or (zp.data is not None and not np.asarray(zp.data).any())


@onnx_rule("QuantizeLinear")
def quantize(ctx, node):
    x, out, _, _ = _axes(ctx, node)
    zero = _zero_point_is_zero(node)
    for a in range(x.ndim):
        st = ctx.state(x, a)
        ctx.set_state(out, a, st if zero else np.where(st == ZERO, INDEP, st))


@onnx_rule("DequantizeLinear")
def dequantize(ctx, node):
    x, out, axis, channel = _axes(ctx, node)
    src = x.producer
    if src is not None and src.op == "onnx.QuantizeLinear" and _same_parameters(src, node):
        for a in range(x.ndim):  # dq(q(0)) = 0
            ctx.set_state(out, a, ctx.state(src.args[0], a))
        return
    zero = _zero_point_is_zero(node)
    for a in range(x.ndim):
        st = ctx.state(x, a)
        st = st if zero else np.where(st == ZERO, INDEP, st)
        scale = [ctx.state(p, 0) for p in channel[:1]] if a == axis else []
        ctx.set_state(out, a, combine_mul([st] + scale))  # a zeroed scale zeroes the channel
    if ctx.is_param_like(x):
        copy_param_view(x, out, list(range(out.ndim)))


def _same_parameters(q, dq) -> bool:
    for i in (1, 2):
        a = q.args[i] if len(q.args) > i else None
        b = dq.args[i] if len(dq.args) > i else None
        if a is b:
            continue
        if a is None or b is None or a.data is None or b.data is None or not np.array_equal(a.data, b.data):
            return False
    return True
