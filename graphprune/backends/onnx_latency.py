"""Latency tables measured in ONNX Runtime on the CPU (passes/latency.py reads them).

Each FLOP-bearing node of an ONNX file is rebuilt alone, as a one-node model at the widths of its grid, and
timed from ONNX Runtime's profile: only the node's own kernels count, not the layout changes ONNX Runtime
puts around a lone node that the whole model does not have. The whole model and the model pruned by FLOPs plans
(half the FLOPs at each candidate channel multiple; then more and less at the fastest one) are timed in turns:
which multiple runs fastest, and the measured points the table's model is fitted to. A table is cached on
disk by a fingerprint of the graph's structure (ops, attributes, shapes, the analysis' FLOP terms: not the
weights), the table format, the runtime and its version, the threads and the CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from ..ir.graph import ACT, INPUT
from ..passes.latency import (GRID, Layer, LatencyModel, LatencyTable, flop_nodes, grid_widths, layer_spaces,
                              removal_for)

log = logging.getLogger(__name__)

RUNTIME = "onnxruntime"
TABLE_VERSION = 2  # how tables are measured and fitted: a change measures every cached table again
BLOCKS = (1, 8, 16, 32)  # channel multiples tried for the fastest kernels
BLOCK_SLACK = 1.03  # the smallest multiple whose model runs within this of the fastest wins
PROBE_FLOPS = 0.5  # the plans that tell the multiples apart keep this much of the FLOPs
TURNS = 6  # the probe models are timed in this many turns of 10 runs
_LAYOUT = ("ReorderInput", "ReorderOutput", "Transpose")  # what ONNX Runtime adds around a lone node
_FLOP_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "FusedConv", "FusedGemm", "FusedMatMul",
             "NhwcFusedConv", "NhwcConv", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger"}


def cache_dir() -> str:
    """Where tables are kept: $GRAPHPRUNE_CACHE/latency, else ~/.cache/graphprune/latency."""
    root = os.environ.get("GRAPHPRUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "graphprune")
    return os.path.join(root, "latency")


def fingerprint(loaded, threads: int) -> str:
    """Structure, runtime and machine: what a layer's time depends on (weights' values do not count)."""
    import onnxruntime

    g = loaded.an.graph
    parts = [RUNTIME, f"table {TABLE_VERSION} {GRID} {BLOCKS}", onnxruntime.__version__, str(threads), _cpu(),
             platform.machine(),
             json.dumps([(t.node, [int(s) for s in t.spaces]) for t in loaded.an.flop_terms])]
    for node in g.nodes:
        shapes = [list(v.shape) if hasattr(v, "shape") else None for v in node.args]
        parts.append(json.dumps([node.op, sorted((k, repr(v)) for k, v in node.kwargs.items()), shapes,
                                 [getattr(v, "dtype", None) for v in node.args]]))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def measure(loaded, threads: int = 1, cache: bool = True,
            progress: Callable[[str], None] | None = None) -> LatencyTable:
    """The latency table of an ONNX file read by graphprune.onnx.read, from the cache when it is there."""
    say = progress or (lambda message: log.info(message))
    an = loaded.an
    key = fingerprint(loaded, threads)
    path = os.path.join(cache_dir(), f"{RUNTIME}-{key[:24]}.json")
    if cache and os.path.exists(path):
        try:
            table = LatencyTable.load(path)
            table.check(an)
        except (OSError, ValueError, TypeError, KeyError) as exc:  # damaged, or written by another version
            log.warning("measuring again: the latency table %s is unusable (%s)", path, exc)
        else:
            if table.fingerprint == key:
                say(f"latency table from {path}")
                return table
    started = time.perf_counter()
    nodes = flop_nodes(an)
    coords = {n: layer_spaces(an, terms) for n, terms in nodes.items()}
    ratio = _probe_ratio(loaded)
    say(f"timing the model pruned to {ratio:.2f} of its FLOPs at channel multiples {', '.join(map(str, BLOCKS))}")
    plans = {b: r for b in BLOCKS if (r := _flops_plan(loaded, ratio, b)) is not None}
    whole_ms, *times = _time_pruned(loaded, threads, list(plans.values()))
    by_block = dict(zip(plans, times))
    block = min(b for b, ms in by_block.items() if ms <= BLOCK_SLACK * min(by_block.values()))
    timer = _Timer(loaded, threads)
    layers = []
    for k, (n, spaces) in enumerate(coords.items()):
        say(f"timing layers on {RUNTIME} ({threads} thread(s)) {k + 1}/{len(coords)}")
        grid = [grid_widths(an, s, block) for s in spaces]
        points = np.array(np.meshgrid(*grid, indexing="ij")).reshape(len(spaces), -1).T if spaces else [()]
        ms = [timer.node_ms(n, dict(zip(spaces, map(int, p)))) for p in points]
        shape = [len(g) for g in grid]
        layers.append(Layer(n, nodes[n][0].label, [list(an.space_key[s]) for s in spaces], grid,
                            np.array(ms).reshape(shape).tolist() if shape else ms))
    table = LatencyTable(RUNTIME, key, threads, block, whole_ms, 0.0, 1.0, 0.0, layers)
    alone = sum(float(np.ravel(layer.ms)[-1]) for layer in layers)  # the last point: full widths
    _fit(table, alone, *timer.whole_kernels(), an, plans[block], by_block[block])
    table.notes = [f"measured {len(layers)} layers ({timer.count} one-node models) in "
                   f"{time.perf_counter() - started:.0f} s; the model pruned to {ratio:.2f} of its FLOPs runs " +
                   ", ".join(f"{whole_ms / ms:.2f}x at multiples of {b}" for b, ms in by_block.items()) +
                   f": channel block {block}; latency = {table.rest_ms:.2f} ms + {table.scale:.3f} x layers + "
                   f"{table.activation_ms:.2f} ms x activations kept"]
    if cache:
        os.makedirs(cache_dir(), exist_ok=True)
        table.save(path)
    return table


def _probe_ratio(loaded) -> float:
    """The FLOPs the probe plans keep: half, or halfway to the fewest reachable."""
    from ..errors import BudgetError
    from ..passes.select import select

    try:
        select(loaded.an, np.ones(len(loaded.an.prunable)), loaded.flops, PROBE_FLOPS, max_ratio=0.9)
        return PROBE_FLOPS
    except BudgetError as err:
        if err.reachable >= 0.98:
            raise BudgetError(f"nothing in this model can be pruned to save latency ({err})",
                              reachable=err.reachable) from err
        return (1 + err.reachable) / 2


def _flops_plan(loaded, ratio: float, block: int) -> np.ndarray | None:
    """The components a FLOPs plan at `ratio` removes with widths in multiples of `block` (None: out of reach)."""
    from ..errors import BudgetError
    from ..passes.select import select

    try:
        return select(loaded.an, np.ones(len(loaded.an.prunable)), loaded.flops, ratio, max_ratio=0.9,
                      round_to="auto" if block > 1 else None, auto_round=block)
    except BudgetError:
        return None


def _time_pruned(loaded, threads: int, removals: list[np.ndarray]) -> list[float]:
    """Ms per run of the whole model, then of the model without each set of components, timed in turns: the
    fastest turn's median, so a burst of load on the machine during one turn does not count."""
    from ..analysis.channels import analyze
    from ..ir.from_onnx import load_model, round_robin, session, to_graph
    from . import onnx as backend

    an, og = loaded.an, loaded.og
    sessions = [session(loaded.path, threads=threads)]
    for removed in removals:
        fresh = to_graph(load_model(loaded.path), og.feeds)  # the backend edits the graph it is given
        gone = np.zeros(len(an.prunable), dtype=bool)
        gone[removed] = True
        sessions.append(session(backend.apply(fresh, analyze(fresh.graph, allow_lossy=bool(an.lossy.any())), gone),
                                threads=threads))
    times = round_robin(sessions, og.feeds, runs=10 * TURNS, warmup=3, turns=TURNS)
    return [1e3 * min(float(np.median(turn)) for turn in np.array_split(t, TURNS)) for t in times]


