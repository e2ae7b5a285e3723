"""ONNX in, ONNX out: ``graphprune.onnx.prune("in.onnx", "out.onnx", target_flops=0.5)``.

The file is read into the same graph IR as a PyTorch model (ir/from_onnx.py), planned by the same
channel analysis, importance and selection, written by the ONNX backend and verified in ONNX Runtime
against the original with every removed channel's producer rows zeroed. The input file is never
modified; the output appears only after it passed the checker and the verification.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .analysis.channels import Analysis, analyze
from .analysis.cost import CostModel
from .errors import BackendError, UsageError
from .ir.from_onnx import OnnxGraph, example_feeds, external_data_files, load_model, round_robin, session, to_graph
from .plan import PruningPlan

log = logging.getLogger(__name__)

Progress = Callable[[str], None]  # gets one line per step; "... i/n" lines count through a loop


@dataclass
class Loaded:
    """One ONNX file read and analysed: what planning and the backend share."""

    path: str
    og: OnnxGraph
    an: Analysis
    flops: CostModel
    params: CostModel


def read(path: str | os.PathLike, input_shapes: dict[str, tuple[int, ...]] | None = None,
         allow_lossy: bool = False, feeds: dict[str, np.ndarray] | None = None) -> Loaded:
    """Load, check, record shapes with one ONNX Runtime run, and run the channel analysis."""
    path = os.fspath(path)
    model = load_model(path)
    og = to_graph(model, feeds if feeds is not None else example_feeds(model, input_shapes))
    an = analyze(og.graph, allow_lossy=allow_lossy)
    return Loaded(path, og, an, CostModel(an, an.flop_terms), CostModel(an, an.param_terms))


def count_flops(path: str | os.PathLike, input_shapes: dict[str, tuple[int, ...]] | None = None) -> int:
    """FLOPs of one run (2 x MACs of Conv / Gemm / MatMul / Einsum), the torch cost model's definition."""
    return round(read(path, input_shapes).flops.total())


def plan(path: str | os.PathLike, target_flops: float | None = None, *, target_params: float | None = None,
         target_latency: float | None = None, runtime: str = "onnxruntime", threads: int = 1,
         importance: Any = "l2", round_to: int | str | None = "auto", max_ratio: float = 0.9,
         allow_lossy: bool = False, input_shapes: dict[str, tuple[int, ...]] | None = None,
         calibration: list[dict[str, np.ndarray]] | None = None, loaded: Loaded | None = None,
         progress: Progress | None = None) -> PruningPlan:
    """Decide what to remove from the ONNX file at `path`; the arguments mean what they do in graphprune.plan
    (the same planning core: passes/pipeline.py). importance="wanda", "flap" or "obs" needs `calibration`:
    batches of real inputs (dicts of arrays by input name). `target_latency` keeps that fraction of the latency
    measured on `runtime` with `threads` intra-op threads (a per-layer table, measured once and cached:
    passes/latency.py); round_to="auto" then keeps the channel multiple that runtime was measured fastest at."""
    from .passes.importance import get_importance
    from .passes.pipeline import PLAN, Job, check_options, parse_budget, run

    started = time.perf_counter()
    kind, ratio = parse_budget(target_flops, target_params, target_latency)
    round_to = check_options(round_to, max_ratio)
    if kind != "latency" and (runtime != "onnxruntime" or threads != 1):
        raise UsageError("runtime= and threads= say where a latency budget is measured: give target_latency=R")
    latency = latency_model(runtime, threads) if kind == "latency" else None
    loaded = loaded or read(path, input_shapes, allow_lossy)
    if importance in ("wanda", "flap", "obs"):
        from .passes.calibration import CalibratedImportance
        from .passes.onnx_calibration import collect

        if calibration is None:
            raise UsageError(f"importance={importance!r} needs calibration inputs (--calibration FILE.npz)")
        scorer = CalibratedImportance(importance, collect(loaded, calibration, progress, grams=importance == "obs"))
    else:
        try:
            scorer = get_importance(importance)
        except ValueError as exc:
            raise UsageError(f"{exc}; for ONNX files also 'wanda', 'flap' and 'obs' (with calibration)") from exc
    job = Job(loaded.an, _torch_tensors(loaded.og.tensors), kind, ratio, scorer, round_to=round_to,
              max_ratio=max_ratio, flops=loaded.flops, params=loaded.params,
              target={"importance": str(importance), "source": os.fspath(path)})
    if latency is not None:
        job.latency = latency(loaded, progress)
        job.auto_round = job.latency.table.block
    result = run(PLAN, job).plan
    result._loaded = loaded
    result.notes.append(f"planned in {time.perf_counter() - started:.2f} s")
    return result


