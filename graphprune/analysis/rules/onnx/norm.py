"""BatchNormalization, LayerNormalization, InstanceNormalization, GroupNormalization."""

from __future__ import annotations

from ...context import pin_all
from .common import aten, attr, onnx_rule


@onnx_rule("BatchNormalization")
def batch_norm(ctx, node):
    aten(ctx, node, "aten.native_batch_norm.default", node.args[:5])


@onnx_rule("LayerNormalization")
def layer_norm(ctx, node):
    x = node.args[0]
    axis = attr(node, "axis", -1) % x.ndim
    scale = node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    aten(ctx, node, "aten.native_layer_norm.default", (x, list(x.shape[axis:]), scale, bias))


@onnx_rule("InstanceNormalization")
def instance_norm(ctx, node):
    x, scale, bias = node.args[:3]
    aten(ctx, node, "aten.native_group_norm.default", (x, scale, bias, x.shape[0], x.shape[1], 0, x.shape[1]))


@onnx_rule("GroupNormalization")
def group_norm(ctx, node):
    x, scale, bias = node.args[:3]
    if scale.ndim != 1 or scale.shape[0] != x.shape[1]:  # opset 18: one scale per group
        pin_all(ctx, node, "GroupNormalization with one scale per group")
        return
    aten(ctx, node, "aten.native_group_norm.default",
         (x, scale, bias, x.shape[0], x.shape[1], 0, attr(node, "num_groups")))
