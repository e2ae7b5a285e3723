"""Channel-wise ops over spatial axes: pooling, adaptive pooling, upsampling; and reductions.

Pooling and upsampling keep each channel separate (a zero channel stays zero). A reduction over a
channel axis is exact only for a sum of exact zeros; a mean divides by the width and a max may pick
the zero, so those pin the axis, except the mean of squares of an RMS norm, which the backend rescales.
"""

from __future__ import annotations

import re

import numpy as np

from ..context import DEP, INDEP, ZERO
from . import rule
from .common import CASTS, arg, norm_dims, root


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
    for a in range(first_spatial, x.ndim):  # windows and interpolation mix neighbouring positions
        ctx.pin(x, a, reason=f"{node.op.split('.')[1]} mixes neighbouring positions along this axis")


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
    offset, why = _rms_norm(ctx, node, x, dims) if name == "mean" else (None, "")
    for a in dims:
        if offset is not None:
            ctx.require_zero(x, a, "mean of squares (RMS norm)")
            ctx.record("rms", x, a, offset=offset)
        elif name in _REDUCE_ZERO_OK:
            ctx.require_zero(x, a, f"{name} over this axis")
        else:
            ctx.pin(x, a, reason=why or f"{name} over this axis depends on how many channels there are")
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


def _rms_norm(ctx, node, x, dims) -> tuple[float | None, str]:
    """(offset, "") if this mean is the statistic of an RMS norm the backend can make exact, else (None, why).

    The whole pattern is checked, since the backend rescales the module's `weight` and epsilon attribute:
    y * rsqrt(mean(y**2, -1) + eps) * (offset + weight), with `weight` the module's own 1-d parameter and
    offset a constant (0 for LLaMA's x_hat * w, 1 for Gemma's x_hat * (1 + w)). Removing channels changes the
    mean by C/C'; (offset + w') = (offset + w) * sqrt(C/C') and eps' = eps * C/C' give the same output."""
    src = x.producer
    if src is None or dims != [x.ndim - 1]:
        return None, "mean over this axis depends on how many channels there are"
    squared = (src.op.startswith("aten.pow.Tensor_Scalar") and src.args[1] == 2) or (
        src.op.startswith("aten.mul.Tensor") and src.args[0] is src.args[1])
    weight = ctx.graph.params.get(f"{node.scope}.weight" if node.scope else "weight")
    if not squared or weight is None or weight.shape != (x.shape[-1],):
        return None, "mean over this axis depends on how many channels there are"
    why = (f"RMS norm in '{node.scope}' is not y * rsqrt(mean(y**2) + eps) * (c + weight) with its weight used "
           "there only, so graphprune cannot rescale it exactly")
    y = root(src.args[0])
    add = _only_use(ctx, node.outputs[0])
    if add is None or not add.op.startswith("aten.add.") or not isinstance(arg(add, 1, "other"), (int, float)):
        return None, why
    inv = _only_use(ctx, add.outputs[0])
    scale = _only_use(ctx, inv.outputs[0]) if inv is not None else None
    if scale is None or not (
            (inv.op.startswith("aten.rsqrt.") and scale.op.startswith("aten.mul.Tensor")
             and {root(a).id for a in scale.args[:2] if hasattr(a, "shape")} == {y.id, inv.outputs[0].id})
            or (inv.op.startswith("aten.sqrt.") and scale.op.startswith("aten.div.Tensor")
                and root(scale.args[0]) is y and scale.args[1] is inv.outputs[0])):
        return None, why
    h = scale.outputs[0]
    out = _only_use(ctx, _follow_casts(ctx, h))
    offset = _weight_offset(out, weight) if out is not None else None
    if offset is None or _weight_uses(ctx, weight) != [out]:  # a rescaled weight must change nothing else
        return None, why
    return offset, ""


def _only_use(ctx, v):
    users = ctx.users(v)
    return users[0] if len(users) == 1 and v not in ctx.graph.outputs else None


def _follow_casts(ctx, v):
    """The last of a chain of single-use casts starting at `v`."""
    while (n := _only_use(ctx, v)) is not None and n.op.startswith(CASTS):
        v = n.outputs[0]
    return v


def _weight_uses(ctx, weight):
    """The non-cast, non-offset nodes that read `weight` (through casts and adding a constant)."""
    found, todo = [], [weight]
    while todo:
        v = todo.pop()
        for n in ctx.users(v):
            if n.op.startswith(CASTS) or (n.op.startswith("aten.add.") and n.args[0] is v
                                           and isinstance(arg(n, 1, "other"), (int, float))):
                todo.append(n.outputs[0])
            else:
                found.append(n)
    return found


def _weight_offset(mul, weight) -> float | None:
    """c where `mul` multiplies by (c + weight) (through casts), None if it is no such product."""
    if not mul.op.startswith("aten.mul.Tensor"):
        return None
    for v in mul.args[:2]:
        v = root(v) if hasattr(v, "shape") else None
        if v is weight:
            return 0.0
        p = getattr(v, "producer", None)
        if p is not None and p.op.startswith("aten.add.") and root(p.args[0]) is weight and \
                isinstance(arg(p, 1, "other"), (int, float)) and arg(p, 2, "alpha", 1) == 1:
            return float(arg(p, 1, "other"))
    return None


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
