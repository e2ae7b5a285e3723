"""Alternative frontend: build the graph IR from torch.export (core ATen after decompositions).

Slower than the dispatch recorder (several seconds on large models) and limited to models torch.export
can capture, but it yields the same ops, so every analysis rule applies unchanged. Chosen with
`graphprune.plan(..., tracer="export")`.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from ..errors import TraceError
from .from_torch import eval_mode, normalize_inputs, zero_buffers
from .graph import ACT, BUFFER, CONST, INPUT, PARAM, Graph, Node, Value


def trace_export(model: torch.nn.Module, example_inputs: Any) -> tuple[Graph, Any]:
    """Export `model`, decompose to core ATen and convert the FX graph into a Graph."""
    args, kwargs = normalize_inputs(example_inputs)
    try:
        with eval_mode(model):
            program = torch.export.export(model, args, kwargs).run_decompositions()
    except Exception as exc:  # noqa: BLE001 - export failures are the user's to see, with the way out
        raise TraceError(f"torch.export could not capture the model ({type(exc).__name__}: {str(exc)[:300]}); "
                         "use the default tracer (tracer='dispatch')") from exc
    specs = {s.arg.name: s for s in program.graph_signature.input_specs}
    state = dict(program.state_dict)
    zeros = zero_buffers(model)
    graph = Graph()
    env: dict[str, Value] = {}
    for node in program.graph.nodes:
        if node.op == "placeholder":
            spec = specs[node.name]
            kind = spec.kind.name
            fake = node.meta["val"]
            if kind == "PARAMETER":
                v = graph.new_value(fake.shape, fake.dtype, PARAM, spec.target)
                graph.params[spec.target] = v
            elif kind == "BUFFER":
                v = graph.new_value(fake.shape, fake.dtype, BUFFER, spec.target)
                v.zero = spec.target in zeros
                graph.params[spec.target] = v
            elif kind in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
                v = graph.new_value(fake.shape, fake.dtype, CONST)
                v.data = program.constants.get(spec.target, state.get(spec.target))
            else:
                v = graph.new_value(fake.shape, fake.dtype, INPUT, depends_on_input=True)
                graph.inputs.append(v)
            env[node.name] = v
        elif node.op == "call_function" and node.target is operator.getitem:
            source, index = node.args
            env[node.name] = env[f"{source.name}#{index}"]
        elif node.op == "call_function":
            _convert(graph, node, env)
        elif node.op == "output":
            outs = [env[n.name] for n in tree_flatten(node.args[0])[0] if isinstance(n, torch.fx.Node)]
            graph.outputs.extend(outs)
            graph.output_is_tensor = len(outs) == 1 and isinstance(node.args[0][0], torch.fx.Node)
    # parameters the graph never reads still belong to the model
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if name not in graph.params:
            graph.params[name] = graph.new_value(p.shape, p.dtype, PARAM if isinstance(p, torch.nn.Parameter)
                                                 else BUFFER, name)
    return graph, None


def _convert(graph: Graph, fx_node: torch.fx.Node, env: dict[str, Value]) -> None:
    def value(obj):
        if isinstance(obj, torch.fx.Node):
            return env[obj.name]
        if isinstance(obj, (list, tuple)):
            return type(obj)(value(o) for o in obj)
        return obj

    args, kwargs = value(tuple(fx_node.args)), {k: value(v) for k, v in fx_node.kwargs.items()}
    inputs = [v for v in tree_flatten((args, kwargs))[0] if isinstance(v, Value)]
    stack = fx_node.meta.get("nn_module_stack") or {}
    scope = list(stack.values())[-1][0] if stack else ""
    outs: list[Value] = []
    node = Node(len(graph.nodes), str(fx_node.target), args, kwargs, outs, scope, fx_node.target)
    dep = any(v.depends_on_input for v in inputs)
    vals = fx_node.meta.get("val")
    if isinstance(vals, torch.Tensor):
        v = graph.new_value(vals.shape, vals.dtype, ACT, producer=node, depends_on_input=dep)
        outs.append(v)
        env[fx_node.name] = v
    elif isinstance(vals, (list, tuple)):
        for i, t in enumerate(vals):
            if isinstance(t, torch.Tensor):
                v = graph.new_value(t.shape, t.dtype, ACT, producer=node, depends_on_input=dep)
                outs.append(v)
                env[f"{fx_node.name}#{i}"] = v
    graph.nodes.append(node)