def _fit(table: LatencyTable, alone_ms: float, layers_ms: float, other_ms: float, an, probe: np.ndarray,
         probe_ms: float) -> None:
    """Set the table's scale, activation_ms and rest_ms. The whole model's profile splits its kernels into the
    layers' (in context: `layers_ms`, against `alone_ms` timed alone) and the others'; one factor on both and a
    constant then put the prediction through the two measured models, the whole one and the probe (a profile
    misses what runs between kernels). Where that would need a negative factor, or a constant beyond what the
    profile leaves between kernels (a burst of load while the probe ran), the profile alone. Either way the
    prediction for the whole model is its measured latency."""
    table.scale = layers_ms / alone_ms if alone_ms > 0 else 1.0
    table.activation_ms = other_ms
    table.rest_ms = 0.0
    model = LatencyModel(an, table)
    full, pruned = model.total(), model.total(probe)
    between = max(0.0, table.whole_ms - layers_ms - other_ms) + 0.05 * table.whole_ms
    if full - pruned > 0.05 * full:
        factor = (table.whole_ms - probe_ms) / (full - pruned)
        rest = table.whole_ms - factor * full
        if factor > 0 and 0 <= rest <= between:
            table.scale, table.activation_ms, table.rest_ms = factor * table.scale, factor * other_ms, rest
            return
    factor = min(1.0, table.whole_ms / full) if full > 0 else 1.0  # kernels timed longer than the whole run
    table.scale, table.activation_ms = factor * table.scale, factor * other_ms
    table.rest_ms = table.whole_ms - factor * full