def latency_model(runtime: str, threads: Any):
    """A function (loaded, progress) -> LatencyModel for `runtime`; bad arguments raise before any work."""
    if runtime != "onnxruntime":
        raise UsageError(f"runtime={runtime!r}: latency tables are measured on 'onnxruntime' (CPU) so far")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(f"threads must be a positive integer (ONNX Runtime intra-op threads), got {threads!r}")

    def build(loaded: Loaded, progress: Progress | None):
        from .backends.onnx_latency import measure
        from .passes.latency import LatencyModel

        return LatencyModel(loaded.an, measure(loaded, threads, progress=progress))

    return build


def time_side_by_side(latency: dict[str, Any], original, slim, feeds: dict[str, np.ndarray]) -> None:
    """Add the measured latency of the original and the pruned model (files or protos), timed in turns, to a
    plan's `latency`, with the threads its table was measured with."""
    threads = latency["threads"]
    times = round_robin([session(original, threads=threads), session(slim, threads=threads)], feeds, runs=30,
                        warmup=3)
    latency.update(measured_before=1e3 * float(np.median(times[0])), measured_after=1e3 * float(np.median(times[1])))


def _torch_tensors(arrays: dict[str, np.ndarray]):
    import torch

    return {name: torch.from_numpy(np.array(a, dtype=np.float32)) for name, a in arrays.items()}


