"""Channel-wise ops over spatial axes: pooling, adaptive pooling, upsampling; and reductions.

Pooling and upsampling keep each channel separate (a zero channel stays zero). A reduction over a
channel axis is exact only for a sum of exact zeros; a mean divides by the width and a max may pick
the zero, so those pin the axis, except the mean of squares of an RMS norm, which the backend rescales.
"""

from __future__ import annotations

import re

import numpy as np

from ..channels import DEP, INDEP, ZERO
from . import rule
from .common import arg, norm_dims


@rule("aten.max_pool1d", "aten.max_pool2d", "aten.max_pool3d", "aten.max_pool2d_with_indices",
      "aten.max_pool3d_with_indices", "aten.max_pool1d_with_indices", "aten.avg_pool1d", "aten.avg_pool2d",
      "aten.avg_pool3d", "aten._adaptive_avg_pool2d", "aten._adaptive_avg_pool3d", "aten.adaptive_avg_pool1d",
      "aten.adaptive_avg_pool2d", "aten.adaptive_avg_pool3d", "aten.adaptive_max_pool2d",
      "aten.adaptive_max_pool1d", "aten.adaptive_max_pool3d", "aten.upsample_nearest1d",
      "aten.upsample_nearest2d", "aten.upsample_nearest3d", "aten.upsample_bilinear2d",
      "aten.upsample_bicubic2d", "aten.upsample_linear1d", "aten.upsample_trilinear3d",
      "aten._upsample_nearest_exact2d", "aten._upsample_bilinear2d_aa", "aten.lp_pool2d",
      "aten.reflection_pad2d", "aten.reflection_pad1d", "aten.replication_pad2d", "aten.replication_pad1d")
def channelwise(ctx, node):
    x = node.args[0]
    match = re.search(r"(\d)d", node.op.split(".")[1])
    n_spatial = int(match.group(1)) if match else x.ndim - 2
    first_spatial = x.ndim - n_spatial  # unbatched inputs have their channels at axis 0
    for out in node.outputs:
        for a in range(first_spatial):
            ctx.tie(x, a, out, a)
            ctx.set_state(out, a, ctx.state(x, a) if a == first_spatial - 1 else DEP)
        for a in range(first_spatial, out.ndim):
            ctx.set_state(out, a, DEP)
    for a in range(first_spatial, x.ndim):
        ctx.handled.add((x.id, a))


_REDUCE_ZERO_OK = {"sum", "nansum"}  # a removed zero adds nothing


@rule("aten.sum", "aten.mean", "aten.amax", "aten.amin", "aten.max", "aten.min", "aten.var", "aten.std",
      "aten.var_mean", "aten.std_mean", "aten.prod", "aten.norm", "aten.linalg_vector_norm", "aten.logsumexp",
      "aten.argmax", "aten.argmin", "aten.any", "aten.all", "aten.nansum", "aten.nanmean", "aten.count_nonzero")
def reduction(ctx, node):
    x = node.args[0]
    name = node.op.split(".")[1]
    overload = node.op.split(".")[2] if node.op.count(".") >= 2 else "default"
    if x.ndim == 0:
        return
    if overload == "default" and name not in ("var", "std", "var_mean", "std_mean", "norm"):
        dims = None
    elif name in ("linalg_vector_norm", "norm"):
        dims = arg(node, 2, "dim")
    elif name in ("var", "std", "var_mean", "std_mean") and overload in ("correction", "default"):
        dims = arg(node, 1, "dim")
    else:
        dims = arg(node, 1, "dim")
    dims = norm_dims(dims, x.ndim)
    keep = [a for a in range(x.ndim) if a not in dims]
    rms = name == "mean" and _is_rms_norm(ctx, node, x, dims)
    for a in dims:
        if rms:
            ctx.require_zero(x, a, "mean of squares (RMS norm)")
            ctx.record("rms", x, a)
        elif name in _REDUCE_ZERO_OK:
            ctx.require_zero(x, a, f"{name} over this axis")
        else:
            ctx.pin(x, a, reason=f"{name} over this axis depends on how many channels there are")
    zero_ok = name in ("sum", "mean", "amax", "amin", "max", "min", "var", "std", "prod", "norm",
                       "linalg_vector_norm", "nansum", "nanmean")
    for out in node.outputs:
        keepdim = out.ndim == x.ndim
        for i, a in enumerate(keep):
            j = a if keepdim else i
            if j < out.ndim and out.shape[j] == x.shape[a]:
                ctx.tie(x, a, out, j)
                st = ctx.state(x, a)
                ctx.set_state(out, j, st if zero_ok else np.where(st == ZERO, INDEP, st))


def _is_rms_norm(ctx, node, x, dims) -> bool:
    """mean(y**2) over the last axis inside a module with a matching 1-d weight: an RMS norm. Removing
    channels changes the mean by C/C', which the backend folds into the weight (x sqrt(C/C')) and the
    epsilon (x C/C'), so the axis can be pruned exactly."""
    src = x.producer
    if src is None or dims != [x.ndim - 1]:
        return False
    squared = (src.op.startswith("aten.pow.Tensor_Scalar") and src.args[1] == 2) or (
        src.op.startswith("aten.mul.Tensor") and src.args[0] is src.args[1])
    weight = ctx.graph.params.get(f"{node.scope}.weight" if node.scope else "weight")
    return squared and weight is not None and weight.shape == (x.shape[-1],)


@rule("aten.cumsum", "aten.cumprod", "aten.sort", "aten.topk", "aten.cummax", "aten.cummin", "aten.argsort")
def scan(ctx, node):
    x = node.args[0]
    dim = arg(node, 1, "dim", -1)
    if dim is None:
        dim = -1
    dim = dim % x.ndim
    ctx.pin(x, dim, reason=f"{node.op} orders or accumulates along this axis")
    for out in node.outputs:
        for a in range(x.ndim):
            if a != dim and out.ndim == x.ndim and out.shape[a] == x.shape[a]:
                ctx.tie(x, a, out, a)
                ctx.set_state(out, a, DEP)
        if out.ndim == x.ndim:
            ctx.pin(out, dim, reason=f"{node.op} orders or accumulates along this axis")
