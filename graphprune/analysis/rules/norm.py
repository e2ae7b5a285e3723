"""Normalization: batch norm rides along with its channels; layer norm over a channel axis is lossy
(the statistics change when channels go), so that axis is pinned unless the user allows lossy pruning;
group norm mixes the channels of a group and is pinned unless each group is one channel."""

from __future__ import annotations

import numpy as np

from ...ir.graph import Value
from ..context import DEP, INDEP
from . import rule
from .common import arg, root


def _per_channel(ctx, x: Value, out: Value, params: list, axis: int = 1) -> None:
    for a in range(x.ndim):
        ctx.tie(x, a, out, a)
        if a != axis:
            ctx.set_state(out, a, DEP)
    for p in params:
        if isinstance(p, Value) and p.ndim == 1:
            ctx.tie(p, 0, out, axis)


@rule("aten.native_batch_norm", "aten._native_batch_norm_legit_no_training", "aten._native_batch_norm_legit",
      "aten._native_batch_norm_legit_functional", "aten.batch_norm", "aten._batch_norm_with_update",
      "aten._batch_norm_no_update", "aten.miopen_batch_norm", "aten.cudnn_batch_norm")
def batch_norm(ctx, node):
    x, weight, bias = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
    rmean, rvar = arg(node, 3, "running_mean"), arg(node, 4, "running_var")
    out = node.outputs[0]
    _per_channel(ctx, x, out, [weight, bias, rmean, rvar])
    if isinstance(weight, Value):  # masked weight (and bias) make the channel exactly zero
        st = ctx.state(weight, 0).copy()
        if isinstance(bias, Value):
            st = np.maximum(st, ctx.state(bias, 0))
    else:  # (x - mean) / std: a zero input gives a constant
        st = np.where(ctx.state(x, 1) == DEP, DEP, INDEP)
    ctx.set_state(out, 1, st)
    for extra in node.outputs[1:]:  # saved statistics, one per channel when present
        if extra.ndim == 1 and extra.shape[0] == x.shape[1]:
            ctx.tie(extra, 0, out, 1)
            ctx.set_state(extra, 0, DEP)


@rule("aten.native_layer_norm", "aten.layer_norm", "aten._fused_rms_norm", "aten.rms_norm")
def layer_norm(ctx, node):
    x, shape = node.args[0], list(arg(node, 1, "normalized_shape"))
    weight, bias = arg(node, 2, "weight"), arg(node, 3, "bias" if "layer" in node.op else "eps")
    out = node.outputs[0]
    first = x.ndim - len(shape)
    for a in range(x.ndim):
        ctx.tie(x, a, out, a)
        ctx.set_state(out, a, DEP)
    for p in (weight, bias):
        if isinstance(p, Value):
            for k in range(p.ndim):
                ctx.tie(p, k, out, first + k)
    # exact once the backend rescales the module's weight and eps (see pool._rms_norm)
    own = isinstance(weight, Value) and root(weight).name == (f"{node.scope}.weight" if node.scope else "weight")
    rms = "rms" in node.op and len(shape) == 1 and own
    for a in range(first, x.ndim):
        if rms:
            ctx.require_zero(x, a, "RMS norm input")
            ctx.set_state(out, a, ctx.state(weight, 0))
            ctx.record("rms", x, a)
        elif "rms" in node.op:
            ctx.pin(x, a, reason="RMS norm without its module's own 1-d weight: nothing the backend can rescale "
                                 "to keep it exact")
        elif ctx.allow_lossy:
            ctx.mark_lossy(x, a)
            if isinstance(weight, Value):
                ctx.set_state(out, a, ctx.state(weight, a - first))
        else:
            ctx.pin(x, a, reason="layer norm normalizes over this axis: removing channels changes the "
                                 "statistics (lossy; pass allow_lossy=True to prune it anyway)")
    for extra in node.outputs[1:]:
        for a in range(min(first, extra.ndim)):
            if extra.shape[a] == x.shape[a]:
                ctx.tie(x, a, extra, a)


@rule("aten.native_group_norm", "aten.group_norm")
def group_norm(ctx, node):
    x, weight, bias = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
    groups = arg(node, 6, "group") if node.op.startswith("aten.native") else arg(node, 1, "num_groups")
    out = node.outputs[0]
    _per_channel(ctx, x, out, [weight, bias])
    if groups == x.shape[1] and isinstance(weight, Value):  # one channel per group: like instance norm
        ctx.set_state(out, 1, ctx.state(weight, 0))
    elif groups == x.shape[1]:  # the backend learns the new width from the weight's shape
        ctx.pin(x, 1, reason="group norm without an affine weight: its num_groups could not follow the width")
        ctx.set_state(out, 1, DEP)
    else:
        ctx.pin(x, 1, reason="group norm mixes the channels of each group")
        ctx.set_state(out, 1, DEP)
    for a in range(2, x.ndim):
        ctx.pin(x, a, reason="group norm normalizes over this axis")
    for extra in node.outputs[1:]:
        if extra.ndim >= 1 and extra.shape[0] == x.shape[0]:
            ctx.tie(x, 0, extra, 0)

