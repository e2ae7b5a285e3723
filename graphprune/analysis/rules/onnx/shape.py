"""Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Expand, Tile: the ATen shape rules, on the recorded
shapes, plus what the shape input says about which widths the pruned graph recomputes."""

from __future__ import annotations

from ..shape import _reorder
from .common import aten, attr, const, onnx_rule, target_elements


@onnx_rule("Reshape", shape_inputs=(1,))
def reshape(ctx, node):
    src, out = node.args[0], node.outputs[0]
    aten(ctx, node, "aten.view.default", (src, list(out.shape)))
    target_elements(ctx, node, 1, out)
    shape = const(node, 1)
    if shape is not None and not attr(node, "allowzero", 0):
        for i, n in enumerate(shape.reshape(-1).tolist()):
            if n == 0 and i < src.ndim:  # 0 copies the input's width at the same position
                ctx.tie(src, i, out, i)


@onnx_rule("Flatten")
def flatten(ctx, node):
    aten(ctx, node, "aten.view.default", (node.args[0], list(node.outputs[0].shape)))


@onnx_rule("Squeeze", "Unsqueeze")
def squeeze(ctx, node):
    aten(ctx, node, "aten.squeeze.default", (node.args[0],))


@onnx_rule("Transpose")
def transpose(ctx, node):
    src, out = node.args[0], node.outputs[0]
    perm = attr(node, "perm")
    _reorder(ctx, src, out, list(perm) if perm is not None else list(range(src.ndim))[::-1])


@onnx_rule("Expand", shape_inputs=(1,))
def expand(ctx, node):
    aten(ctx, node, "aten.expand.default", (node.args[0], list(node.outputs[0].shape)))
    target_elements(ctx, node, 1, node.outputs[0], align_right=True)


@onnx_rule("Tile")
def tile(ctx, node):
    reps = const(node, 1)
    if reps is None:
        from ...context import pin_all
        pin_all(ctx, node, "Tile repeats computed at run time")
        return
    aten(ctx, node, "aten.repeat.default", (node.args[0], [int(r) for r in reps.reshape(-1)]))
