"""TensorRT backend: an engine from an ONNX file, with a report of which layers run 2:4 sparse kernels.

TensorRT decides per layer whether a sparse kernel is worth it (it times sparse against dense), so masking a
weight is no promise: the build log's "(Sparsity)" lines and the engine inspector's ``HasSparseWeights`` say
what it did, and the report puts both side by side. Supports TensorRT 10 and 11: flags are feature-detected on
the installed enums (TensorRT 11 removed ``EXPLICIT_BATCH`` and the FP16/INT8/BF16 builder flags, and its enum
values differ from 10's), never stored as integers. ``tensorrt`` and CUDA are imported only when a function
needs them, so graphprune imports without them; the parsers need neither.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import BackendError, UsageError
from ..files import atomic_write

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'graphprune[tensorrt]' (needs an NVIDIA GPU)"


# ---- what is installed ---------------------------------------------------------------------------------------

def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def available() -> str | None:
    """None when TensorRT (10 or newer) and a CUDA GPU are usable here, else why not, naming the way out."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        detail = "" if isinstance(exc, ModuleNotFoundError) else f" ({exc})"
        return f"TensorRT is not installed{detail}: {INSTALL_HINT}"
    except OSError as exc:  # the bindings are there, the libraries (libnvinfer) are not
        return f"TensorRT is not installed completely ({exc}): {INSTALL_HINT}"
    version = getattr(trt, "__version__", "0")
    if _major(version) < 10:
        return f"TensorRT {version} is too old: graphprune builds with TensorRT 10 or 11; {INSTALL_HINT}"
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return "no CUDA GPU: PyTorch is not importable, and graphprune feeds engines torch CUDA tensors"
    if not torch.cuda.is_available():
        return ("no CUDA GPU: torch.cuda.is_available() is False; TensorRT engines build and run only on an NVIDIA "
                "GPU (use the ONNX file in ONNX Runtime elsewhere)")
    return None


def _require() -> Any:
    reason = available()
    if reason is not None:
        raise BackendError(reason)
    import tensorrt as trt

    return trt


def creation_flags(trt: Any) -> tuple[int, list[str]]:
    """The network-creation flag bits for an ONNX network, and their names, read from the installed enum.

    Before TensorRT 10 an ONNX network needed EXPLICIT_BATCH; 10 ignores it (every network is explicit batch) and
    11 removed it, so it is set only where it exists and still matters. STRONGLY_TYPED stays off: on 10 it
    would forbid the FP16 flag, and 11 types every network strongly anyway."""
    enum = trt.NetworkDefinitionCreationFlag
    names = []
    if hasattr(enum, "EXPLICIT_BATCH") and _major(trt.__version__) < 10:
        names.append("EXPLICIT_BATCH")
    bits = 0
    for name in names:
        bits |= 1 << int(getattr(enum, name))
    return bits, names


def builder_flag_names(trt: Any) -> set[str]:
    """Names of the installed BuilderFlag members (TensorRT 11 has no FP16, BF16, INT8, FP8)."""
    members = getattr(trt.BuilderFlag, "__members__", None)
    if members is not None:
        return set(members)
    return {name for name in dir(trt.BuilderFlag) if name.isupper()}


