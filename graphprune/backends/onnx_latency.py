"""Latency tables measured in ONNX Runtime on the CPU (passes/latency.py reads them).

Each FLOP-bearing node of an ONNX file is rebuilt alone, as a one-node model at the widths of its grid, and
timed from ONNX Runtime's profile: only the node's own kernels count, not the layout changes ONNX Runtime
puts around a lone node that the whole model does not have. The whole model, and the model pruned to half its
FLOPs at each candidate channel multiple, are timed round-robin: the fastest multiple, and the two points the
layers' sum is fitted to. A table is cached on disk by a fingerprint of the graph's structure (ops,
attributes, shapes, the analysis' FLOP terms: not the weights), the runtime, its version, the threads and
the CPU.
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
from ..passes.latency import Layer, LatencyModel, LatencyTable, flop_nodes, grid_widths, layer_spaces, removal_for

log = logging.getLogger(__name__)

RUNTIME = "onnxruntime"
BLOCKS = (1, 8, 16, 32)  # channel multiples tried for the fastest kernels
BLOCK_SLACK = 1.03  # the smallest multiple whose model runs within this of the fastest wins
PROBE_FLOPS = 0.5  # the plans that tell the multiples apart keep this much of the FLOPs
_LAYOUT = ("ReorderInput", "ReorderOutput", "Transpose")  # what ONNX Runtime adds around a lone node


def cache_dir() -> str:
    """Where tables are kept: $GRAPHPRUNE_CACHE/latency, else ~/.cache/graphprune/latency."""
    root = os.environ.get("GRAPHPRUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "graphprune")
    return os.path.join(root, "latency")


def fingerprint(loaded, threads: int) -> str:
    """Structure, runtime and machine: what a layer's time depends on (weights' values do not count)."""
    import onnxruntime

    g = loaded.an.graph
    parts = [RUNTIME, onnxruntime.__version__, str(threads), _cpu(), platform.machine(),
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
    key = fingerprint(loaded, threads)
    path = os.path.join(cache_dir(), f"{RUNTIME}-{key[:24]}.json")
    if cache and os.path.exists(path):
        try:
            table = LatencyTable.load(path)
        except (OSError, ValueError, TypeError, KeyError) as exc:  # written by another version: measure again
            log.warning("ignoring the latency table %s (%s)", path, exc)
        else:
            if table.fingerprint == key:
                say(f"latency table from {path}")
                return table
    started = time.perf_counter()
    an = loaded.an
    nodes = flop_nodes(an)
    coords = {n: layer_spaces(an, terms) for n, terms in nodes.items()}
    say(f"timing the model pruned at channel multiples {', '.join(map(str, BLOCKS))}")
    whole_ms, probes = _probe_blocks(loaded, threads)
    fastest = min(ms for _, ms in probes.values())
    block = min(b for b, (_, ms) in probes.items() if ms <= BLOCK_SLACK * fastest)
    timer = _Timer(loaded, threads)
    layers = []
    for k, (n, spaces) in enumerate(coords.items()):
        say(f"timing layers on {RUNTIME} ({threads} thread(s)) {k + 1}/{len(coords)}")
        grid = [grid_widths(int(an.space_size[s]), block) for s in spaces]
        points = np.array(np.meshgrid(*grid, indexing="ij")).reshape(len(spaces), -1).T if spaces else [()]
        ms = [timer.node_ms(n, dict(zip(spaces, map(int, p)))) for p in points]
        shape = [len(g) for g in grid]
        layers.append(Layer(n, nodes[n][0].label, [list(an.space_key[s]) for s in spaces], grid,
                            np.array(ms).reshape(shape).tolist() if shape else ms))
    table = LatencyTable(RUNTIME, key, threads, block, whole_ms, 0.0, 1.0, layers)
    rest, scale = _fit(LatencyModel(an, table), whole_ms, *probes[block])
    table.rest_ms, table.scale = rest, scale
    table.notes = [f"measured {len(layers)} layers ({timer.count} one-node models) in "
                   f"{time.perf_counter() - started:.0f} s; the model pruned by a FLOPs plan runs " +
                   ", ".join(f"{whole_ms / ms:.2f}x at multiples of {b}" for b, (_, ms) in probes.items()) +
                   f": channel block {block}"]
    if cache:
        os.makedirs(cache_dir(), exist_ok=True)
        table.save(path)
    return table


def _probe_blocks(loaded, threads: int) -> tuple[float, dict[int, tuple[np.ndarray, float]]]:
    """The whole model's median ms, and per channel multiple the components a half-FLOPs plan (or halfway to
    the fewest FLOPs reachable) at that multiple removes with the median ms of the model they leave, all timed round-robin: which multiple the runtime runs
    fastest, layout changes and fusions included, and a second point to fit the tables to."""
    from ..analysis.channels import analyze
    from ..analysis.cost import CostModel
    from ..errors import BudgetError
    from ..ir.from_onnx import load_model, round_robin, session, to_graph
    from ..passes.select import select
    from . import onnx as backend

    an, og = loaded.an, loaded.og
    flops = CostModel(an, an.flop_terms)
    plans, sessions = {}, [session(loaded.path, threads=threads)]
    ratio = PROBE_FLOPS
    try:
        select(an, np.ones(len(an.prunable)), flops, ratio, max_ratio=0.9)
    except BudgetError as err:  # little to prune: probe halfway to what can be reached
        if err.reachable >= 0.98:
            raise BudgetError(f"nothing in this model can be pruned to save latency ({err})",
                              reachable=err.reachable) from err
        ratio = (1 + err.reachable) / 2
    for block in BLOCKS:
        removed = select(an, np.ones(len(an.prunable)), flops, ratio, max_ratio=0.9,
                         round_to="auto" if block > 1 else None, auto_round=block)
        fresh = to_graph(load_model(loaded.path), og.feeds)  # the backend edits the graph it is given
        gone = np.zeros(len(an.prunable), dtype=bool)
        gone[removed] = True
        slim = backend.apply(fresh, analyze(fresh.graph, allow_lossy=bool(an.lossy.any())), gone)
        plans[block] = removed
        sessions.append(session(slim, threads=threads))
    times = [1e3 * float(np.median(t)) for t in round_robin(sessions, og.feeds, runs=20, warmup=3)]
    return times[0], {b: (plans[b], ms) for b, ms in zip(BLOCKS, times[1:])}


def _fit(model: LatencyModel, whole_ms: float, removed: np.ndarray, probe_ms: float) -> tuple[float, float]:
    """rest + scale * (sum of the layers' tables) through the two measured points: the whole model and the
    probe; where the probe is too close to tell, the layers alone, scaled to the whole."""
    full, probe = model.total(), model.total(removed)
    if full - probe > 0.05 * full:
        scale = (whole_ms - probe_ms) / (full - probe)
        rest = whole_ms - scale * full
        if scale > 0 and -0.5 * whole_ms <= rest <= whole_ms:
            return rest, scale
    return 0.0, whole_ms / full if full > 0 else 1.0


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
        kept = _kept(an, removal_for(an, widths))
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
            self.cache[key] = self._profile(model.SerializeToString(), feeds)
        return self.cache[key]

    def _data(self, v, shape: list[int]) -> np.ndarray:
        dtype = np.dtype(v.dtype)
        if v.data is not None and list(np.shape(v.data)) == list(shape):
            return np.asarray(v.data)
        if np.issubdtype(dtype, np.floating):
            return self.rng.standard_normal(shape).astype(dtype)
        return np.zeros(shape, dtype=dtype)

    def _profile(self, model_bytes: bytes, feeds: dict[str, np.ndarray]) -> float:
        """Median ms per run of a one-node model's kernels, layout changes left out."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.enable_profiling = True
        with tempfile.TemporaryDirectory(prefix="graphprune-latency-") as tmp:
            options.profile_file_prefix = os.path.join(tmp, "profile")
            sess = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
            sess.run(None, feeds)
            first = time.perf_counter()
            sess.run(None, feeds)
            first = time.perf_counter() - first
            for _ in range(int(np.clip(0.3 / max(first, 1e-6), 5, 30))):
                sess.run(None, feeds)
            with open(sess.end_profiling()) as f:
                events = json.load(f)
        kernels: dict[str, list[float]] = defaultdict(list)
        for e in events:
            if (e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
                    and e.get("args", {}).get("op_name") not in _LAYOUT):
                kernels[e["name"]].append(e["dur"] / 1e3)
        return float(sum(np.median(k) for k in kernels.values()))


def _kept(an, removed: np.ndarray) -> np.ndarray:
    from ..analysis.cost import CostModel

    return CostModel(an, []).kept_widths(removed)


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