def prune(src: str | os.PathLike, dst: str | os.PathLike, target_flops: float | None = None, *,
          verify: bool = True, plan_out: str | os.PathLike | None = None, report: str | os.PathLike | None = None,
          progress: Progress | None = None, the_plan: PruningPlan | None = None,
          input_shapes: dict[str, tuple[int, ...]] | None = None, feeds: dict[str, np.ndarray] | None = None,
          allow_lossy: bool = False, sparsity: str | None = None, fp16: bool = False, float16_io: bool = False,
          **options: Any) -> PruningPlan:
    """Prune the ONNX file `src` into `dst` and return the plan.

    `dst` is written only after the pruned model passed strict shape inference, the full ONNX checker and
    (with verify=True) an ONNX Runtime comparison with the masked original on random inputs. `src` is
    never modified. `the_plan` applies an existing plan (from graphprune.plan on the PyTorch model the
    file was exported from, or PruningPlan.load) instead of planning; one with compensation, added biases or
    removed blocks is refused (only channel removals replay on a file). `feeds` (input name -> array) are
    the inputs shapes are recorded and the verification runs with; by default the first calibration batch,
    or random ones shaped by the model's inputs and `input_shapes`. `sparsity` ("2:4", "N:M") also masks the
    pruned model's eligible weights (the sparsify step below; round_to="auto" then keeps widths multiples of 16,
    so 2:4 layers stay eligible for sparse tensor cores); plan.notes says how many. `fp16` writes float16
    weights and compute (inputs and outputs float32 unless `float16_io`), checked against the float32 result
    with half-precision tolerances. Other options are those of plan().
    """
    say = progress or (lambda message: log.info(message))
    src, dst = os.fspath(src), os.fspath(dst)
    data_files = external_data_files(src)
    _check_paths(src, data_files, dst, plan_out, report)
    if the_plan is None and target_flops is None and options.get("target_params") is None \
            and options.get("target_latency") is None:
        raise UsageError("give a budget: target_flops=R, target_params=R or target_latency=R, R in (0, 1] the "
                         "fraction to keep")
    if the_plan is not None:
        _refuse_weight_changes(the_plan)
    say(f"reading {src}")
    if feeds is None and options.get("calibration"):
        feeds = options["calibration"][0]
    loaded = read(src, input_shapes, allow_lossy, feeds)
    say(f"{len(loaded.og.graph.nodes)} nodes, {loaded.flops.total() / 1e9:.3f} GFLOPs, "
        f"{loaded.params.total() / 1e6:.2f} M parameters; {int(loaded.an.prunable.sum())} prunable channels")
    if sparsity is not None:
        from .passes.nm import eligible_multiple, parse_pattern

        if options.get("round_to", "auto") == "auto":
            options["round_to"] = eligible_multiple(*parse_pattern(sparsity))
    if the_plan is None:
        say("planning")
        result = plan(src, target_flops, loaded=loaded, progress=progress, **options)
        gone = result._gone
    else:
        result = dataclasses.replace(the_plan, notes=list(the_plan.notes))  # the caller's plan stays as it was
        gone = gone_from_plan(the_plan, loaded)
        _check_replayed(result, loaded, gone)
    say(f"writing the pruned model ({result.flops_ratio:.3f} of the FLOPs, {result.params_ratio:.3f} of the "
        "parameters)")
    from .backends import onnx as backend

    slim = backend.apply(loaded.og, loaded.an, gone)
    if verify:
        say("verifying in ONNX Runtime against the masked original")
        original = load_model(src, check=False)
        check_feeds = loaded.og.feeds if feeds is not None else example_feeds(  # recorded: cast to the model's
            original, {k: v.shape for k, v in loaded.og.feeds.items()}, seed=1)  # dtypes
        from .passes.pipeline import removed_and_zeroed

        zeroed = removed_and_zeroed(loaded.an, gone)[1]  # this file's producer rows (a plan may name others)
        problem = compare(slim, backend.masked(loaded.og, original, zeroed), check_feeds, lossy=result.lossy)
        if problem is not None:
            raise BackendError(f"the pruned model does not match the masked original ({problem}); this is a "
                               "graphprune bug: please report it with the model (--no-verify skips the check)")
        result.notes.append("verified against the masked original in ONNX Runtime")
    if result.latency is not None and the_plan is None:
        say("timing the original and the pruned model")
        time_side_by_side(result.latency, src, slim, loaded.og.feeds)
        from .render import latency_line
        say(latency_line(result.latency))
    if sparsity is not None:
        say(f"masking {sparsity}")
        result.notes.append(_sparsified(slim, sparsity, check_feeds if verify else None).summary())
    if fp16:
        say("converting to float16")
        if result.latency is not None:
            result.notes.append("the latency budget was measured in float32, before the float16 conversion")
        slim = _in_float16(slim, check_feeds if verify else None, float16_io)
        result.notes.append("float16 weights and compute" + (", checked against float32 in ONNX Runtime" if verify
                                                              else ""))
    if plan_out is not None:
        result.save(plan_out)
    if report is not None:
        from .render import write_report
        write_report(result, report)
    save_model(slim, dst, external=bool(data_files))
    say(f"wrote {dst}")
    return result


def sparsify(src: str | os.PathLike, dst: str | os.PathLike, pattern: str = "2:4", *, verify: bool = True,
             ignore: set[str] = frozenset(), input_shapes: dict[str, tuple[int, ...]] | None = None,
             fp16: bool = False, float16_io: bool = False):
    """Write `src` with N:M magnitude masks on every eligible Conv / Gemm / MatMul weight to `dst` and return the
    SparsityReport (every layer, masked or why not). `ignore`: node or weight names kept dense. With verify the
    masked file runs in ONNX Runtime with finite outputs where the original's are. `fp16` as in prune().
    `src` is never modified."""
    src, dst = os.fspath(src), os.fspath(dst)
    data_files = external_data_files(src)
    _check_paths(src, data_files, dst)
    import onnx_ir as ir

    model = load_model(src)
    feeds = example_feeds(model, input_shapes) if verify else None
    proto = ir.to_proto(model)
    report = _sparsified(proto, pattern, feeds, ignore)
    if fp16:
        proto = _in_float16(proto, feeds, float16_io)
    save_model(proto, dst, external=bool(data_files))
    return report