def precision_plan(flag_names: set[str], onnx_dtype: str, fp16: bool | None, sparse: bool) -> tuple[bool, list[str]]:
    """Whether to set the FP16 builder flag, and notes for the report.

    `onnx_dtype` is what the file's weights are ("float16", "bfloat16", "float32", or "mixed"). `fp16`: None picks
    reduced precision where the installed TensorRT lets the builder choose it (sparse kernels exist only in
    fp16/bf16/int8/fp8); True insists, which on TensorRT 11 means the file itself must be float16; False never
    sets the flag. Raises UsageError when fp16=True cannot be honoured."""
    has_flag = "FP16" in flag_names
    low_precision = onnx_dtype in ("float16", "bfloat16")
    notes: list[str] = []
    if fp16 is False:
        if sparse and not low_precision:
            notes.append("float32 build: TensorRT has no sparse kernels at float32, so no layer will run sparse")
        return False, notes
    if has_flag:
        if onnx_dtype not in ("float16", "bfloat16"):
            notes.append("FP16 builder flag set: TensorRT may run this float32 file's layers in float16 (fp16=False "
                         "keeps float32, and no sparse kernels)")
        return True, notes
    # TensorRT 11: precision comes from the file only.
    if fp16 and not low_precision:
        raise UsageError(f"this TensorRT has no FP16 builder flag (TensorRT 11 takes precision from the ONNX file) "
                         f"and the file's weights are {onnx_dtype}: write a float16 file first "
                         "(graphprune prune IN.onnx -o OUT.onnx --sparsity 2:4 --fp16)")
    if sparse and not low_precision:
        notes.append(f"the file's weights are {onnx_dtype} and TensorRT 11 takes precision from the file only (no FP16 "
                     "builder flag): no layer will run sparse; write a float16 file with graphprune prune ... --fp16")
    return False, notes


def onnx_weight_dtype(path: str | os.PathLike) -> str:
    """The floating type of an ONNX file's weight matrices (initializers of rank >= 2): what TensorRT 11 builds in."""
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    names = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
             onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.DOUBLE: "float64"}
    seen = {names[t.data_type] for t in model.graph.initializer if t.data_type in names and len(t.dims) >= 2}
    if not seen:
        return "float32"
    return seen.pop() if len(seen) == 1 else "mixed"


# ---- parsers (pure Python, no TensorRT) ---------------------------------------------------------------------

# TensorRT up to 10.x's INFO lines, and the VERBOSE lines of later 10.x builds (with "(foreignNode)" in front for
# layers inside a Myelin subgraph); both kinds can appear in one log.
_ELIGIBLE = (re.compile(r"\(Sparsity\) Layers eligible for sparse math:(.*)$"),
             re.compile(r"\(Sparsity\) Found \d+ layer\(s\) eligible to use sparse tactics:(.*)$"))
_PICKED = (re.compile(r"\(Sparsity\) TRT inference plan picked sparse implementation for layers:(.*)$"),
           re.compile(r"\(Sparsity\) Chose \d+ layer\(s\) using sparse tactics:(.*)$"))


def _names(listing: str) -> list[str]:
    return [name.strip() for name in listing.split(", ") if name.strip()]


