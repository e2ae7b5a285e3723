"""Latency tables measured in ONNX Runtime on the CPU (passes/latency.py reads them).

Each FLOP-bearing node of an ONNX file is rebuilt alone, as a one-node model at the widths of its grid, and
timed from ONNX Runtime's profile: only the node's own kernels count, not the layout changes ONNX Runtime
puts around a lone node that the whole model does not have. The whole model is profiled once for the
layers' share of its latency in context. A table is cached on disk by a fingerprint of the graph's
structure (ops, attributes, shapes: not the weights), the runtime, its version, the threads and the CPU.
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
from ..passes.latency import (Layer, LatencyTable, flop_nodes, grid_widths, layer_spaces, removal_for)

log = logging.getLogger(__name__)

RUNTIME = "onnxruntime"
BLOCKS = (1, 8, 16, 32)  # channel multiples tried for the fastest kernels
BLOCK_SLACK = 1.05  # the smallest block within this of the fastest time per MAC wins
_LAYOUT = ("ReorderInput", "ReorderOutput", "Transpose")  # what ONNX Runtime adds around a lone node


def cache_dir() -> str:
    """Where tables are kept: $GRAPHPRUNE_CACHE/latency, else ~/.cache/graphprune/latency."""
    root = os.environ.get("GRAPHPRUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "graphprune")
    return os.path.join(root, "latency")


def fingerprint(loaded, threads: int) -> str:
    """Structure, runtime and machine: what a layer's time depends on (weights' values do not count)."""
    import onnxruntime

    g = loaded.an.graph
    parts = [RUNTIME, onnxruntime.__version__, str(threads), _cpu(), platform.machine()]
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
    timer = _Timer(loaded, threads)
    block = _fastest_block(an, coords, timer)
    layers = []
    for k, (n, spaces) in enumerate(coords.items()):
        say(f"timing layers on {RUNTIME} ({threads} thread(s)) {k + 1}/{len(coords)}")
        grid = [grid_widths(int(an.space_size[s]), block) for s in spaces]
        points = np.array(np.meshgrid(*grid, indexing="ij")).reshape(len(spaces), -1).T if spaces else [()]
        ms = [timer.node_ms(n, dict(zip(spaces, map(int, p)))) for p in points]
        shape = [len(g) for g in grid]
        layers.append(Layer(n, nodes[n][0].label, [list(an.space_key[s]) for s in spaces], grid,
                            np.array(ms).reshape(shape).tolist() if shape else ms))
    whole_ms, layers_ms = timer.whole_model()
    standalone = sum(float(np.asarray(layer.ms)[(-1,) * len(layer.grid)]) for layer in layers)
    table = LatencyTable(RUNTIME, key, threads, block, whole_ms, layers_ms, standalone, layers,
                         notes=[f"measured {len(layers)} layers ({timer.count} one-node models) in "
                                f"{time.perf_counter() - started:.0f} s; channel block {block}"])
    if cache:
        os.makedirs(cache_dir(), exist_ok=True)
        table.save(path)
    return table


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
            self.cache[key] = self._profile(model.SerializeToString(), feeds, own=True)[1]
        return self.cache[key]

    def whole_model(self) -> tuple[float, float]:
        """The whole model: median latency, and the median kernel time of its FLOP-bearing ops."""
        og = self.loaded.og
        return self._profile(self.ir.to_proto(og.model).SerializeToString(), og.feeds, own=False)

    def _data(self, v, shape: list[int]) -> np.ndarray:
        dtype = np.dtype(v.dtype)
        if v.data is not None and list(np.shape(v.data)) == list(shape):
            return np.asarray(v.data)
        if np.issubdtype(dtype, np.floating):
            return self.rng.standard_normal(shape).astype(dtype)
        return np.zeros(shape, dtype=dtype)

    def _profile(self, model_bytes: bytes, feeds: dict[str, np.ndarray], own: bool) -> tuple[float, float]:
        """(median wall ms per run, median ms of the counted kernels per run): for a one-node model (`own`)
        every kernel but layout changes, for the whole model the kernels of FLOP-bearing op types."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.enable_profiling = True
        with tempfile.TemporaryDirectory(prefix="graphprune-latency-") as tmp:
            options.profile_file_prefix = os.path.join(tmp, "profile")
            sess = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
            t = time.perf_counter()
            sess.run(None, feeds)
            first = time.perf_counter() - t
            runs = int(np.clip(0.3 / max(first, 1e-6), 5, 30)) if own else int(np.clip(3.0 / max(first, 1e-6), 10, 50))
            walls = []
            for _ in range(runs):
                t = time.perf_counter()
                sess.run(None, feeds)
                walls.append(time.perf_counter() - t)
            with open(sess.end_profiling()) as f:
                events = json.load(f)
        kernels: dict[str, list[float]] = defaultdict(list)
        ops: dict[str, str] = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                kernels[e["name"]].append(e["dur"] / 1e3)
                ops[e["name"]] = e.get("args", {}).get("op_name", "")
        flop_ops = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "FusedConv", "FusedGemm", "FusedMatMul",
                    "NhwcFusedConv", "NhwcConv"}
        counted = [k for k in kernels if (ops[k] not in _LAYOUT if own else ops[k] in flop_ops)]
        return 1e3 * float(np.median(walls)), float(sum(np.median(kernels[k]) for k in counted))


def _fastest_block(an, coords: dict[int, list[int]], timer: _Timer) -> int:
    """The channel multiple the model runs fastest at: every layer timed near 0.7 of its widths at each
    multiple, per MAC relative to its full width, weighted by its full-width time; within BLOCK_SLACK of
    the fastest, the smallest multiple (it leaves the plan the most choice)."""
    layers = [n for n in coords if coords[n]]
    full = {n: timer.node_ms(n, {s: int(an.space_size[s]) for s in coords[n]}) for n in layers}
    total = sum(full.values())
    if not layers or total <= 0:
        return 1
    slowdown = {}
    for block in BLOCKS:
        weighted = 0.0
        for n in layers:
            sizes = [int(an.space_size[s]) for s in coords[n]]
            widths = [_probe_width(size, block) for size in sizes]
            if None in widths:
                break
            macs = np.prod(widths) / np.prod(sizes)
            weighted += timer.node_ms(n, dict(zip(coords[n], widths))) / macs
        else:
            slowdown[block] = weighted / total
    if not slowdown:
        return 1
    best = min(slowdown.values())
    return min(b for b, r in slowdown.items() if r <= BLOCK_SLACK * best)


def _probe_width(size: int, block: int) -> int | None:
    """A width near 0.7 of `size` that is a multiple of `block` and not of twice it (odd for block 1)."""
    for w in range(int(0.7 * size), 0, -1):
        if w % block == 0 and (block == BLOCKS[-1] or w % (2 * block)):
            return w
    return None


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