def _in_float16(proto, feeds: dict[str, np.ndarray] | None, float16_io: bool):
    """`proto` in float16 (backends/onnx.py to_float16); given feeds, its outputs must match the float32 model's
    within graphprune.verify's half-precision tolerance."""
    from .backends import onnx as backend

    half = backend.to_float16(proto, float16_io)
    if feeds is not None:
        want = session(proto).run(None, feeds)
        half_feeds = {k: v.astype(np.float16) if float16_io and v.dtype == np.float32 else v for k, v in feeds.items()}
        problem = compare(half, None, half_feeds, want=want, dtypes=["float16"] * len(want))
        if problem is not None:
            raise BackendError(f"in float16 the outputs move away from float32 ({problem}): the model overflows or "
                               "loses too much precision in half; write it in float32 (without --fp16)")
    return half


def _sparsified(proto, pattern: str, feeds: dict[str, np.ndarray] | None, ignore: set[str] = frozenset()):
    """Mask `proto` in place (backends/onnx_sparsity.py); every masked weight must hold the pattern and, given
    feeds, the model must still run with outputs of the same shapes, finite where they were."""
    from .backends import onnx_sparsity
    from .passes.nm import parse_pattern

    n, m = parse_pattern(pattern)
    want = session(proto).run(None, feeds) if feeds is not None else None
    report = onnx_sparsity.sparsify(proto, n, m, ignore)
    if not report.masked:
        log.warning("no layer of this model can hold %s masks: %s", pattern,
                    "; ".join(f"{layer.name}: {layer.reason}" for layer in report.layers[:5]) or "no weighted layers")
    if want is not None:
        problem = compare(proto, None, feeds, lossy=True, want=want)
        if problem is not None:
            raise BackendError(f"the {pattern}-masked model is broken ({problem}); keep the layers it involves "
                               "dense with ignore=[...]")
    return report


def load_calibration(path: str | os.PathLike, model_path: str | os.PathLike) -> list[dict[str, np.ndarray]]:
    """Batches of inputs from an .npz file: one array per model input, named like it, samples along the
    first axis (split into the model's batch size)."""
    from .passes.onnx_calibration import split_batches

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"no calibration file at {path}; give an .npz with one array per model input")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError) as exc:
        raise UsageError(f"{path} is not an .npz file of arrays ({exc}); write one with numpy.savez(path, "
                         "input_name=array, ...)") from exc
    return split_batches(load_model(model_path, check=False, weights=False), arrays)


def _check_paths(src: str, data_files: set[str], dst: str, *others) -> None:
    """The input exists; every output has a directory and is neither the input, its weights file, nor
    another output (symbolic links and case-insensitive file systems included)."""
    if not os.path.exists(src):
        raise UsageError(f"no ONNX file at {src}; check the path")
    outputs = [os.fspath(p) for p in (dst, dst + ".data", *others) if p is not None]
    for path in outputs:
        if os.path.isdir(path):
            raise UsageError(f"cannot write {path}: it is a directory; give a file name")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise UsageError(f"cannot write {path}: directory {directory} does not exist; create it first")
    protected = [src] + [os.path.join(os.path.dirname(os.path.abspath(src)), loc) for loc in data_files]
    for path in outputs:
        if any(_same(path, p) for p in protected):
            raise UsageError(f"{path} would overwrite the input ({src} or its weights); graphprune never overwrites "
                             "its input: choose another output path")
    if len({os.path.realpath(p) for p in outputs}) < len(outputs):
        raise UsageError("two outputs (model, plan, report) share a path; give each its own")