def parse_sparsity_log(lines: str | Iterable[str]) -> tuple[list[str], list[str]]:
    """Layers TensorRT found eligible for sparse math, and those it picked a sparse kernel for, from its log.

    `lines`: the log as one string or as lines. Names keep TensorRT's spelling (fused layers as "a + b"), each
    once, in the order logged."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    eligible: list[str] = []
    picked: list[str] = []
    for line in lines:
        line = line.rstrip("\r\n")
        for patterns, into in ((_ELIGIBLE, eligible), (_PICKED, picked)):
            for pattern in patterns:
                found = pattern.search(line)
                if found:
                    into.extend(n for n in _names(found.group(1)) if n not in into)
    return eligible, picked


@dataclass
class LayerInfo:
    """One engine layer as the inspector describes it. `has_sparse_weights` is None where the layer kind has no
    such field (only convolution-like layers report it); `precision` is its weights' or first output's type."""

    name: str
    type: str | None = None
    has_sparse_weights: bool | None = None
    precision: str | None = None
    tactic: str | None = None


_PRECISIONS = (("bfloat16", "bf16"), ("bf16", "bf16"), ("fp8", "fp8"), ("fp4", "fp4"), ("fp16", "fp16"),
               ("half", "fp16"), ("fp32", "fp32"), ("float", "fp32"), ("int64", "int64"), ("int32", "int32"),
               ("int8", "int8"), ("int4", "int4"), ("uint8", "uint8"), ("bool", "bool"))


def _precision(text: str | None) -> str | None:
    """'Channel major FP16 format where channel % 8 == 0', 'Half', 'Float', 'Int8' ... -> fp16, fp32, int8."""
    if not text:
        return None
    words = re.findall(r"[a-z0-9]+", text.lower())
    for key, value in _PRECISIONS:
        if key in words:
            return value
    return None


def _tensor_type(tensor: dict) -> str | None:
    # TensorRT <= 10: one "Format/Datatype" string; TensorRT 11 split it into "Datatype" and "Format".
    for key in ("Format/Datatype", "Datatype", "DataType"):
        if key in tensor:
            return _precision(str(tensor[key]))
    return None


def parse_inspector(json_text: str | dict) -> list[LayerInfo]:
    """The layers of an engine from the inspector's JSON (``get_engine_information(LayerInformationFormat.JSON)``
    or ``trtexec --exportLayerInfo``), TensorRT 10's schema or 11's. At LAYER_NAMES_ONLY verbosity only names."""
    data = json.loads(json_text) if isinstance(json_text, str) else json_text
    if not isinstance(data, dict) or not isinstance(data.get("Layers"), list):
        raise BackendError("not TensorRT engine-inspector JSON: expected an object with a 'Layers' list")
    layers = []
    for entry in data["Layers"]:
        if isinstance(entry, str):
            layers.append(LayerInfo(name=entry))
            continue
        sparse = entry.get("HasSparseWeights")
        weights = entry.get("Weights")
        precision = _precision(weights.get("Type")) if isinstance(weights, dict) else None
        if precision is None:
            outputs = entry.get("Outputs") or []
            precision = _tensor_type(outputs[0]) if outputs and isinstance(outputs[0], dict) else None
        tactic = entry.get("TacticName") or entry.get("TacticValue")
        layers.append(LayerInfo(name=str(entry.get("Name", "")), type=entry.get("LayerType"),
                                has_sparse_weights=None if sparse is None else bool(int(sparse)),
                                precision=precision, tactic=str(tactic) if tactic else None))
    return layers


def inspector_io_names(json_text: str | dict) -> list[str]:
    """The engine's input and output tensor names: TensorRT 10 lists them under "Bindings", 11 under "I/O Tensors"
    (objects with a "Name")."""
    data = json.loads(json_text) if isinstance(json_text, str) else json_text
    if "Bindings" in data:
        return [str(name) for name in data["Bindings"]]
    return [str(t["Name"]) if isinstance(t, dict) else str(t) for t in data.get("I/O Tensors", [])]


@dataclass
class SparseRow:
    layer: str
    eligible: bool
    picked: bool
    has_sparse_weights: bool | None


@dataclass
class BuildReport:
    """What a build made and which layers run sparse: the log's verdict and the inspector's, per layer."""

    engine_path: str
    tensorrt_version: str
    layers: list[LayerInfo]
    eligible: list[str]
    picked: list[str]
    sparse: bool = True
    fp16_flag: bool = False
    notes: list[str] = field(default_factory=list)
    log_lines: list[str] = field(default_factory=list, repr=False)

    def rows(self) -> list[SparseRow]:
        """Every layer the log names or the inspector gives a HasSparseWeights for, inspector order first; layers
        fused into a Myelin subgraph appear in the log under their ONNX names only."""
        eligible, picked = set(self.eligible), set(self.picked)
        rows, seen = [], set()
        for layer in self.layers:
            if layer.name in eligible or layer.name in picked or layer.has_sparse_weights is not None:
                rows.append(SparseRow(layer.name, layer.name in eligible, layer.name in picked,
                                      layer.has_sparse_weights))
                seen.add(layer.name)
        for name in self.eligible + [p for p in self.picked if p not in eligible]:
            if name not in seen:
                rows.append(SparseRow(name, name in eligible, name in picked, None))
                seen.add(name)
        return rows

    def summary(self) -> str:
        rows = self.rows()
        mode = "sparse weights on" if self.sparse else "sparse weights off"
        fp16 = ", FP16 flag" if self.fp16_flag else ""
        head = f"TensorRT {self.tensorrt_version} engine {self.engine_path} ({len(self.layers)} layers; {mode}{fp16})"
        lines = [f"{head}: {len(self.picked)} of {len(self.eligible)} eligible layers run sparse kernels"]
        if rows:
            width = max(len("layer"), *(len(r.layer) for r in rows))
            lines.append(f"  {'layer':<{width}}  eligible  sparse picked  HasSparseWeights")
            for r in rows:
                hsw = "-" if r.has_sparse_weights is None else ("yes" if r.has_sparse_weights else "no")
                lines.append(f"  {r.layer:<{width}}  {'yes' if r.eligible else 'no':<8}  "
                             f"{'yes' if r.picked else 'no':<13}  {hsw}")
        elif self.sparse:
            lines.append("  no layer was eligible: 2:4 needs two zeros in every four input channels (C % 4 == 0) at "
                         "fp16/bf16/int8 (graphprune prune ... --sparsity 2:4 --fp16)")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# ---- building --------------------------------------------------------------------------------------------------

def _make_logger(trt: Any, log: Callable[[str], None] | None, lines: list[str]):
    """A TensorRT logger that keeps every line (the "(Sparsity)" ones are VERBOSE in recent 10.x) and passes
    warnings and errors on to `log` (default: this module's logging)."""
    severity = trt.ILogger.Severity
    loud = (severity.INTERNAL_ERROR, severity.ERROR, severity.WARNING)

    class _Capture(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, level, msg):
            lines.append(str(msg))
            if level in loud:
                (log or logger.warning)(f"TensorRT: {msg}")
            else:
                logger.debug("TensorRT: %s", msg)

    return _Capture()


def _profile(trt: Any, builder, network, input_shapes: dict[str, tuple[int, ...]], notes: list[str]):
    """An optimization profile fixing every dynamic input at its given shape (unknown dims at 1), or None."""
    profile, dynamic = builder.create_optimization_profile(), False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if all(d >= 0 for d in shape):
            continue
        dynamic = True
        given = input_shapes.get(tensor.name)
        if given is not None and len(given) != len(shape):
            raise UsageError(f"input {tensor.name!r} has rank {len(shape)}, --input-shape gives {given}")
        fixed = tuple(given) if given is not None else tuple(d if d >= 0 else 1 for d in shape)
        if given is None:
            notes.append(f"input {tensor.name!r} has dynamic shape {shape}: built for {fixed} (give its shape to "
                         "build another)")
        profile.set_shape(tensor.name, fixed, fixed, fixed)
    return profile if dynamic else None


def build(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, sparse: bool = True,
          fp16: bool | None = None, workspace: int | None = None,
          input_shapes: dict[str, tuple[int, ...]] | None = None,
          log: Callable[[str], None] | None = None) -> BuildReport:
    """Build a TensorRT engine from `onnx_path`, write it to `engine_path` (whole or not at all), and report which
    layers TensorRT found eligible for 2:4 sparse math and which it runs sparse.

    Args:
        sparse: set SPARSE_WEIGHTS, so layers whose weights hold 2:4 may get sparse kernels.
        fp16: see precision_plan (None: reduced precision where the installed TensorRT has the flag).
        workspace: the builder's workspace limit in bytes (None: TensorRT's default).
        input_shapes: shapes for inputs with dynamic dimensions (one profile, min = opt = max).
        log: receives TensorRT's warnings and errors (default: logging).
    """
    onnx_path, engine_path = os.fspath(onnx_path), os.fspath(engine_path)
    if not os.path.isfile(onnx_path):
        raise UsageError(f"no such ONNX file: {onnx_path}")
    trt = _require()
    onnx_dtype = onnx_weight_dtype(onnx_path)
    set_fp16, notes = precision_plan(builder_flag_names(trt), onnx_dtype, fp16, sparse)
    lines: list[str] = []
    trt_logger = _make_logger(trt, log, lines)
    builder = trt.Builder(trt_logger)
    bits, _ = creation_flags(trt)
    network = builder.create_network(bits)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(onnx_path):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BackendError(f"TensorRT could not parse {onnx_path}: {'; '.join(errors) or 'no reason given'} "
                           "(check the file with onnx.checker and that TensorRT supports its opset and ops)")
    config = builder.create_builder_config()
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if set_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = _profile(trt, builder, network, dict(input_shapes or {}), notes)
    if profile is not None:
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        tail = "; ".join(lines[-5:])
        raise BackendError(f"TensorRT could not build an engine from {onnx_path}: {tail or 'no log'}")
    data = bytes(memoryview(serialized))
    atomic_write(engine_path, data)
    runtime = trt.Runtime(trt_logger)
    engine = runtime.deserialize_cuda_engine(data)
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    eligible, picked = parse_sparsity_log(lines)
    if sparse and not eligible and onnx_dtype in ("float16", "bfloat16"):
        notes.append("TensorRT found no layer eligible: is the file masked (graphprune prune ... --sparsity 2:4)?")
    return BuildReport(engine_path=engine_path, tensorrt_version=trt.__version__, layers=parse_inspector(info),
                       eligible=eligible, picked=picked, sparse=sparse, fp16_flag=set_fp16, notes=notes,
                       log_lines=lines)


# ---- running ---------------------------------------------------------------------------------------------------

def _torch_dtype(trt: Any, dtype) -> Any:
    import torch

    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}
    for name, torch_dtype in table.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return torch_dtype
    raise BackendError(f"no torch dtype for TensorRT's {dtype}")


