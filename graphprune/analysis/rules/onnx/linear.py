"""Conv, ConvTranspose, Gemm, MatMul and Einsum: weight rows produce channels, columns consume them."""

from __future__ import annotations

import numpy as np

from ....ir.graph import Value
from ..common import combine_add
from ..linear import _contract
from .common import aten, attr, onnx_rule


@onnx_rule("Conv")
def conv(ctx, node):
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    aten(ctx, node, "aten.convolution.default", (x, w, b, None, None, None, False, None, attr(node, "group", 1)))


@onnx_rule("ConvTranspose")
def conv_transpose(ctx, node):
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    aten(ctx, node, "aten.convolution.default", (x, w, b, None, None, None, True, None, attr(node, "group", 1)))


def _bias(ctx, bias, out: Value, j: int):
    """State a broadcast bias adds to output axis j (tying the axes that line up)."""
    ax = bias.ndim - (out.ndim - j)
    if ax >= 0 and bias.shape[ax] == out.shape[j]:
        ctx.tie(bias, ax, out, j)
        return ctx.state(bias, ax)
    if ax >= 0:
        ctx.handled.add((bias.id, ax))
    return np.int8(ctx.whole(bias))


@onnx_rule("Gemm")
def gemm(ctx, node):
    """Y = alpha * A' B' + beta * C with A' = A^T if transA, B' = B^T if transB (both 2-d)."""
    a, b = node.args[0], node.args[1]
    c = node.args[2] if len(node.args) > 2 else None
    out = node.outputs[0]
    ka, kb = (0 if attr(node, "transA", 0) else 1), (1 if attr(node, "transB", 0) else 0)
    _contract(ctx, a, ka, b, kb)
    ctx.tie(a, 1 - ka, out, 0)
    ctx.tie(b, 1 - kb, out, 1)
    rows, cols = ctx.state(a, 1 - ka), ctx.state(b, 1 - kb)
    if isinstance(c, Value):
        rows = combine_add([rows, _bias(ctx, c, out, 0)])
        cols = combine_add([cols, _bias(ctx, c, out, 1)])
    ctx.set_state(out, 0, rows)
    ctx.set_state(out, 1, cols)
    ctx.add_flops(2, [(a, 1 - ka), (a, ka), (b, 1 - kb)])


@onnx_rule("MatMul")
def matmul(ctx, node):
    aten(ctx, node, "aten.matmul.default", (node.args[0], node.args[1]))


@onnx_rule("Einsum")
def einsum(ctx, node):
    eq = attr(node, "equation", "")
    eq = eq.decode() if isinstance(eq, bytes) else eq
    aten(ctx, node, "aten.einsum.default", (eq, [v for v in node.args if isinstance(v, Value)]))
