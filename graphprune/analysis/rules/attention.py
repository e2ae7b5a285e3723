"""Attention: scaled dot-product attention kernels and softmax.

Heads line up across q, k, v and the output (a removed head is exactly zero when its v is). head_dim
of q and k is pinned when the kernel derives its scale from it; the key/value sequence axis is mixed
by the softmax and pinned.
"""

from __future__ import annotations

import numpy as np

from ...ir.graph import Value
from ..context import DEP, INDEP, ZERO
from . import rule
from .common import arg


@rule("aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_flash_attention",
      "aten._scaled_dot_product_efficient_attention", "aten._scaled_dot_product_cudnn_attention",
      "aten.scaled_dot_product_attention", "aten._scaled_dot_product_attention_math")
def sdpa(ctx, node):
    q, k, v = node.args[0], node.args[1], node.args[2]
    out = node.outputs[0]
    scale = node.kwargs.get("scale")
    mask = node.kwargs.get("attn_mask")
    if mask is None and node.op.split(".")[1] in ("scaled_dot_product_attention",
                                                   "_scaled_dot_product_attention_math"):
        mask = arg(node, 3, "attn_mask")
    lead = q.ndim - 2
    for a in range(lead):
        nq, nk = q.shape[a], k.shape[a]
        if nq == nk:
            ctx.tie(q, a, out, a)
            ctx.tie(k, a, out, a)
            ctx.tie(v, a, out, a)
        elif nk and nq % nk == 0:  # grouped-query attention: query head h reads kv head h // (nq / nk)
            ctx.tie(q, a, out, a)
            idx = np.arange(nq) // (nq // nk)
            ctx.tie(out, a, k, a, None, idx)
            ctx.tie(k, a, v, a)
        else:
            ctx.pin(q, a, reason="attention with mismatched leading axes")
            ctx.pin(k, a, reason="attention with mismatched leading axes")
            ctx.pin(v, a, reason="attention with mismatched leading axes")
        st_v = ctx.state(v, a)
        if nq != nk and nk:
            st_v = st_v[np.arange(nq) // (nq // nk)]
        ctx.set_state(out, a, np.where(st_v == ZERO, ZERO, DEP).astype(np.int8) if nq == out.shape[a] else DEP)
    # head_dim of q and k: contracted; the default scale 1/sqrt(E) depends on its width
    ctx.tie(q, -1, k, -1)
    if scale is None:
        ctx.pin(q, -1, reason="attention scale is derived from head_dim")
    else:
        ctx.require_zero(q, -1, "attention logits", ok=ctx.state(k, -1) == ZERO)
    ctx.tie(q, -2, out, -2)
    ctx.set_state(out, -2, DEP)
    ctx.tie(k, -2, v, -2)
    ctx.pin(k, -2, reason="softmax mixes the key positions")
    ctx.tie(v, -1, out, -1)
    ctx.set_state(out, -1, ctx.state(v, -1))
    if isinstance(mask, Value):
        for j in range(mask.ndim):
            a = q.ndim - mask.ndim + j
            if a < lead and mask.shape[j] == q.shape[a]:
                ctx.tie(mask, j, q, a)
            else:
                ctx.pin(mask, j, reason="attention mask positions")
    for extra in node.outputs[1:]:
        for a in range(min(lead, extra.ndim)):
            if extra.shape[a] == q.shape[a]:
                ctx.tie(q, a, extra, a)
    batch = [(q, a) for a in range(lead)]
    ctx.add_flops(2, batch + [(q, -2), (k, -2), (q, -1)])
    ctx.add_flops(2, batch + [(q, -2), (k, -2), (v, -1)])



@rule("aten._softmax", "aten.softmax", "aten._log_softmax", "aten.log_softmax", "aten._safe_softmax")
def softmax(ctx, node):
    x, out = node.args[0], node.outputs[0]
    dim = arg(node, 1, "dim") % x.ndim
    ctx.pin(x, dim, reason="softmax normalizes over this axis")
    for a in range(x.ndim):
        ctx.tie(x, a, out, a)
        st = ctx.state(x, a)
        ctx.set_state(out, a, np.where(st == ZERO, INDEP, st) if a != dim else DEP)
