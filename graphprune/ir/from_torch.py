"""Record a PyTorch model into the graph IR by watching one real forward pass at the ATen level.

A TorchDispatchMode sees every ATen op after autograd's decompositions, follows any Python control
flow, and costs about one eager forward; torch.export costs several seconds more on large models.
Parameters and buffers are recognised by tensor identity. The user's model is left as it was: the
training flags we switch to eval are restored, and nothing else is touched.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..errors import TraceError
from .graph import ACT, BUFFER, CONST, INPUT, PARAM, Graph, Node, Value

log = logging.getLogger(__name__)

_INPLACE_SAFE = {"add_", "sub_", "mul_", "div_", "relu_", "hardtanh_", "silu_", "hardswish_", "sigmoid_",
                 "gelu_", "leaky_relu_", "clamp_", "clamp_min_", "tanh_", "elu_", "hardsigmoid_", "mish_",
                 "neg_", "abs_"}


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Split user inputs into (args, kwargs): a tensor, a tuple/list of args, or a dict of kwargs."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) == 2 and isinstance(example_inputs[1], dict) and isinstance(
                example_inputs[0], (tuple, list)):
            return tuple(example_inputs[0]), dict(example_inputs[1])
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def zero_buffers(model: torch.nn.Module) -> set[str]:
    """Buffers that are exactly zero in every instance the model's code builds: all zeros and
    non-persistent, so no load_state_dict can change them (EVA's k_bias). A buffer on the meta device (a model
    built without weights) holds no values, so it is never taken for zero."""
    transient = {f"{prefix}.{leaf}" if prefix else leaf for prefix, m in model.named_modules()
                 for leaf in m._non_persistent_buffers_set}
    return {name for name, b in model.named_buffers() if name in transient and b.numel() and not b.is_meta
            and not bool(b.any())}


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Run in eval mode and restore every submodule's own training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: Graph, known: dict[int, Value]):
        super().__init__()
        self.graph = graph
        self.known = known  # id(tensor) -> Value
        self.keep: list[torch.Tensor] = []  # keeps recorded tensors alive so ids stay unique
        self.viewed_storages: set[int] = set()
        self.scope: list[str] = []
        self.paused = 0

    def value_of(self, t: torch.Tensor) -> Value:
        v = self.known.get(id(t))
        if v is None:  # a tensor created outside the ops we saw: a constant
            v = self.graph.new_value(t.shape, t.dtype, CONST)
            v.data = t.detach()
            self.known[id(t)] = v
            self.keep.append(t)
        return v

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused:
            return out
        info = _OP_INFO.get(func)
        if info is None:
            info = _OP_INFO[func] = _op_info(func)
        op, safe_inplace, writes, returns_view = info
        if op is None:
            return out
        arg_vals = _map_tensors(args, self.value_of)
        kwarg_vals = _map_tensors(kwargs, self.value_of) if kwargs else {}
        if writes:
            mutated = [t for t in (args[i] if i < len(args) else kwargs.get(n) for i, n in writes)
                       if isinstance(t, torch.Tensor)]
            if not safe_inplace or any(self._aliased(t) or self._stored(t) for t in mutated):
                op = "graphprune.mutation"  # in-place write into shared storage or state: analysis pins it
        self.record(op, arg_vals, kwarg_vals, out, returns_view and not writes, target=func)
        return out

    def record(self, op: str, arg_vals, kwarg_vals, out, is_view: bool = False, target=None) -> None:
        inputs: list[Value] = []
        _collect_values(arg_vals, inputs)
        if kwarg_vals:
            _collect_values(tuple(kwarg_vals.values()), inputs)
        dep = any(v.depends_on_input for v in inputs)
        outs: list[Value] = []
        node = Node(len(self.graph.nodes), op, arg_vals, kwarg_vals, outs, self.scope[-1] if self.scope else "",
                    target)
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                v = self.graph.new_value(t.shape, t.dtype, ACT, producer=node, depends_on_input=dep)
                self.known[id(t)] = v
                self.keep.append(t)
                outs.append(v)
                if is_view:
                    self.viewed_storages.add(_storage_key(t))
        self.graph.nodes.append(node)

    def _stored(self, t: torch.Tensor) -> bool:
        v = self.known.get(id(t))
        return v is not None and v.kind in (PARAM, BUFFER)

    def _aliased(self, t: torch.Tensor) -> bool:
        return t._is_view() or _storage_key(t) in self.viewed_storages


_SDPA_PARAMS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_MATMUL = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


class _WholeOps(TorchFunctionMode):
    """Records some functions as one node instead of their decomposition. scaled_dot_product_attention may run
    as a math path whose 1/sqrt(head_dim) scale would otherwise look like a plain constant; matmul and einsum
    decompose into a bmm over (batch x heads) folded into one axis, with other permutations at batch 1 than
    above it, so whole they keep heads prunable at any batch size and a regenerated graph that follows it."""

    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        whole = func is torch.nn.functional.scaled_dot_product_attention or (
            func in _MATMUL and len(args) == 2 and not kwargs and all(isinstance(a, torch.Tensor) for a in args)) or (
            func is torch.einsum and args and isinstance(args[0], str) and not kwargs)
        if not whole or self.recorder.paused:
            return func(*args, **kwargs)
        self.recorder.paused += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.recorder.paused -= 1
        value_of = self.recorder.value_of
        if func is torch.einsum:  # einsum(eq, a, b) or einsum(eq, [a, b])
            operands = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            self.recorder.record("aten.einsum.default", (args[0], _map_tensors(list(operands), value_of)), {}, out,
                                 target=torch.ops.aten.einsum.default)
            return out
        if func in _MATMUL:
            self.recorder.record("aten.matmul.default", _map_tensors(tuple(args), value_of), {}, out,
                                 target=torch.ops.aten.matmul.default)
            return out
        named = dict(zip(_SDPA_PARAMS, args[3:]))
        named.update(kwargs)
        self.recorder.record("aten.scaled_dot_product_attention.default",
                             _map_tensors(tuple(args[:3]), value_of), _map_tensors(named, value_of), out,
                             target=torch.ops.aten.scaled_dot_product_attention.default)
        return out


def _storage_key(t: torch.Tensor) -> int:
    try:
        storage = t.untyped_storage()
        # meta tensors own no memory (every data_ptr is 0): their storage object itself tells them apart
        return storage._cdata if t.is_meta else storage.data_ptr()
    except Exception:  # noqa: BLE001 - tensors without storage cannot alias
        return -1


_OP_INFO: dict = {}


def _op_info(func):
    """Per-op facts from its schema, computed once: (name or None to skip, safe in-place, written args, view)."""
    if func.namespace == "prim" or func is torch.ops.aten.sym_size.int:
        return None, False, (), False
    schema = func._schema
    writes = tuple((i, a.name) for i, a in enumerate(schema.arguments)
                   if a.alias_info is not None and a.alias_info.is_write)
    returns_view = bool(schema.returns and schema.returns[0].alias_info is not None)
    return str(func), func.overloadpacket.__name__ in _INPLACE_SAFE, writes, returns_view


def _collect_values(obj, found: list[Value]) -> None:
    for item in obj:
        if isinstance(item, Value):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            _collect_values(item, found)


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return tuple(_map_tensors(o, fn) for o in obj) if type(obj) is not list else [
            _map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def saved_buffers(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, a copy of its values) for every buffer forward code could write to, to put back after a run: an
    expanded buffer (a stride-0 axis) can be written by no in-place op, nor copied back into."""
    return [(b, b.detach().clone()) for b in model.buffers()
            if not any(stride == 0 and size > 1 for stride, size in zip(b.stride(), b.shape))]