class _Runner:
    """One engine and execution context bound to torch CUDA buffers, run on its own stream."""

    def __init__(self, engine_path: str | os.PathLike, feeds: dict[str, Any]):
        import torch

        trt = _require()
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        with open(os.fspath(engine_path), "rb") as fh:
            self.engine = trt.Runtime(self._trt_logger).deserialize_cuda_engine(fh.read())
        if self.engine is None:
            raise BackendError(f"TensorRT could not load {engine_path}: built by another TensorRT version or GPU? "
                               "Build it again with graphprune trt")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if set(feeds) != set(inputs):
            raise UsageError(f"the engine's inputs are {inputs}, the feeds name {sorted(feeds)}")
        self.buffers: dict[str, Any] = {}
        for name in inputs:
            tensor = feeds[name].to(device="cuda", dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(name)))
            tensor = tensor.contiguous()
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.buffers[name] = tensor
        self.outputs = [n for n in names if n not in inputs]
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            self.buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
        for name, tensor in self.buffers.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        torch.cuda.current_stream().synchronize()  # the copies above ran on the current stream

    def enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise BackendError("TensorRT's execute_async_v3 failed (see TensorRT's log above)")


def run_engine(engine_path: str | os.PathLike, feeds: dict[str, Any]) -> dict[str, Any]:
    """Run an engine once on torch tensors (moved to the GPU and to the engine's input types) and return its
    outputs as torch CUDA tensors by name."""
    runner = _Runner(engine_path, feeds)
    runner.enqueue()
    runner.stream.synchronize()
    return {name: runner.buffers[name] for name in runner.outputs}


def latency(engine_path: str | os.PathLike, feeds: dict[str, Any], runs: int = 100,
            warmup: int = 10) -> tuple[float, float]:
    """Median and 90th-percentile milliseconds of one engine run, timed on the GPU with CUDA events (host overhead
    excluded), after `warmup` untimed runs; the same buffers every run."""
    import torch

    if runs < 1 or warmup < 0:
        raise UsageError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    runner = _Runner(engine_path, feeds)
    for _ in range(warmup):
        runner.enqueue()
    runner.stream.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(runs):
        start.record(runner.stream)
        runner.enqueue()
        end.record(runner.stream)
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    p90 = times[min(len(times) - 1, round(0.9 * (len(times) - 1)))]
    return statistics.median(times), p90
