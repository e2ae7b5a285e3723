"""Ops with weights: convolution (1d/2d/3d, grouped, depthwise, transposed), mm / addmm / bmm /
baddbmm, and embedding. They own an output space (weight rows: producers) and consume an input space
(weight columns: consumers, which need a removed channel to be exactly zero)."""

from __future__ import annotations

import math
import re

import numpy as np

from ...ir.graph import Value
from ..context import DEP, ZERO, pin_all
from . import rule
from .common import arg, combine_add, combine_mul


@rule("aten.convolution", "aten._convolution", "aten.conv2d", "aten.conv1d", "aten.conv3d")
def convolution(ctx, node):
    x, w = node.args[0], node.args[1]
    bias = arg(node, 2, "bias")
    out = node.outputs[0]
    if node.op.split(".")[1] in ("conv1d", "conv2d", "conv3d"):
        transposed, groups = False, arg(node, 6, "groups", 1)
    else:
        transposed, groups = bool(arg(node, 6, "transposed")), arg(node, 8, "groups", 1)
    if not isinstance(w, Value) or w.ndim != x.ndim:
        pin_all(ctx, node, "convolution with an unbatched input")
        return
    ci, co = x.shape[1], out.shape[1]
    # batch axis passes through
    ctx.tie(x, 0, out, 0)
    ctx.set_state(out, 0, DEP)
    w_out_axis, w_in_axis = (1, 0) if transposed else (0, 1)
    if groups == 1:
        ctx.tie(x, 1, w, w_in_axis)
        ctx.mark_consumer(w, w_in_axis)
        ctx.require_zero(x, 1, "convolution input")
        ctx.tie(w, w_out_axis, out, 1)
    else:
        # whole groups are removed together: input block g, weight rows of block g, output block g
        ci_g, co_g = ci // groups, co // groups
        xi = np.arange(ci)
        oi = np.arange(co)
        blocks_in, blocks_out = xi // ci_g, oi // co_g
        first_out_of_block = np.arange(groups) * co_g
        ctx.tie(x, 1, out, 1, xi, first_out_of_block[blocks_in])
        ctx.tie(out, 1, out, 1, oi, first_out_of_block[blocks_out])
        # a removed group's inputs feed only that group's outputs, whose weights are zeroed by mask()
        if transposed:  # weight [Ci, Co/g, ...]: rows follow the input channels
            ctx.tie(x, 1, w, 0)
            ctx.pin(w, 1, reason="transposed grouped convolution keeps its per-group width")
        else:
            ctx.tie(w, 0, out, 1)
            ctx.handled.add((w.id, 1))  # per-group input width is kept whole
    st = np.full(co, ZERO, dtype=np.int8)
    if isinstance(bias, Value):
        ctx.tie(bias, 0, out, 1)
    ctx.set_state(out, 1, st)
    for a in range(2, out.ndim):
        ctx.set_state(out, a, DEP)
    for a in range(2, x.ndim):  # the kernel slides over these: removing positions would shift the windows
        ctx.pin(x, a, reason="convolution slides its kernel over this axis")
    for a in range(2, w.ndim):
        ctx.handled.add((w.id, a))
    if transposed:
        ctx.add_flops(2 * math.prod(x.shape[2:]) * math.prod(w.shape[2:]),
                      [(x, 0), (w, 0), (w, 1)])
    else:
        ctx.add_flops(2 * math.prod(out.shape[2:]) * math.prod(w.shape[2:]),
                      [(out, 0), (w, 0), (w, 1)])


def _contract(ctx, a: Value, ka: int, b: Value, kb: int) -> None:
    """Tie the contracted axes of a @ b and demand exact zeros on the side that is not a weight."""
    ctx.tie(a, ka, b, kb)
    a_w, b_w = ctx.is_param_like(a), ctx.is_param_like(b)
    if b_w and not a_w:
        ctx.mark_consumer(b, kb)
        ctx.require_zero(a, ka, "matmul input")
    elif a_w and not b_w:
        ctx.mark_consumer(a, ka)
        ctx.require_zero(b, kb, "matmul input")
    else:
        ctx.require_zero(a, ka, "product of two activations", ok=ctx.state(b, kb) == ZERO)


