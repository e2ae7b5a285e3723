"""Elementwise ops: activations, arithmetic with broadcasting, comparisons, type casts.

Axes line up from the right; equal-sized axes are tied. What a masked (zeroed) channel becomes depends
on the op: relu(0) = 0 keeps it zero, sigmoid(0) = 0.5 makes it a constant, and x + y with y not masked
makes it input-dependent. Consumers downstream then decide whether removal is still exact.
"""

from __future__ import annotations

import numpy as np

from . import rule
from .common import DEP, INDEP, ZERO, arg, broadcast, combine_add, combine_mul, copy_param_view, identity

ZERO_PRESERVING = [
    "relu", "relu_", "silu", "silu_", "gelu", "gelu_", "tanh", "tanh_", "hardswish", "hardswish_",
    "leaky_relu", "leaky_relu_", "elu", "elu_", "mish", "mish_", "neg", "neg_", "abs", "abs_", "sqrt",
    "erf", "sin", "sign", "round", "atan", "asinh", "selu", "celu", "softshrink", "hardshrink", "square",
    "clone", "_to_copy", "contiguous", "detach", "alias", "detach_", "lift_fresh", "lift_fresh_copy", "dropout", "native_dropout",
    "relu6", "trunc", "frac", "expm1", "log1p", "tan", "sinh", "atanh", "arcsin",
]
NOT_ZERO_PRESERVING = ["sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "exp", "exp_", "cos", "cosh", "softplus",
                       "logical_not", "bitwise_not", "erfc", "log_sigmoid_forward", "exp2"]
BLOWS_UP_AT_ZERO = ["reciprocal", "rsqrt", "log", "log2", "log10", "digamma", "lgamma"]
VIEW_LIKE = ["detach", "alias", "lift_fresh", "_to_copy", "clone", "contiguous"]


def _unary(f0_zero: bool, blows_up: bool = False, view: bool | None = None):
    """Rule of a same-shape elementwise op; view: its output is its input (None: decide by ATen name)."""
    def apply(ctx, node):
        src = node.args[0]
        if not hasattr(src, "shape") or not node.outputs:
            return
        out = node.outputs[0]
        if out.shape != src.shape:
            from ..context import pin_all
            pin_all(ctx, node, "unary op changed the shape")
            return
        identity(ctx, src, out, f0_zero)
        if blows_up:
            for a in range(src.ndim):
                ctx.forbid_zero(src, a, f"{node.op} of a removed (zero) channel is not finite")
        if view or (view is None and node.op.split(".")[1] in VIEW_LIKE):
            copy_param_view(src, out, list(range(out.ndim)))
    return apply


for _name in ZERO_PRESERVING:
    rule(f"aten.{_name}")(_unary(True))
for _name in NOT_ZERO_PRESERVING:
    rule(f"aten.{_name}")(_unary(False))
for _name in BLOWS_UP_AT_ZERO:
    rule(f"aten.{_name}")(_unary(False, blows_up=True))


@rule("aten.tril", "aten.tril_", "aten.triu", "aten.triu_")
def triangle(ctx, node):
    """Zeroes a triangle of the last two axes: removing positions there would move the diagonal."""
    src, out = node.args[0], node.outputs[0]
    identity(ctx, src, out, True)
    for a in (src.ndim - 2, src.ndim - 1):
        ctx.pin(src, a, reason="tril / triu keep a triangle of this axis")


@rule("aten.hardtanh", "aten.hardtanh_", "aten.clamp", "aten.clamp_", "aten.clamp_min", "aten.clamp_min_",
      "aten.clamp_max", "aten.clamp_max_", "aten.threshold", "aten.leaky_relu")
def clamp(ctx, node):
    src, out = node.args[0], node.outputs[0]
    lo = arg(node, 1, "min_val", arg(node, 1, "min", None))
    hi = arg(node, 2, "max_val", arg(node, 2, "max", None))
    name = node.op.split(".")[1]
    if name.startswith("clamp_max"):
        lo, hi = None, arg(node, 1, "max")
    if name.startswith("hardtanh"):
        lo = -1.0 if lo is None else lo
        hi = 1.0 if hi is None else hi
    if name == "threshold":  # threshold(x, t, v): x <= t -> v
        keeps_zero = arg(node, 2, "value") == 0 or arg(node, 1, "threshold") < 0
    elif name.startswith("leaky_relu"):
        keeps_zero = True
    else:  # clamp(0, lo, hi) is 0 when lo <= 0 <= hi; tensor bounds are not assumed to allow that
        scalar = not hasattr(lo, "shape") and not hasattr(hi, "shape")
        keeps_zero = scalar and (lo is None or lo <= 0) and (hi is None or hi >= 0)
    broadcast(ctx, [src] + [b for b in (lo, hi) if hasattr(b, "shape")], out, combine_add)
    if not keeps_zero:
        for a in range(out.ndim):
            st = ctx.state(out, a)
            ctx.set_state(out, a, np.where(st == ZERO, INDEP, st))