class _Timer:
    """One-node models of `loaded`'s nodes at given widths, timed from ONNX Runtime profiles."""

    def __init__(self, loaded, threads: int):
        import onnx_ir as ir

        self.loaded, self.threads, self.count = loaded, threads, 0
        self.opsets = [("" if d == "ai.onnx" else d, v) for d, v in loaded.og.model.opset_imports.items()]
        self.ir_version = loaded.og.model.ir_version
        self.ir = ir
        self.rng = np.random.default_rng(0)
        self.by_id = {node.id: node for node in loaded.an.graph.nodes}
        self.cache: dict[str, float] = {}

    def node_ms(self, node_id: int, widths: dict[int, int]) -> float:
        """Time of one node's kernels when `widths` (space -> kept channels) are what it keeps."""
        import onnx
        from onnx import helper

        an = self.loaded.an
        node = self.by_id[node_id]
        kept = self.loaded.flops.kept_widths(removal_for(an, widths))
        proto = self.ir.serde.serialize_node(node.target)
        inits, inputs, feeds = [], [], {}
        for i, v in enumerate(node.args):
            if v is None or i >= len(proto.input) or not proto.input[i]:
                continue
            shape = [int(kept[an.space_index[(v.id, a)]]) if (v.id, a) in an.space_index else d
                     for a, d in enumerate(v.shape)]
            name = f"in{i}"
            proto.input[i] = name
            data = self._data(v, shape)
            if v.kind in (INPUT, ACT):
                inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(data.dtype), shape))
                feeds[name] = data
            else:
                inits.append(onnx.numpy_helper.from_array(data, name))
            if i == 0 and node.op == "onnx.Conv":
                _scale_groups(proto, v.shape[1], shape[1])
        outputs = []
        for k, o in enumerate(node.outputs):
            proto.output[k] = f"out{k}"
            outputs.append(helper.make_tensor_value_info(f"out{k}", helper.np_dtype_to_tensor_dtype(np.dtype(o.dtype)),
                                                         None))
        proto.name = "layer"
        model = helper.make_model(helper.make_graph([proto], "layer", inputs, outputs, inits),
                                  opset_imports=[helper.make_opsetid(d, v) for d, v in self.opsets],
                                  ir_version=self.ir_version)
        key = hashlib.sha256(model.SerializeToString()).hexdigest()  # repeated layers are timed once
        if key not in self.cache:
            self.count += 1
            by_op = self._profile(model.SerializeToString(), feeds)
            self.cache[key] = sum(ms for op, ms in by_op.items() if op not in _LAYOUT)
        return self.cache[key]

    def _data(self, v, shape: list[int]) -> np.ndarray:
        dtype = np.dtype(v.dtype)
        if v.data is not None and list(np.shape(v.data)) == list(shape):
            return np.asarray(v.data)
        if np.issubdtype(dtype, np.floating):
            return self.rng.standard_normal(shape).astype(dtype)
        return np.zeros(shape, dtype=dtype)

    def _profile(self, model_bytes: bytes, feeds: dict[str, np.ndarray], seconds: float = 0.3) -> dict[str, float]:
        """Median ms per run of the model's kernels, summed by op type (ONNX Runtime's profile)."""
        from ..ir.from_onnx import session

        with tempfile.TemporaryDirectory(prefix="graphprune-latency-") as tmp:
            sess = session(model_bytes, threads=self.threads, profile=os.path.join(tmp, "profile"))
            sess.run(None, feeds)
            first = time.perf_counter()
            sess.run(None, feeds)
            first = time.perf_counter() - first
            for _ in range(int(np.clip(seconds / max(first, 1e-6), 5, 30))):
                sess.run(None, feeds)
            with open(sess.end_profiling()) as f:
                events = json.load(f)
        kernels: dict[str, list[float]] = defaultdict(list)
        op_of: dict[str, str] = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                kernels[e["name"]].append(e["dur"] / 1e3)
                op_of[e["name"]] = e.get("args", {}).get("op_name", "")
        by_op: dict[str, float] = defaultdict(float)
        for name, durations in kernels.items():
            by_op[op_of[name]] += float(np.median(durations))
        return dict(by_op)

    def whole_kernels(self) -> tuple[float, float]:
        """The whole model's kernels, median ms per run: (FLOP-bearing ones, all others)."""
        og = self.loaded.og
        by_op = self._profile(self.ir.to_proto(og.model).SerializeToString(), og.feeds, seconds=2.0)
        layers = sum(ms for op, ms in by_op.items() if op in _FLOP_OPS)
        return layers, sum(by_op.values()) - layers


def _scale_groups(proto, full: int, kept: int) -> None:
    """A grouped convolution loses whole groups: its group count follows its input width."""
    for a in proto.attribute:
        if a.name == "group" and a.i > 1:
            a.i = a.i * kept // full


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
