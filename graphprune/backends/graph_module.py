"""Fallback backend: regenerate the recorded ATen graph as a torch.fx GraphModule with sliced weights and
every shape constant (view sizes, split sizes, slice bounds, groups, ...) rewritten to the pruned widths.

Used when the slimmed module's own forward code holds a width as a constant no attribute controls (such
as `x.view(x.size(0), 16 * 5 * 5)`). The result replays the recorded path: Python control flow and input
shapes are those of the example inputs.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
from torch import fx, nn

from ..errors import BackendError
from ..ir.graph import CONST, Value
from ..plan import PruningPlan, named_tensors
from .torch import sliced

_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)
_SHAPE_ARG = {  # op packet -> position of the size argument that follows the output shape
    "view": 1, "_unsafe_view": 1, "reshape": 1, "_reshape_alias": 1, "view_copy": 1, "expand": 1,
    "zeros": 0, "ones": 0, "empty": 0, "full": 0, "rand": 0, "randn": 0,
    "new_zeros": 1, "new_ones": 1, "new_empty": 1, "new_full": 1,
}


def regenerate(plan: PruningPlan, model: nn.Module, an=None, gone: np.ndarray | None = None,
               dynamic: dict | None = None, input_names: list[str] | None = None,
               options: dict | None = None) -> fx.GraphModule:
    """The recorded graph of `model` (the masked model: its weights are sliced) as a GraphModule.

    `an` / `gone` are the analysis and removed components (the plan's own by default); `dynamic` (from
    `dynamic_ints`) says which integer arguments are expressions of the input sizes, so they follow the
    inputs' batch and sequence length instead of replaying the recorded ones. The GraphModule takes the
    tensors by `input_names` and, as keywords with their recorded values, the `options` (use_cache=False).
    """
    if an is None:
        an, gone = getattr(plan, "_analysis", None), getattr(plan, "_gone", None)
    if an is None:
        raise BackendError("this plan carries no recorded graph (it was loaded from JSON); plan the model again")
    graph = an.graph
    dynamic = dynamic or {}
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
        if isinstance(obj, dict):  # keyword arguments (an attention mask)
            return {k: mapped(o) for k, o in obj.items()}
        return obj

    written = {v.id for node in graph.nodes if node.op == "graphprune.mutation" or node.op.split(".")[1].endswith("_")
               for v in node.tensor_inputs()[:1]}  # a view of these must stay a view: writes go through it
    names = input_names or [f"input_{i}" for i in range(len(graph.inputs))]
    for name, v in zip(names, graph.inputs):
        env[v.id] = fxg.placeholder(name)
    for name, value in (options or {}).items():  # keyword inputs that are not tensors: accepted, as recorded
        fxg.placeholder(name, default_value=value)
    sizes = _SizeExpressions(fxg, [env[v.id] for v in graph.inputs])
    for node in graph.nodes:
        if node.target is None:
            raise BackendError(f"cannot regenerate {node.where()}")
        args, kwargs = list(mapped(node.args)), dict(mapped(node.kwargs))
        target = _rewrite(node, args, kwargs, kept, shape)
        if target in _VIEWS and not ({v.id for v in node.tensor_inputs() + node.outputs} & written):
            target = torch.ops.aten.reshape.default  # a view needs the strides of this recording, a reshape not
        for path, expression in dynamic.get("ints", {}).get(node.id, {}).items():
            _put(args, kwargs, node, path, sizes.node(expression, _get(args, kwargs, node, path)))
        call = fxg.call_function(target, tuple(args), kwargs)
        _bind_outputs(fxg, node, target, call, env)
    outs = [env[v.id] for v in graph.outputs]
    fxg.output(outs[0] if graph.output_is_tensor and len(outs) == 1 else tuple(outs))
    return fx.GraphModule(root, fxg, class_name="PrunedGraph")


# ----- integers that follow the input sizes ---------------------------------------------------------------
# An expression is (symbols, recorded): the integer is recorded * prod(symbol now / symbol at the example),
# a product of input sizes times a constant (B * S * heads), or (symbols, recorded, "+") for size + constant
# (a slice end at S - 1). A symbol is (input index, axis, size in the example).


def dynamic_ints(base, variants: list[tuple[tuple[int, int, int], int, object]]) -> tuple[dict, str | None]:
    """Which recorded integers follow the input sizes. `variants` holds, per varied symbol (input, axis,
    example size), its other size and the graph recorded with it. Returns ({"ints": {node id: {path:
    expression}}}, None), or ({}, why) when a variant's graph differs in structure or an integer follows no
    simple rule. A reshape is a view at batch 1 and a clone and a view above: the two line up."""
    found: dict[int, dict[tuple, dict]] = {}
    for symbol, size, graph in variants:
        pairs = _aligned(base.nodes, graph.nodes)
        if pairs is None:
            return {}, f"other ops run when input {symbol[0]} axis {symbol[1]} is {size}"
        for a, b in pairs:
            for x, y in zip(a.tensor_inputs(), b.tensor_inputs()):
                if x.kind == CONST and x.shape != y.shape:
                    return {}, f"{a.where()} reads a constant whose shape follows the inputs"
            for path, x, y in _int_pairs(a, b):
                if x != y:
                    found.setdefault(a.id, {}).setdefault(path, {"recorded": x, "moves": []})["moves"].append(
                        (symbol, size, y))
    ints: dict[int, dict[tuple, tuple]] = {}
    for node_id, paths in found.items():
        for path, info in paths.items():
            expression = _fit(info["recorded"], info["moves"])
            if expression is None:
                node = base.nodes[node_id]
                return {}, (f"{node.where()}: an integer ({info['recorded']}) follows the input sizes in a way "
                            "graphprune does not model")
            ints.setdefault(node_id, {})[path] = expression
    return {"ints": ints}, None


def _aligned(base: list, other: list) -> list | None:
    """Pairs of the same op in two recordings; a view in `base` may be a clone + _unsafe_view in `other`."""
    pairs, j = [], 0
    for a in base:
        if j < len(other) and other[j].op == a.op:
            pairs.append((a, other[j]))
            j += 1
        elif (a.op == "aten.view.default" and j + 1 < len(other) and other[j].op == "aten.clone.default"
              and other[j + 1].op == "aten._unsafe_view.default"):
            pairs.append((a, other[j + 1]))
            j += 2
        else:
            return None
    return pairs if j == len(other) else None


def _fit(recorded: int, moves: list) -> tuple | None:
    """The simplest expression that explains every move: a product with each moved symbol, or a sum."""
    symbols = [m[0] for m in moves]
    product = math.prod(s[2] for s in symbols)
    if recorded % product == 0 and all(y * s[2] == recorded * n for s, n, y in moves):
        return (tuple(symbols), recorded, "*")
    if len(moves) == 1 and moves[0][2] - recorded == moves[0][1] - symbols[0][2]:
        return (tuple(symbols), recorded, "+")
    return None


def _int_pairs(a, b):
    """(path, value in a, value in b) for every plain integer argument of two recordings of one op, plus the
    output shape of ops whose size argument becomes that shape (path ("out", i))."""
    packet = a.op.split(".")[1] if a.op.count(".") >= 1 else a.op
    if packet in _SHAPE_ARG and a.outputs and b.outputs:
        for i, (x, y) in enumerate(zip(a.outputs[0].shape, b.outputs[0].shape)):
            yield ("out", i), x, y

    def walk(x, y, path):
        if isinstance(x, bool) or isinstance(y, bool):
            return
        if isinstance(x, int) and isinstance(y, int):
            yield path, x, y
        elif isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and len(x) == len(y):
            for i, (p, q) in enumerate(zip(x, y)):
                yield from walk(p, q, path + (i,))

    if packet not in _SHAPE_ARG:
        yield from walk(list(a.args), list(b.args), ("args",))
        for key in a.kwargs.keys() & b.kwargs.keys():
            yield from walk(a.kwargs[key], b.kwargs[key], ("kwargs", key))


def _get(args: list, kwargs: dict, node, path: tuple):
    container, rest = _locate(args, kwargs, node, path)
    for i in rest:
        container = container[i]
    return container


def _put(args: list, kwargs: dict, node, path: tuple, value) -> None:
    container, rest = _locate(args, kwargs, node, path)
    for i in rest[:-1]:
        container = container[i]
    if isinstance(container, tuple):
        raise BackendError(f"cannot make a size argument of {node.where()} dynamic")
    container[rest[-1]] = value


def _locate(args: list, kwargs: dict, node, path: tuple):
    if path[0] == "out":  # the size argument that _rewrite set to the output shape
        pos = _SHAPE_ARG[node.op.split(".")[1]]
        return (args, [pos, path[1]]) if pos < len(args) else (kwargs, ["size", path[1]])
    if path[0] == "kwargs":
        return kwargs, list(path[1:])
    return args, list(path[1:])


class _SizeExpressions:
    """fx nodes computing input sizes and the integers built from them, each made once."""

    def __init__(self, fxg: fx.Graph, inputs: list[fx.Node]):
        self.fxg, self.inputs, self.made = fxg, inputs, {}

    def node(self, expression: tuple, now: int) -> fx.Node:
        """`now` is the pruned value at the example's sizes: a pruned width times the batch scales too."""
        symbols, _recorded, how = expression
        key = (symbols, now, how)
        if key not in self.made:
            sizes = [self._size(s) for s in symbols]
            if how == "+":
                self.made[key] = self.fxg.call_function(operator.add, (sizes[0], now - symbols[0][2]))
            else:
                at_example = math.prod(s[2] for s in symbols)
                if now % at_example:
                    raise BackendError(f"a pruned size {now} does not scale with the inputs ({symbols})")
                value = sizes[0]
                for extra in sizes[1:]:
                    value = self.fxg.call_function(operator.mul, (value, extra))
                factor = now // at_example
                self.made[key] = value if factor == 1 else self.fxg.call_function(operator.mul, (value, factor))
        return self.made[key]

    def _size(self, symbol: tuple) -> fx.Node:
        key = ("size",) + symbol[:2]
        if key not in self.made:
            self.made[key] = self.fxg.call_function(torch.ops.aten.sym_size.int, (self.inputs[symbol[0]], symbol[1]))
        return self.made[key]