def trace(model: torch.nn.Module, example_inputs: Any) -> tuple[Graph, Any]:
    """Record `model(*example_inputs)` into a Graph; returns the graph and the model's real output."""
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}; pass the model object "
                         "itself (an .onnx file goes through `graphprune prune FILE.onnx`)")
    args, kwargs = normalize_inputs(example_inputs)
    graph = Graph()
    known: dict[int, Value] = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        v = graph.new_value(p.shape, p.dtype, PARAM, name)
        known[id(p)] = v
        graph.params[name] = v
    zeros = zero_buffers(model)
    for name, b in model.named_buffers(remove_duplicate=True):
        if id(b) in known:
            continue
        v = graph.new_value(b.shape, b.dtype, BUFFER, name)
        v.zero = name in zeros
        known[id(b)] = v
        graph.params[name] = v
    flat_in, _ = tree_flatten((args, kwargs))
    for t in flat_in:
        if isinstance(t, torch.Tensor) and id(t) not in known:
            v = graph.new_value(t.shape, t.dtype, INPUT, depends_on_input=True)
            known[id(t)] = v
            graph.inputs.append(v)
    if not graph.inputs:
        raise TraceError("example_inputs holds no tensor; pass a tensor or a tuple of tensors the model "
                         "accepts, e.g. torch.randn(1, 3, 224, 224)")
    names = {id(m): n for n, m in model.named_modules()}
    recorder = _Recorder(graph, known)

    def pre_hook(module, _args):
        recorder.scope.append(names.get(id(module), type(module).__name__))

    def post_hook(module, _args, _out):
        if recorder.scope:
            recorder.scope.pop()

    # forward code may update buffers (counters, running statistics); put them back afterwards
    saved = saved_buffers(model)
    h1 = torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)
    h2 = torch.nn.modules.module.register_module_forward_hook(post_hook, always_call=True)
    try:
        with eval_mode(model), torch.no_grad(), recorder, _WholeOps(recorder):
            out = model(*args, **kwargs)
    except TraceError:
        raise
    except Exception as exc:
        where = f" in module '{recorder.scope[-1]}'" if recorder.scope else ""
        raise TraceError(f"the model failed on the example inputs{where}: {type(exc).__name__}: {exc}. "
                         "Check that example_inputs match what model.forward expects (shapes, dtypes, "
                         "a tuple for several arguments, a dict for keyword arguments).") from exc
    finally:
        h1.remove()
        h2.remove()
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
    flat_out, _ = tree_flatten(out)
    graph.output_is_tensor = isinstance(out, torch.Tensor)
    for t in flat_out:
        if isinstance(t, torch.Tensor):
            graph.outputs.append(recorder.value_of(t))
    if not graph.outputs:
        raise TraceError("the model returned no tensor, so nothing ties its layers to an output")
    log.debug("recorded %d ops, %d values", len(graph.nodes), len(graph.values))
    return graph, out