def _matmul_2d(ctx, a: Value, b: Value, out: Value, bias=None, batch: bool = False):
    lead = 1 if batch else 0
    if batch:
        ctx.tie(a, 0, out, 0)
        ctx.tie(b, 0, out, 0)
        ctx.set_state(out, 0, combine_mul([ctx.state(a, 0), ctx.state(b, 0)]))
    _contract(ctx, a, lead + 1, b, lead)
    ctx.tie(a, lead, out, lead)
    ctx.tie(b, lead + 1, out, lead + 1)
    rows, cols = ctx.state(a, lead), ctx.state(b, lead + 1)
    if isinstance(bias, Value):  # bias broadcasts against the output: tie the axes that line up
        for j in (lead, lead + 1):
            ax = bias.ndim - (out.ndim - j)
            if ax >= 0 and bias.shape[ax] == out.shape[j]:
                ctx.tie(bias, ax, out, j)
                extra = ctx.state(bias, ax)
            else:
                if ax >= 0:
                    ctx.handled.add((bias.id, ax))
                extra = np.int8(ctx.whole(bias))
            if j == lead:
                rows = combine_add([rows, extra])
            else:
                cols = combine_add([cols, extra])
    ctx.set_state(out, lead, rows)
    ctx.set_state(out, lead + 1, cols)
    factors = [(a, lead), (a, lead + 1), (b, lead + 1)]
    if batch:
        factors.insert(0, (a, 0))
    ctx.add_flops(2, factors)


@rule("aten.matmul")
def matmul(ctx, node):
    """torch.matmul / ONNX MatMul (recorded whole, not as the bmm its decomposition picks for these shapes):
    batch axes broadcast, a's last axis contracts with b's second-last (1-d operands get a unit axis that is
    then dropped)."""
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


@rule("aten.einsum")
def einsum(ctx, node):
    """torch.einsum / ONNX Einsum, explicit equations without ellipsis: letters in the output tie across
    operands; a letter summed away contracts (two operands) or reduces (one), which needs removed channels to be
    exact zeros. Recorded whole, as its decomposition folds axes differently at batch 1."""
    eq, ops = node.args[0].replace(" ", ""), [v for v in node.args[1] if isinstance(v, Value)]
    out = node.outputs[0]
    if "..." in eq or "->" not in eq or len(ops) > 2:
        pin_all(ctx, node, "einsum with an ellipsis, an implicit output or more than two operands")
        return
    lhs, rhs = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != len(ops) or any(len(t) != v.ndim or len(set(t)) != len(t) for t, v in zip(terms, ops)) or \
            len(rhs) != out.ndim or not re.fullmatch(r"[A-Za-z]*", rhs):
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


@rule("aten.mm")
def mm(ctx, node):
    _matmul_2d(ctx, node.args[0], node.args[1], node.outputs[0])


@rule("aten.addmm")
def addmm(ctx, node):
    _matmul_2d(ctx, node.args[1], node.args[2], node.outputs[0], bias=node.args[0])


@rule("aten.bmm")
def bmm(ctx, node):
    _matmul_2d(ctx, node.args[0], node.args[1], node.outputs[0], batch=True)


@rule("aten.baddbmm")
def baddbmm(ctx, node):
    _matmul_2d(ctx, node.args[1], node.args[2], node.outputs[0], bias=node.args[0], batch=True)


@rule("aten.embedding")
def embedding(ctx, node):
    """embedding(weight, indices): the embedding columns are the output's last axis."""
    w, idx, out = node.args[0], node.args[1], node.outputs[0]
    ctx.tie(w, 1, out, out.ndim - 1)
    ctx.mark_producer(w, 1)
    ctx.set_state(out, out.ndim - 1, np.full(w.shape[1], ZERO, dtype=np.int8))
    ctx.pin(w, 0, reason="embedding rows are chosen by the input ids")
    for a in range(idx.ndim):
        ctx.tie(idx, a, out, a)
        ctx.set_state(out, a, DEP)
