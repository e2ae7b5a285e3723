"""Fallback backend: regenerate the recorded ATen graph as a torch.fx GraphModule with sliced weights and
every shape constant (view sizes, split sizes, slice bounds, groups, ...) rewritten to the pruned widths.

Used when the slimmed module's own forward code holds a width as a constant no attribute controls (such
as `x.view(x.size(0), 16 * 5 * 5)`). The result replays the recorded path: Python control flow and input
shapes are those of the example inputs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import fx, nn

from ..errors import BackendError
from ..ir.graph import CONST, Value
from ..plan import PruningPlan, named_tensors
from .torch import sliced

_SHAPE_ARG = {  # op packet -> position of the size argument that follows the output shape
    "view": 1, "_unsafe_view": 1, "reshape": 1, "_reshape_alias": 1, "view_copy": 1, "expand": 1,
    "zeros": 0, "ones": 0, "empty": 0, "full": 0, "rand": 0, "randn": 0,
    "new_zeros": 1, "new_ones": 1, "new_empty": 1, "new_full": 1,
}


def regenerate(plan: PruningPlan, model: nn.Module) -> fx.GraphModule:
    an, gone = getattr(plan, "_analysis", None), getattr(plan, "_gone", None)
    if an is None:
        raise BackendError("this plan carries no recorded graph (it was loaded from JSON); plan the model again")
    graph = an.graph
    root = nn.Module()
    fxg = fx.Graph()
    env: dict[int, fx.Node] = {}
    tensors = named_tensors(model)

    def kept(v: Value, axis: int) -> np.ndarray:
        ids = an.elements(v, axis)
        if ids is None:
            return np.arange(v.shape[axis])
        return np.nonzero(~gone[an.component[ids]])[0]

    def shape(v: Value) -> list[int]:
        return [len(kept(v, a)) for a in range(v.ndim)]

    def node_of(v: Value) -> fx.Node:
        if v.id not in env:
            if v.name is not None:
                attr = "p_" + v.name.replace(".", "_")
                t = sliced(plan, v.name, tensors[v.name])
                root.register_buffer(attr, t) if v.kind != "param" else root.register_parameter(
                    attr, nn.Parameter(t, requires_grad=tensors[v.name].requires_grad))
                env[v.id] = fxg.get_attr(attr)
            elif v.kind == CONST and v.data is not None:
                attr = f"const_{v.id}"
                root.register_buffer(attr, v.data)
                env[v.id] = fxg.get_attr(attr)
            else:
                raise BackendError(f"value {v} has no producer in the recorded graph")
        return env[v.id]

    def mapped(obj):
        if isinstance(obj, Value):
            return node_of(obj)
        if isinstance(obj, (list, tuple)):
            return type(obj)(mapped(o) for o in obj)
        return obj

    for i, v in enumerate(graph.inputs):
        env[v.id] = fxg.placeholder(f"input_{i}")
    for node in graph.nodes:
        if node.target is None:
            raise BackendError(f"cannot regenerate {node.where()}")
        args, kwargs = list(mapped(node.args)), dict(mapped(node.kwargs))
        target = _rewrite(node, args, kwargs, kept, shape)
        call = fxg.call_function(target, tuple(args), kwargs)
        _bind_outputs(fxg, node, target, call, env)
    outs = [env[v.id] for v in graph.outputs]
    fxg.output(outs[0] if graph.output_is_tensor and len(outs) == 1 else tuple(outs))
    return fx.GraphModule(root, fxg, class_name="PrunedGraph")


def _bind_outputs(fxg: fx.Graph, node, target, call: fx.Node, env: dict) -> None:
    returns = target._schema.returns if hasattr(target, "_schema") else []
    single = len(returns) == 1 and not str(returns[0].type).startswith("List")
    if single:
        if node.outputs:
            env[node.outputs[0].id] = call
        return
    positions = [i for i, r in enumerate(returns) if "Tensor" in str(r.type)] if len(returns) > 1 else None
    for k, v in enumerate(node.outputs):
        env[v.id] = fxg.call_function(_getitem, (call, positions[k] if positions else k))


def _getitem(seq, i):
    return seq[i]


def _count_before(kept: np.ndarray, index: int) -> int:
    return int(np.searchsorted(kept, index))


def _rewrite(node, args: list, kwargs: dict, kept, shape):
    """Replace size-like arguments with the pruned sizes (in place); returns the op to call."""
    packet = node.op.split(".")[1]
    src = node.args[0] if node.args and isinstance(node.args[0], Value) else None
    out = node.outputs[0] if node.outputs else None
    if packet in _SHAPE_ARG and out is not None:
        pos = _SHAPE_ARG[packet]
        if pos < len(args):
            args[pos] = shape(out)
        elif "size" in kwargs:
            kwargs["size"] = shape(out)
    elif packet in ("split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes") and src is not None:
        dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % src.ndim
        args[1] = [shape(o)[dim] for o in node.outputs]
        return torch.ops.aten.split_with_sizes.default
    elif packet in ("slice", "narrow") and src is not None:
        dim = (args[1] if len(args) > 1 else 0) % src.ndim
        keep = kept(src, dim)
        if len(keep) != src.shape[dim]:
            start = args[2] if len(args) > 2 and args[2] is not None else 0
            start = start + src.shape[dim] if start < 0 else start
            new_start = _count_before(keep, min(start, src.shape[dim]))
            width = shape(out)[dim]
            if packet == "narrow":
                args[2], args[3] = new_start, width
            else:
                if (args[4] if len(args) > 4 else 1) != 1:
                    raise BackendError(f"strided slice over a pruned axis at {node.where()}")
                args[2:4] = [new_start, new_start + width]
    elif packet == "select" and src is not None:
        dim = args[1] % src.ndim
        index = args[2] % src.shape[dim]
        args[2] = _count_before(kept(src, dim), index)
    elif packet in ("convolution", "_convolution") and out is not None:
        groups, weight = args[8], node.args[1]
        if groups > 1:
            axis = 1 if args[6] else 0
            args[8] = groups * shape(weight)[axis] // weight.shape[axis]
    elif packet in ("native_layer_norm", "layer_norm") and src is not None:
        args[1] = shape(src)[src.ndim - len(args[1]):]
    elif packet == "native_group_norm" and src is not None:
        args[4] = shape(src)[1]
    elif packet == "arange" and out is not None and shape(out) != list(out.shape):
        raise BackendError(f"arange over a pruned axis at {node.where()}")
    return node.target