def _same(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _refuse_weight_changes(the_plan: PruningPlan) -> None:
    """A plan that rewrites weights or removes blocks cannot be replayed by slicing this file's initializers
    (and a lossy plan is verified by shapes only, so it would pass unnoticed): refuse it."""
    carried = []
    if the_plan.updates or the_plan.target.get("compensate"):
        carried.append(f"compensation ({the_plan.target.get('compensate') or 'updated weights'})")
    if the_plan.added:
        carried.append(f"{len(the_plan.added)} added biases")
    if the_plan.blocks:
        carried.append(f"{len(the_plan.blocks)} removed blocks ({', '.join(str(b[0]) for b in the_plan.blocks[:3])})")
    if carried:
        raise UsageError(f"the plan carries {', '.join(carried)}, which an ONNX file cannot take from a plan: only "
                         "channel removals apply here. Plan the file itself (graphprune.onnx.prune(src, dst, "
                         "target_flops=...)), or export the slimmed PyTorch model instead: "
                         "torch.onnx.export(plan.apply(model), ...)")


def _check_replayed(result: PruningPlan, loaded: Loaded, gone: np.ndarray) -> None:
    """A plan replayed on a file whose exporter renamed tensors (weights behind MatMul, merged biases) removes
    only what it found: refuse unless the file loses what the plan says, then count the file's own cost."""
    removed = np.nonzero(gone)[0]
    flops, params, after = loaded.flops.total(), loaded.params.total(), loaded.flops.total(removed)
    ratio = after / flops if flops else 1.0
    if abs(ratio - result.flops_ratio) > 0.01:
        found = sum(name in loaded.og.graph.params for name in result.removed)
        raise UsageError(f"this file keeps {ratio:.3f} of its FLOPs under the plan, which promises "
                         f"{result.flops_ratio:.3f}: only {found} of the plan's {len(result.removed)} pruned tensors "
                         "are initializers of this file (the exporter renamed or merged them); plan this file "
                         "instead (graphprune.onnx.prune(src, dst, target_flops=...))")
    result.flops = {"before": flops, "after": after}
    result.params = {"before": params, "after": loaded.params.total(removed)}


def gone_from_plan(the_plan: PruningPlan, loaded: Loaded) -> np.ndarray:
    """Removed components of this file's analysis, from a plan's removed indices by initializer name.
    Initializers the file lacks (batch norms an exporter folded) are skipped; a channel the plan removes
    from one of its tensors but not another is refused."""
    from .passes.pipeline import gone_from_removed

    an, params = loaded.an, loaded.og.graph.params
    matched = [name for name in the_plan.removed if name in params]
    for name in matched:
        if list(params[name].shape) != list(the_plan.fingerprint.get(name, params[name].shape)):
            raise UsageError(f"the plan was made for a model whose '{name}' is {the_plan.fingerprint[name]}, not "
                             f"{list(params[name].shape)}; plan this file instead")
    gone = gone_from_removed(an, the_plan.removed)
    for name, v in params.items():
        if name not in the_plan.fingerprint:
            continue
        for axis in range(v.ndim):
            hit = gone[an.component[an.elements(v, axis)]]
            listed = np.zeros(v.shape[axis], dtype=bool)
            listed[the_plan.removed.get(name, {}).get(axis, [])] = True
            if (hit != listed).any():
                raise UsageError(f"the plan removes channels of '{name}' axis {axis} that this file ties to others "
                                 "it keeps; plan this file instead")
    if the_plan.removed and not matched:
        raise UsageError("none of the plan's tensors are initializers of this file (exported under other "
                         "names?); plan this file instead")
    if (gone & ~an.prunable).any():
        raise UsageError("the plan removes channels this file cannot lose (pinned here); plan this file instead")
    return gone


def compare(slim, reference, feeds: dict[str, np.ndarray], lossy: bool = False, want: list | None = None,
            dtypes: list[str] | None = None) -> str | None:
    """None if the two models give the same outputs on `feeds` (graphprune.verify's rule), else what differs;
    `want`: the reference's outputs, computed already; `dtypes`: the precision that picks the tolerance."""
    from .verify import compare_outputs

    try:
        got = session(slim).run(None, feeds)
    except Exception as exc:  # noqa: BLE001
        return f"ONNX Runtime cannot run it: {' '.join(str(exc).split())[:300]}"
    return compare_outputs(got, want if want is not None else session(reference).run(None, feeds), lossy=lossy,
                           dtypes=dtypes)


def save_model(proto, dst: str, external: bool = False) -> None:
    """Write atomically: a temporary file (and data file) beside `dst`, renamed into place. Weights go to
    `<dst>.data` when the source kept them outside the graph or the model is over protobuf's 2 GB."""
    import onnx

    directory = os.path.dirname(os.path.abspath(dst))
    external = external or proto.ByteSize() > 2_000_000_000
    tmpdir = tempfile.mkdtemp(dir=directory, prefix=".graphprune-")
    try:
        tmp = os.path.join(tmpdir, os.path.basename(dst))
        location = os.path.basename(dst) + ".data"
        if external:
            from onnx.external_data_helper import _get_all_tensors, convert_model_to_external_data

            # onnx refuses a location that exists relative to the working directory (a previous output, when
            # run from its folder): convert under a fresh name, then point every tensor at the real one
            convert_model_to_external_data(proto, all_tensors_to_one_file=True, location=None, size_threshold=1024)
            for tensor in _get_all_tensors(proto):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = location
            onnx.save_model(proto, tmp)
            if os.path.exists(os.path.join(tmpdir, location)):  # nothing is written when every tensor is small
                os.replace(os.path.join(tmpdir, location), os.path.join(directory, location))
        else:
            onnx.save_model(proto, tmp)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def inspect(path: str | os.PathLike, input_shapes: dict[str, tuple[int, ...]] | None = None,
            sparsity: str | None = None) -> str:
    """What graphprune sees in the file: prunable groups and widths, FLOPs, parameters, and why channels
    that own weights are kept whole; with `sparsity` ("2:4"), per weighted layer instead: does it hold the
    pattern, can it, and would TensorRT run it sparse."""
    if sparsity is not None:
        return _inspect_sparsity(path, sparsity)
    from .render import explain_rows
    from .render import fmt_num as _num
    from .report import pinned_rows

    loaded = read(path, input_shapes)
    an, g = loaded.an, loaded.og.graph
    lines = [f"{os.fspath(path)}: {len(g.nodes)} nodes, inputs " +
             ", ".join(f"{n}{list(a.shape)}" for n, a in loaded.og.feeds.items()),
             f"FLOPs {_num(loaded.flops.total())}, parameters {_num(loaded.params.total())}",
             f"{len(an.families)} prunable groups, {int(an.prunable.sum())} prunable channels:"]
    for fam, label in zip(an.families, an.family_label):
        lines.append(f"  {len(fam):>6}  {label}")
    lines.extend(explain_rows(pinned_rows(an)))
    return "\n".join(lines)


def _inspect_sparsity(path: str | os.PathLike, pattern: str) -> str:
    import onnx_ir as ir

    from .backends import onnx_sparsity
    from .passes.nm import parse_pattern

    n, m = parse_pattern(pattern)
    rows = onnx_sparsity.rows(ir.to_proto(load_model(path)), n, m)
    lines = [f"{os.fspath(path)}: {len(rows)} weighted layers, {sum(r[4] == 'eligible' for r in rows)} can hold "
             f"{pattern}, {sum(r[3] == 'yes' for r in rows)} hold it"]
    rows.insert(0, ("layer", "weight", "shape", f"holds {pattern}", "can hold it", "TensorRT"))
    widths = [max(len(r[k]) for r in rows) for k in range(5)]
    lines += ["  ".join(f"{cell:<{w}}" for cell, w in zip(r, widths)) + "  " + r[5] for r in rows]
    return "\n".join(lines)


def bench(paths: list[str | os.PathLike], runs: int = 50, warmup: int = 5, threads: int | None = None,
          input_shapes: dict[str, tuple[int, ...]] | None = None, progress: Progress | None = None,
          runtime: str = "onnxruntime") -> list[dict[str, Any]]:
    """Latency of each file on the same random input, with FLOPs and parameters; one row per file, the first one
    is the baseline of the speed-up column. runtime="onnxruntime": the CPU, threads fixed, warm-up first, the
    models taking turns of back-to-back runs (ir/from_onnx.round_robin) so a change of machine load hits all
    alike. runtime="tensorrt": each file built into an engine (2:4 sparse kernels allowed; backends/tensorrt.py)
    and timed on the GPU by CUDA events."""
    if runs < 1 or warmup < 0:
        raise UsageError("runs must be at least 1 and warmup at least 0")
    if runtime not in ("onnxruntime", "tensorrt"):
        raise UsageError(f"runtime must be 'onnxruntime' or 'tensorrt', got {runtime!r}")
    if runtime == "tensorrt":
        from .backends import tensorrt as trt_backend

        reason = trt_backend.available()
        if reason is not None:
            raise UsageError(reason)
    threads = threads or min(os.cpu_count() or 1, 4)
    loaded, feeds = [], None
    for path in paths:
        (progress or (lambda m: None))(f"reading {path}")
        loaded.append(read(path, input_shapes, feeds=feeds))
        feeds = loaded[-1].og.feeds
        if set(feeds) != set(loaded[0].og.feeds):
            raise UsageError(f"{path} takes inputs {sorted(feeds)}, not {sorted(loaded[0].og.feeds)}: bench compares "
                             "models of the same inputs")
    if runtime == "tensorrt":
        stats = [_tensorrt_ms(os.fspath(path), feeds, runs, warmup, progress) for path in paths]
    else:
        times = round_robin([session(os.fspath(path), threads=threads) for path in paths], feeds, runs, warmup,
                             progress)
        stats = [(1e3 * float(np.median(t)), 1e3 * float(np.percentile(t, 90))) for t in times]
    rows = [{"model": os.fspath(path), "median_ms": median, "p90_ms": p90, "flops": item.flops.total(),
             "params": item.params.total(), "threads": threads, "runs": runs, "runtime": runtime}
            for path, (median, p90), item in zip(paths, stats, loaded)]
    for r in rows:
        r["speedup"] = rows[0]["median_ms"] / r["median_ms"]
    return rows


def _tensorrt_ms(path: str, feeds: dict[str, np.ndarray], runs: int, warmup: int,
                 progress: Progress | None) -> tuple[float, float]:
    """(median, p90) ms of `path` built into a TensorRT engine (in a temporary directory) and run on the GPU."""
    import torch

    from .backends import tensorrt as trt_backend

    (progress or (lambda m: None))(f"building a TensorRT engine from {path}")
    with tempfile.TemporaryDirectory(prefix="graphprune-trt-") as tmp:
        engine = os.path.join(tmp, "model.engine")
        trt_backend.build(path, engine, sparse=True, input_shapes={k: v.shape for k, v in feeds.items()})
        return trt_backend.latency(engine, {k: torch.from_numpy(v).cuda() for k, v in feeds.items()}, runs, warmup)


def bench_table(rows: list[dict[str, Any]]) -> str:
    from .render import fmt_num as _num

    width = max(len(r["model"]) for r in rows)
    lines = [f"{'model':<{width}}  {'median ms':>10}  {'p90 ms':>8}  {'speed-up':>8}  {'FLOPs':>8}  {'params':>8}"]
    for r in rows:
        lines.append(f"{r['model']:<{width}}  {r['median_ms']:>10.2f}  {r['p90_ms']:>8.2f}  {r['speedup']:>7.2f}x  "
                     f"{_num(r['flops']):>8}  {_num(r['params']):>8}")
    if rows[0].get("runtime") == "tensorrt":
        lines.append(f"(TensorRT engines, 2:4 sparse kernels allowed, {rows[0]['runs']} runs each after warm-up, "
                     "CUDA events, same input)")
    else:
        lines.append(f"(ONNX Runtime CPU, {rows[0]['threads']} threads, {rows[0]['runs']} runs each after warm-up, "
                     "in 5 turns of back-to-back runs, same input)")
    return "\n".join(lines)


__all__ = ["bench", "bench_table", "compare", "count_flops", "inspect", "plan", "prune", "read", "sparsify"]