def _take(x, dim: int, positions: list[int]):
    """x's positions along dim (a strided slice of channels, some of which are gone)."""
    return x.index_select(dim, torch.tensor(positions, dtype=torch.long, device=x.device))


def _mean_at_original_width(x, dim, keepdim=False, dtype=None, *, count: int):
    """A mean over axes that lost channels, divided by the original width: the removed channels were zeros in
    the masked model, so this is what it computed (no rescaled weight or epsilon needed)."""
    return torch.sum(x, dim, keepdim=keepdim, dtype=dtype) / count


def _bind_outputs(fxg: fx.Graph, node, target, call: fx.Node, env: dict) -> None:
    if not hasattr(target, "_schema"):  # one of our own functions: one tensor out
        env[node.outputs[0].id] = call
        return
    returns = target._schema.returns
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
            step = args[4] if len(args) > 4 and packet != "narrow" else 1
            if packet == "narrow":
                args[2], args[3] = new_start, width
            elif step != 1:  # every step-th of the original channels: the kept ones by position instead
                end = args[3] if len(args) > 3 and args[3] is not None else src.shape[dim]
                taken = np.arange(src.shape[dim])[slice(args[2], end, step)][kept(out, dim)]
                del args[2:]
                args[1:] = [dim, np.searchsorted(keep, taken).tolist()]
                return _take
            else:
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
        if args[6] == args[4]:  # one channel per group (the only prunable case): groups follow the channels
            args[6] = shape(src)[1]
        args[4] = shape(src)[1]
    elif packet == "mean" and src is not None and len(args) > 1 and args[1]:
        dims = [d % src.ndim for d in args[1]]
        if any(len(kept(src, d)) != src.shape[d] for d in dims):  # an RMS norm's mean of squares
            kwargs["count"] = int(np.prod([src.shape[d] for d in dims]))
            return _mean_at_original_width
    elif packet == "arange" and out is not None and shape(out) != list(out.shape):
        raise BackendError(f"arange over a pruned axis at {node.where()}")
    return node.target
