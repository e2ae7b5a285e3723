"""Conv, ConvTranspose, Gemm, MatMul and Einsum: weight rows produce channels, columns consume them."""

from __future__ import annotations

import math
import re

import numpy as np

from ....ir.graph import Value
from ...context import pin_all
from ..common import combine_add, combine_mul
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
    """numpy matmul: batch axes broadcast, a's last axis contracts with b's second-last (1-d operands get
    a unit axis that is then dropped)."""
    a, b, out = node.args[0], node.args[1], node.outputs[0]
    if a.ndim == 1 or b.ndim == 1:
        if a.ndim == 1 and b.ndim == 1:
            _contract(ctx, a, 0, b, 0)
            return
        if b.ndim == 1:  # (..., m, k) @ (k) -> (..., m)
            _contract(ctx, a, -1, b, 0)
            for j in range(out.ndim):
                ctx.tie(a, j, out, j)
                ctx.set_state(out, j, ctx.state(a, j))
            ctx.add_flops(2, [(a, k) for k in range(a.ndim)])
        else:  # (k) @ (..., k, n) -> (..., n)
            _contract(ctx, a, 0, b, -2)
            for j in range(out.ndim - 1):
                ctx.tie(b, j, out, j)
                ctx.set_state(out, j, ctx.state(b, j))
            ctx.tie(b, -1, out, -1)
            ctx.set_state(out, -1, ctx.state(b, -1))
            ctx.add_flops(2, [(b, k) for k in range(b.ndim)])
        return
    batch = out.ndim - 2
    for j in range(batch):
        states = []
        for t in (a, b):
            k = t.ndim - 2 - (batch - j)
            if k >= 0 and t.shape[k] == out.shape[j]:
                ctx.tie(t, k, out, j)
                states.append(ctx.state(t, k))
            else:
                if k >= 0:
                    ctx.handled.add((t.id, k))
                states.append(np.int8(ctx.whole(t)))
        if not any(isinstance(s, np.ndarray) for s in states):
            states[0] = np.full(out.shape[j], states[0], dtype=np.int8)
        ctx.set_state(out, j, combine_mul(states))
    _contract(ctx, a, a.ndim - 1, b, b.ndim - 2)
    ctx.tie(a, a.ndim - 2, out, out.ndim - 2)
    ctx.tie(b, b.ndim - 1, out, out.ndim - 1)
    ctx.set_state(out, out.ndim - 2, ctx.state(a, a.ndim - 2))
    ctx.set_state(out, out.ndim - 1, ctx.state(b, b.ndim - 1))
    ctx.add_flops(2, [(out, j) for j in range(batch)] + [(a, a.ndim - 2), (a, a.ndim - 1), (b, b.ndim - 1)])


@onnx_rule("Einsum")
def einsum(ctx, node):
    """Explicit equations without ellipsis: letters in the output tie across operands; a letter summed
    away contracts (two operands) or reduces (one), which needs removed channels to be exact zeros."""
    eq = attr(node, "equation", "")
    eq = eq.decode() if isinstance(eq, bytes) else eq
    eq = eq.replace(" ", "")
    ops = [v for v in node.args if isinstance(v, Value)]
    out = node.outputs[0]
    if "..." in eq or "->" not in eq or len(ops) > 2:
        pin_all(ctx, node, "einsum with an ellipsis, an implicit output or more than two operands")
        return
    lhs, rhs = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != len(ops) or any(len(t) != v.ndim for t, v in zip(terms, ops)) or len(rhs) != out.ndim or \
            not re.fullmatch(r"[A-Za-z]*", rhs):
        pin_all(ctx, node, f"einsum equation {eq!r} does not match its operands")
        return
    size = {}
    for t, v in zip(terms, ops):
        for letter, n in zip(t, v.shape):
            size[letter] = max(size.get(letter, 1), n)
    for j, letter in enumerate(rhs):
        states = []
        for t, v in zip(terms, ops):
            k = t.find(letter)
            if k < 0:
                states.append(np.int8(ctx.whole(v)))
            elif v.shape[k] == out.shape[j]:
                ctx.tie(v, k, out, j)
                states.append(ctx.state(v, k))
            else:
                ctx.handled.add((v.id, k))
                states.append(np.int8(ctx.whole(v)))
        if not any(isinstance(s, np.ndarray) for s in states):
            states[0] = np.full(out.shape[j], states[0], dtype=np.int8)
        ctx.set_state(out, j, combine_mul(states))
    for letter in set("".join(terms)) - set(rhs):
        where = [(v, t.index(letter)) for t, v in zip(terms, ops) if letter in t]
        if len(where) == 2 and where[0][0].shape[where[0][1]] == where[1][0].shape[where[1][1]]:
            _contract(ctx, where[0][0], where[0][1], where[1][0], where[1][1])
        else:
            for v, k in where:
                ctx.require_zero(v, k, "einsum sum")
    if len(ops) == 2:  # 2 x the product of every letter's size, as for a matmul
        factors, seen = [], set()
        for t, v in zip(terms, ops):
            for k, letter in enumerate(t):
                if letter not in seen and v.shape[k] == size[letter]:
                    seen.add(letter)
                    factors.append((v, k))
        coef = 2 * math.prod(n for letter, n in size.items() if letter not in seen)
        ctx.add_flops(coef, factors)

