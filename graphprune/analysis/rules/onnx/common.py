"""Helpers for ONNX rules: registration, folded-constant inputs, calling an ATen rule with a translated node."""

from __future__ import annotations

import numpy as np

from ....ir.graph import CONST, Node, Value
from .. import RULES, rule


def onnx_rule(*op_types: str, shape_inputs: tuple[int, ...] = ()):
    """Register under "onnx.<OpType>". Folded-constant inputs at positions outside `shape_inputs` that
    were computed from run-time widths pin those widths: the rule does not know how they are used."""

    def register(fn):
        def apply(ctx, node):
            for i, v in enumerate(node.args):
                if isinstance(v, Value) and v.kind == CONST:
                    for a in range(v.ndim):
                        ctx.handled.add((v.id, a))
                    if i not in shape_inputs and v.reads:
                        pin_reads(ctx, v.reads, f"{node.op} input {i} is computed from this width at run time")
            fn(ctx, node)

        rule(*(f"onnx.{t}" for t in op_types))(apply)
        return fn

    return register


def pin_reads(ctx, reads, reason: str) -> None:
    for vid, axis in reads:
        ctx.pin(ctx.graph.values[vid], axis, reason=reason)


def aten(ctx, node: Node, op: str, args: tuple, kwargs: dict | None = None, outputs=None) -> None:
    """Run the ATen rule `op` on this node with ATen-style arguments (pins still name the ONNX node)."""
    fn = RULES.get(op) or RULES[op.rsplit(".", 1)[0]]
    fn(ctx, Node(node.id, op, tuple(args), kwargs or {}, node.outputs if outputs is None else outputs, node.scope))


def attr(node: Node, name: str, default=None):
    value = node.kwargs.get(name)
    return default if value is None else value


def const(node: Node, i: int):
    """The data of input i if it is known before the run (a constant, a folded value, or an initializer used
    as an attribute: a Pad value, Clip bounds), else None."""
    v = node.args[i] if i < len(node.args) else None
    if isinstance(v, Value) and v.data is not None and (v.kind == CONST or v.producer is None):
        return np.asarray(v.data)
    return None


def opset(node: Node) -> int:
    """The default-domain opset the node's model imports."""
    graph = getattr(node.target, "graph", None)
    if graph is not None and "" in graph.opset_imports:
        return int(graph.opset_imports[""])
    return 21


def target_elements(ctx, node: Node, pos: int, out: Value, align_right: bool = False) -> None:
    """A shape-like input (Reshape target, Expand shape, Resize sizes): element i sets output axis i.
    A literal is rewritten by the backend; an element that copies a width at run time ties that width to
    the axis (both must stay equal); an expression of widths pins them and the axis."""
    s = node.args[pos] if pos < len(node.args) else None
    if not isinstance(s, Value) or s.kind != CONST:
        if isinstance(s, Value):
            for a in range(out.ndim):
                ctx.pin(out, a, reason=f"{node.op} takes its shape from a tensor computed at run time")
            ctx.handled.add((s.id, 0))
        return
    if s.sources is None:
        if s.reads:
            pin_reads(ctx, s.reads, f"{node.op} shape is computed from this width at run time")
            for a in range(out.ndim):
                ctx.pin(out, a, reason=f"{node.op} shape is computed from run-time widths")
        return
    lead = out.ndim - len(s.sources) if align_right else 0
    for i, e in enumerate(s.sources):
        j = i + lead
        if e is None or not 0 <= j < out.ndim:
            continue
        if isinstance(e, tuple):
            v, a = ctx.graph.values[e[0]], e[1]
            if v.shape[a] == out.shape[j]:
                ctx.tie(v, a, out, j)
                continue
            ctx.pin(v, a, reason=f"{node.op} reads this width at run time for an axis of another size")
        else:
            pin_reads(ctx, e, f"{node.op} computes an output width from this width at run time")
        ctx.pin(out, j, reason=f"{node.op} computes this width at run time")
