"""Read an ONNX file into the graph IR.

Exporters leave many shapes unknown, so one ONNX Runtime run on example inputs gives every tensor its
concrete shape, as the torch tracer's real forward does. Computations on constants and shapes (the
Shape -> Gather -> Concat -> Reshape chains exporters emit) are folded into constants that remember which
run-time widths they read (Value.reads / Value.sources), so a rule can tell a literal the backend may
rewrite from a width the pruned graph recomputes by itself. Float initializers and quantized weights are
parameters; batch-norm statistics, quantization scales and masks are buffers; other integer initializers
and Constant nodes are constants.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import GraphPruneError, TraceError, UsageError
from .graph import BUFFER, CONST, INPUT, PARAM, Graph, Node, Value

log = logging.getLogger(__name__)

# folded values at most this long keep per-element sources (shape vectors are a handful of elements)
_SOURCE_LIMIT = 64
_NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout"}


@dataclass
class OnnxGraph:
    """The IR of one ONNX model plus what its backend needs to edit the file it came from."""

    graph: Graph
    model: object  # the onnx_ir.Model the IR was read from; the backend edits it
    feeds: dict[str, np.ndarray]  # the inputs the shapes were recorded with
    values: dict[str, Value] = field(default_factory=dict)  # ONNX value name -> IR value
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # weights (float and quantized) by name
    # folded values computed from widths, in a model whose inputs have fixed shapes: every width is then
    # a constant, so rules see literals and the backend writes these values as constants
    frozen: set[int] = field(default_factory=set)


def load_model(path: str | os.PathLike, check: bool = True, weights: bool = True):
    """The model at `path` as an onnx_ir.Model with its weights in memory (weights=False: the graph only),
    after the ONNX checker accepted it; clear errors otherwise."""
    import onnx
    import onnx_ir as ir
    from google.protobuf.message import DecodeError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f"no ONNX file at {path}; check the path")
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory; give the path of an .onnx file")
    try:
        onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise GraphPruneError(f"{path} is not an ONNX model (it does not parse: {_short(exc)}); if it is truncated, "
                              "export or download it again") from exc
    try:
        if check:
            onnx.checker.check_model(path)
    except Exception as exc:  # onnx raises ValidationError, or C++ errors for missing external data
        raise GraphPruneError(f"{path} is not a valid ONNX model ({_short(exc)}); fix the export or run "
                              "onnx.checker.check_model on it for details") from exc
    try:
        model = ir.load(path)
        if weights:
            ir.external_data.load_to_model(model)  # weights in memory: the source file is never touched again
    except Exception as exc:
        raise GraphPruneError(f"could not read {path}: {_short(exc)}") from exc
    return model


def external_data_files(path: str | os.PathLike) -> set[str]:
    """Locations (relative to the model) of the external data files an ONNX file refers to; none if it does
    not parse (load_model reports that)."""
    import onnx
    from onnx.external_data_helper import uses_external_data as external

    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # noqa: BLE001
        return set()
    return {{e.key: e.value for e in t.external_data}.get("location", "") for t in proto.graph.initializer
            if external(t)} - {""}


def opset_of(model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def example_feeds(model, shapes: dict[str, tuple[int, ...]] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every graph input. Unknown dims: 1 for the first (batch), 224 for the spatial dims
    of a 4-d float input (an image), 16 otherwise; `shapes` overrides by input name. Integer inputs get 1s
    where the name says mask and 0/1 ids elsewhere (valid for any vocabulary)."""
    shapes = dict(shapes or {})
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in _real_inputs(model.graph):
        if v.name in shapes:
            dims = tuple(int(d) for d in shapes.pop(v.name))
        else:
            if v.shape is None:
                raise UsageError(f"input '{v.name}' has no shape in the model; give one with "
                                 f"--input-shape {v.name}=D0,D1,...")
            image = len(v.shape) == 4 and v.dtype.is_floating_point()
            dims = tuple(d if isinstance(d, int) else (1 if a == 0 else 224 if image and a >= 2 else 16)
                         for a, d in enumerate(v.shape.dims))
        dtype = v.dtype.numpy()
        if np.issubdtype(dtype, np.floating):
            feeds[v.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_ or "mask" in v.name.lower():
            feeds[v.name] = np.ones(dims, dtype=dtype)
        else:
            feeds[v.name] = rng.integers(0, 2, dims).astype(dtype)
    if shapes:
        raise UsageError(f"input shapes given for {sorted(shapes)}, which the model does not have; its inputs "
                         f"are {[v.name for v in _real_inputs(model.graph)]}")
    return feeds


def check_feeds(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """User inputs matched to the model's inputs by name, cast to the dtypes the model declares."""
    inputs = {v.name: v for v in _real_inputs(model.graph)}
    missing, extra = sorted(set(inputs) - set(feeds)), sorted(set(feeds) - set(inputs))
    if missing or extra:
        raise UsageError(f"the inputs given do not match the model's: missing {missing}, unexpected {extra}; "
                         f"the model takes {sorted(inputs)}")
    out = {}
    for name, v in inputs.items():
        a = np.asarray(feeds[name])
        want = v.dtype.numpy()
        if a.dtype != want:
            if np.issubdtype(a.dtype, np.floating) and not np.issubdtype(want, np.floating):
                raise UsageError(f"input '{name}' holds {a.dtype} values but the model takes {want}")
            a = a.astype(want)
        out[name] = a
    return out


def _real_inputs(graph) -> list:
    return [v for v in graph.inputs if not v.is_initializer()]


def session(proto_or_bytes, threads: int | None = None, optimize: bool = True, profile: str | None = None):
    """A CPU ONNX Runtime session; `threads` fixes intra-op threads for timing, with idle threads not spinning
    (several sessions timed in turn would otherwise fight over the cores: up to 6x slower on two); `profile`,
    a file prefix, turns ONNX Runtime's per-kernel profiling on (end_profiling() returns the file)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = proto_or_bytes if isinstance(proto_or_bytes, (bytes, str)) else proto_or_bytes.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def round_robin(sessions: list, feeds: dict[str, np.ndarray], runs: int, warmup: int,
                progress: Callable[[str], None] | None = None, turns: int = 5) -> list[list[float]]:
    """Seconds per run of each session (graphprune bench, latency tables). The sessions take `turns` turns, so a
    change of machine load hits all alike; in each turn a session runs once untimed, then its share of `runs`
    back to back: a model run in alternation with others would be timed with cold caches (five small models
    alternating run 1.5x slower each)."""
    for sess in sessions:
        for _ in range(warmup):
            sess.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    turns = max(1, min(turns, runs))
    for turn in range(turns):
        if progress:
            progress(f"timing {len(sessions)} models, turn {turn + 1}/{turns}")
        share = runs // turns + (turn < runs % turns)
        for sess, t_list in zip(sessions, times):
            sess.run(None, feeds)
            for _ in range(share):
                t = time.perf_counter()
                sess.run(None, feeds)
                t_list.append(time.perf_counter() - t)
    return times


def session_returning(model, names: list[str]):
    """An unoptimized session of `model` that also returns the named intermediate tensors."""
    import onnx
    import onnx_ir as ir

    proto = ir.to_proto(model)
    have = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    return session(proto, optimize=False)


def capture(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every named tensor of the main graph, from one unoptimized ONNX Runtime run."""
    names = [o.name for node in model.graph for o in node.outputs if o.name]
    try:
        sess = session_returning(model, names)
        outs = sess.run(None, feeds)
    except Exception as exc:
        raise TraceError(f"ONNX Runtime could not run the model on example inputs "
                         f"{ {k: list(v.shape) for k, v in feeds.items()} }: {_short(exc)}; give the input shapes "
                         "it expects with --input-shape NAME=D0,D1,...") from exc
    return {o.name: np.asarray(a) for o, a in zip(sess.get_outputs(), outs)}


def untie_constants(model) -> None:
    """Give every reader of a shared constant-valued float initializer (the zero biases of a freshly initialised
    model, which exporters merge into one tensor) its own copy, so unrelated layers' channels are not tied.
    A constant-valued tensor is the same under any choice of channels, so this never changes what the model
    computes; shared tensors of different values (tied embeddings) stay shared. Deterministic: the same file
    gives the same copies and names."""
    import onnx_ir as ir

    graph = model.graph
    readers: dict[str, list[tuple[object, int]]] = {}
    for node in graph:
        for i, v in enumerate(node.inputs):
            if v is not None and v.name in graph.initializers and graph.initializers[v.name] is v:
                readers.setdefault(v.name, []).append((node, i))
    names = set(graph.initializers) | {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs}
    for name, uses in readers.items():
        init = graph.initializers[name]
        if len(uses) < 2 or init.const_value is None or not init.dtype.is_floating_point():
            continue
        data = init.const_value.numpy()
        if data.ndim == 0 or data.size < 2 or not (data == data.reshape(-1)[0]).all():
            continue
        for k, (node, i) in enumerate(uses[1:], 1):
            copy = f"{name}_copy{k}"
            while copy in names:
                copy += "_"
            names.add(copy)
            value = ir.Value(name=copy, shape=ir.Shape(data.shape), type=init.type,
                             const_value=ir.tensor(data, name=copy))
            graph.register_initializer(value)
            node.replace_input_with(i, value)


def to_graph(model, feeds: dict[str, np.ndarray]) -> OnnxGraph:
    """Build the IR: one node per ONNX node that touches activations; shape computations folded. Shared
    constant-valued initializers are untied in `model` first (untie_constants)."""
    feeds = check_feeds(model, feeds)
    untie_constants(model)
    captured = capture(model, feeds)
    g = Graph(output_is_tensor=False)
    result = OnnxGraph(g, model, feeds)
    values = result.values
    buffers = {n.inputs[i].name for n in model.graph if n.op_type == "BatchNormalization"
               for i in (3, 4) if len(n.inputs) > i and n.inputs[i] is not None}
    # the scales a QuantizeLinear divides by are buffers too; quantized weights (integers a
    # DequantizeLinear reads) are weights
    buffers |= {n.inputs[1].name for n in model.graph if n.op_type == "QuantizeLinear" and len(n.inputs) > 1
                and n.inputs[1] is not None}
    quantized = {n.inputs[0].name for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0] is not None}

    for v in _real_inputs(model.graph):
        iv = g.new_value(feeds[v.name].shape, feeds[v.name].dtype, INPUT, depends_on_input=True)
        values[v.name] = iv
        g.inputs.append(iv)
    for name, init in model.graph.initializers.items():
        data = init.const_value.numpy()
        if np.issubdtype(data.dtype, np.floating) or name in quantized:
            # batch-norm statistics and masks (infinities, finfo.min fills) are buffers, not weights
            big = min(1e30, float(np.finfo(data.dtype).max) / 2) if np.issubdtype(data.dtype, np.floating) else 1e30
            mask = data.size and (not np.isfinite(data).all() or float(np.abs(data).max()) > big)
            kind = BUFFER if name in buffers or mask else PARAM
            iv = g.new_value(data.shape, data.dtype, kind, name)
            iv.data = data  # rules read small ones as attributes (Pad value, Clip bounds, Pow exponent)
            g.params[name] = iv
            result.tensors[name] = data
        else:
            iv = g.new_value(data.shape, data.dtype, CONST)
            iv.data = data
            iv.sources = _literals(data)
        values[name] = iv

    folded_from_widths: list[Value] = []
    for node in model.graph:
        ins = [values.get(v.name) if v is not None and v.name else None for v in node.inputs]
        ins += [values[name] for name in _outer_reads(node) if name in values]  # control flow: pinned
        missing = [v.name for v, iv in zip(node.inputs, ins) if v is not None and v.name and iv is None]
        if missing:
            raise TraceError(f"node '{node.name}' ({node.op_type}) reads {missing}, which nothing produces")
        outs = [o for o in node.outputs if o.name and o.name in captured]
        if _foldable(node, ins):
            for o in outs:
                values[o.name] = _folded(g, node, ins, o.name, captured[o.name])
                if values[o.name].reads:
                    folded_from_widths.append(values[o.name])
            continue
        out_values = []
        for o in outs:
            data = captured[o.name]
            ov = g.new_value(data.shape, data.dtype, depends_on_input=any(
                iv is not None and iv.depends_on_input for iv in ins))
            values[o.name] = ov
            out_values.append(ov)
        op = f"onnx.{node.op_type}" if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        attrs = {k: a.value for k, a in node.attributes.items()}
        irn = Node(len(g.nodes), op, tuple(ins), attrs, out_values, scope=node.name or "", target=node)
        for ov in out_values:
            ov.producer = irn
        g.nodes.append(irn)
    dynamic = _dynamic_widths(model, feeds, values, folded_from_widths)
    for v in folded_from_widths:
        _fix_widths(v, dynamic, result.frozen)
    for o in model.graph.outputs:
        v = values.get(o.name)
        if v is None:
            raise TraceError(f"graph output '{o.name}' is not computed by the graph")
        g.outputs.append(v)
    return result


def _dynamic_widths(model, feeds: dict[str, np.ndarray], values: dict[str, Value],
                    folded: list[Value]) -> frozenset | None:
    """The widths (value id, axis) that folded values read and that follow the inputs' symbolic dims (batch,
    sequence): those that change in a second ONNX Runtime run with every symbolic dim one larger. Empty when
    the inputs have fixed shapes; None when the model does not run at the other shapes (nothing is known)."""
    read = {r for v in folded for r in v.reads}
    other = {}
    for v in _real_inputs(model.graph):
        a = feeds[v.name]
        for axis in range(a.ndim):
            symbolic = v.shape is None or len(v.shape) != a.ndim or not isinstance(v.shape.dims[axis], int)
            if symbolic and a.shape[axis]:
                a = np.take(a, np.arange(a.shape[axis] + 1) % a.shape[axis], axis=axis)  # valid ids stay valid
        other[v.name] = a
    if not read or all(other[k].shape == feeds[k].shape for k in feeds):
        return frozenset()
    name_of = {v.id: name for name, v in values.items()}
    shapes = {k: a.shape for k, a in other.items()}
    names = sorted({name_of[vid] for vid, _ in read} - set(shapes))
    try:
        shapes.update(zip(names, (np.shape(a) for a in session_returning(model, names).run(names, other))))
    except Exception as exc:  # noqa: BLE001
        log.info("the model does not run with its symbolic dims changed (%s): widths computed at run time stay "
                 "whole", _short(exc))
        return None
    return frozenset((vid, axis) for vid, axis in read
                     if shapes[name_of[vid]][axis] != values[name_of[vid]].shape[axis])


def _fix_widths(v: Value, dynamic: frozenset | None, frozen: set[int]) -> None:
    """A folded value computed from fixed widths only is a constant (the backend writes it as one); in a vector,
    each element copied or computed from fixed widths is a literal the backend may rewrite (a copy of a channel
    width would otherwise tie that width to whatever axis the element sets)."""
    if dynamic is None:
        return
    if not v.reads & dynamic:
        frozen.add(v.id)
        v.reads, v.sources = frozenset(), _literals(v.data)
    elif v.sources is not None:
        v.sources = tuple(None if e is None or (e not in dynamic if isinstance(e, tuple) else not e & dynamic)
                          else e for e in v.sources)
        v.reads = frozenset(r for e in v.sources if e for r in ({e} if isinstance(e, tuple) else e))


def _outer_reads(node) -> list[str]:
    """Names of outer-graph values that the subgraphs of a control-flow node (If, Loop, Scan) read."""
    found: list[str] = []
    for a in node.attributes.values():
        if a.type.name not in ("GRAPH", "GRAPHS"):
            continue
        for sub in a.value if a.type.name == "GRAPHS" else [a.value]:
            inner = {v.name for v in sub.inputs} | set(sub.initializers)
            for n in sub.all_nodes() if hasattr(sub, "all_nodes") else sub:
                inner |= {v.name for v in n.outputs}
                found += [v.name for v in n.inputs if v is not None and v.name and v.name not in inner]
    return sorted(set(found))


def _foldable(node, ins: list[Value | None]) -> bool:
    """A node computed from constants and shapes only: folded into a constant."""
    if node.domain not in ("", "ai.onnx") or node.op_type in _NONDETERMINISTIC:
        return False
    if any(a.type.name in ("GRAPH", "GRAPHS") for a in node.attributes.values()):
        return False
    if node.op_type in ("Shape", "Size"):
        return True
    return all(v is None or v.kind == CONST for v in ins)


def _literals(data: np.ndarray) -> tuple | None:
    return (None,) * data.size if data.ndim <= 1 and data.size <= _SOURCE_LIMIT else None


def _folded(g: Graph, node, ins: list[Value | None], name: str, data: np.ndarray) -> Value:
    v = g.new_value(data.shape, data.dtype, CONST)
    v.data = data
    op = node.op_type
    x = ins[0] if ins else None
    if op == "Shape":
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        axes = list(range(x.ndim))[slice(start, end)]
        if x.kind == CONST:  # the shape of a folded value: literal unless its shape came from widths
            v.sources = (frozenset(x.reads) if x.reads else None,) * len(axes)
        else:
            v.sources = tuple((x.id, a) for a in axes)
    elif op == "Size":
        v.sources = (None if x.kind == CONST and not x.reads else frozenset(
            x.reads if x.kind == CONST else {(x.id, a) for a in range(x.ndim)}),)
    else:
        v.sources = _propagate(op, node, ins, data)
    reads = set()
    for s in v.sources or ():
        if isinstance(s, tuple):
            reads.add(s)
        elif s:
            reads |= s
    if v.sources is None:
        for iv in ins:
            if iv is not None:
                reads |= iv.reads
    v.reads = frozenset(reads)
    if v.sources is not None and len(v.sources) != data.size:
        v.sources = None
    return v


def _propagate(op: str, node, ins: list[Value | None], data: np.ndarray) -> tuple | None:
    """Per-element sources of a folded value, exact for the ops shape chains are made of."""
    if data.ndim > 1 or data.size > _SOURCE_LIMIT:
        return None
    src = [iv.sources if iv is not None else None for iv in ins]
    if op == "Constant":
        return _literals(data)
    if op in ("Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Flatten", "CastLike") and src[0] is not None:
        return src[0]
    if op == "Concat" and all(s is not None for s in src):
        return tuple(e for s in src for e in s)
    if op == "Gather" and src[0] is not None and ins[0].ndim == 1:
        return tuple(src[0][int(i)] for i in np.asarray(ins[1].data).reshape(-1))
    if op == "Slice" and src[0] is not None and ins[0].ndim == 1:
        if "starts" in node.attributes:  # opset < 10
            start, end, step = _attr(node, "starts", [0])[0], _attr(node, "ends", [0])[0], 1
        elif len(ins) > 2 and ins[1] is not None and ins[2] is not None:
            start, end = int(ins[1].data.reshape(-1)[0]), int(ins[2].data.reshape(-1)[0])
            step = int(ins[4].data.reshape(-1)[0]) if len(ins) > 4 and ins[4] is not None else 1
        else:
            return None
        return tuple(src[0][int(i)] for i in np.arange(ins[0].shape[0])[slice(start, end, step)])
    # anything else: each element may depend on every width any input read
    reads = set()
    for iv in ins:
        if iv is not None:
            reads |= iv.reads
    return (frozenset(reads) if reads else None,) * data.size


def _attr(node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value