def _binary(kind: str):
    def apply(ctx, node):
        a, b = node.args[0], arg(node, 1, "other")
        out = node.outputs[0]
        operands = [a, b]
        if kind == "add":
            broadcast(ctx, operands, out, combine_add)
        elif kind == "mul":
            broadcast(ctx, operands, out, combine_mul)
        elif kind == "div":  # x / y is zero where x is; y zero would blow up
            if hasattr(b, "shape"):
                for ax in range(b.ndim):
                    if b.shape[ax] == out.shape[out.ndim - b.ndim + ax]:
                        ctx.forbid_zero(b, ax, "division by a removed (zero) channel")
            broadcast(ctx, operands, out, lambda sts: _div_state(sts))
        else:  # comparisons and the like: zero maps to something else
            broadcast(ctx, operands, out, lambda sts: np.where(combine_add(sts) == ZERO, INDEP,
                                                              combine_add(sts)).astype(np.int8))
    return apply


def _div_state(states):
    num = np.broadcast_to(np.asarray(states[0], dtype=np.int8), np.shape(combine_add(states)))
    worst = combine_add(states)
    return np.where(num == ZERO, ZERO, worst).astype(np.int8)


for _name in ["add", "add_", "sub", "sub_", "rsub", "maximum", "minimum", "fmax", "fmin"]:
    rule(f"aten.{_name}")(_binary("add"))
for _name in ["mul", "mul_", "logical_and", "bitwise_and"]:
    rule(f"aten.{_name}")(_binary("mul"))
for _name in ["div", "div_", "remainder", "fmod", "floor_divide"]:
    rule(f"aten.{_name}")(_binary("div"))
for _name in ["eq", "ne", "gt", "ge", "lt", "le", "pow", "logical_or", "bitwise_or", "atan2", "copysign",
              "hypot", "xlogy"]:
    rule(f"aten.{_name}")(_binary("other"))


@rule("aten.pow.Tensor_Scalar")
def pow_scalar(ctx, node):
    exponent = arg(node, 1, "exponent")
    identity(ctx, node.args[0], node.outputs[0], f0_zero=exponent > 0)


@rule("aten.where.self", "aten.where.ScalarOther", "aten.where.ScalarSelf", "aten.where.Scalar")
def where(ctx, node):
    cond, a, b = node.args[0], node.args[1], node.args[2]
    out = node.outputs[0]

    def comb(states):
        c, x, y = states
        values = combine_add([x, y])
        return np.where(np.asarray(c) == DEP, np.maximum(values, DEP), values).astype(np.int8)
    broadcast(ctx, [cond, a, b], out, comb)


@rule("aten.masked_fill.Scalar", "aten.masked_fill_.Scalar", "aten.masked_fill.Tensor")
def masked_fill(ctx, node):
    x, mask, value = node.args[0], node.args[1], node.args[2]
    zero_fill = not hasattr(value, "shape") and value == 0

    def comb(states):
        worst = combine_add(states)
        if zero_fill:  # a zero channel stays zero whatever the mask
            return np.where(np.asarray(states[0]) == ZERO, ZERO, worst).astype(np.int8)
        return np.maximum(worst, INDEP).astype(np.int8)
    broadcast(ctx, [x, mask], node.outputs[0], comb)


@rule("aten.addcmul", "aten.addcdiv", "aten.lerp.Scalar", "aten.lerp.Tensor")
def ternary(ctx, node):
    operands = [x for x in node.args[:3] if hasattr(x, "shape")]
    broadcast(ctx, operands, node.outputs[0], combine_add)


@rule("aten.zeros", "aten.ones", "aten.empty", "aten.full", "aten.arange", "aten.zeros_like", "aten.empty_like",
      "aten.ones_like", "aten.full_like", "aten.scalar_tensor", "aten.randn", "aten.rand", "aten.new_zeros",
      "aten.new_ones", "aten.new_empty", "aten.new_full", "aten.empty_strided", "aten.linspace", "aten.eye",
      "aten.randn_like", "aten.rand_like", "aten.empty_permuted", "aten.randint",
      "aten.bernoulli")
def creation(ctx, node):
    """New tensors: their axes are tied to nothing; `*_like` reads only its input's shape."""
    for v in node.tensor_inputs():
        for a in range(v.ndim):
            ctx.handled.add((v.id, a))
    for out in node.outputs:
        for a in range(out.ndim):
            ctx.set_state(out, a, DEP if out.depends_on_input else INDEP)
    if node.op.startswith(("aten.arange", "aten.linspace", "aten.eye")):  # values are positions
        for out in node.outputs:
            ctx.pin(out, reason=f"{node.op.split('.')[1]} holds positions: removing one would change the others")
