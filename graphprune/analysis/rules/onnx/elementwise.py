"""Activations, arithmetic with numpy broadcasting, comparisons, Where, Clip, PRelu, casts."""

from __future__ import annotations

import numpy as np

from ....ir.graph import Node
from ...context import pin_all
from ..common import broadcast, combine_add, identity
from ..elementwise import _binary, _unary
from .common import aten, const, onnx_rule

ZERO_PRESERVING = ["Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Tanh", "Softsign", "Abs", "Neg", "Sqrt", "Erf",
                   "Sin", "Sinh", "Tan", "Asin", "Asinh", "Atan", "Atanh", "Sign", "Round", "Floor", "Ceil",
                   "HardSwish", "Mish", "Identity", "Cast", "ThresholdedRelu", "Shrink"]
NOT_ZERO_PRESERVING = ["Sigmoid", "HardSigmoid", "Exp", "Cos", "Cosh", "Acos", "Softplus", "Not", "IsNaN", "IsInf"]
BLOWS_UP_AT_ZERO = ["Reciprocal", "Log"]


for _names, _zero, _blows in ((ZERO_PRESERVING, True, False), (NOT_ZERO_PRESERVING, False, False),
                              (BLOWS_UP_AT_ZERO, False, True)):
    for _name in _names:
        onnx_rule(_name)(_unary(_zero, _blows, view=_name in ("Identity", "Cast")))


@onnx_rule("Trilu")
def trilu(ctx, node):
    aten(ctx, node, "aten.tril.default", (node.args[0],))


@onnx_rule("Dropout")
def dropout(ctx, node):  # inference: the identity; the optional mask output follows the input's axes
    identity(ctx, node.args[0], node.outputs[0], True)
    for extra in node.outputs[1:]:
        identity(ctx, node.args[0], extra, False)


_ADD, _MUL, _DIV, _OTHER = (_binary(k) for k in ("add", "mul", "div", "other"))


def _binary_rule(fn):
    def apply(ctx, node):
        fn(ctx, Node(node.id, node.op, (node.args[0], node.args[1]), {}, node.outputs, node.scope))
    return apply


for _names, _fn in ((("Add", "Sub"), _ADD), (("Mul", "And"), _MUL), (("Div", "Mod"), _DIV),
                    (("Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Or", "Xor", "BitShift"), _OTHER)):
    onnx_rule(*_names)(_binary_rule(_fn))


@onnx_rule("Pow")
def pow_(ctx, node):
    exponent = const(node, 1)
    if exponent is not None and exponent.size == 1 and float(exponent.reshape(-1)[0]) > 0:
        identity(ctx, node.args[0], node.outputs[0], True)
        return
    _OTHER(ctx, node)


@onnx_rule("Sum", "Max", "Min", "Mean")
def variadic(ctx, node):
    broadcast(ctx, [v for v in node.args if v is not None], node.outputs[0], combine_add)


@onnx_rule("Where")
def where(ctx, node):
    aten(ctx, node, "aten.where.self", node.args[:3])


@onnx_rule("Clip")
def clip(ctx, node):
    src, out = node.args[0], node.outputs[0]
    if "min" in node.kwargs or "max" in node.kwargs:  # opset < 11
        lo, hi = node.kwargs.get("min"), node.kwargs.get("max")
    else:
        bounds = [const(node, i) if i < len(node.args) and node.args[i] is not None else np.array(np.nan)
                  for i in (1, 2)]
        if any(b is None for b in bounds):
            pin_all(ctx, node, "Clip bounds computed at run time")
            return
        lo, hi = (None if np.isnan(b).all() else float(b.reshape(-1)[0]) for b in bounds)
    identity(ctx, src, out, (lo is None or lo <= 0) and (hi is None or hi >= 0))


@onnx_rule("PRelu")
def prelu(ctx, node):
    """prelu(0) = 0 whatever the slope: the output is zero where the input is."""
    x, slope, out = node.args[0], node.args[1], node.outputs[0]
    broadcast(ctx, [x, slope], out, lambda states: np.broadcast_to(np.asarray(states[0], dtype=np.int8),
                                                                    np.shape(combine_add(states))).copy())

