"""Benchmark graphprune against torch-pruning (Torch-Pruning 1.6) on CPU.

What is measured, per model (torchvision resnet50 and densenet121 on a 1x3x224x224 input; two random-init
transformers LlamaForCausalLM configs on input_ids of shape 1x64):

* Planning time: how long each tool takes until it knows what to remove for a ~50 % FLOPs budget.
  - graphprune: wall time of ``graphprune.plan(model, inputs, target_flops=0.5)`` (trace, channel
    analysis, importance, budgeted selection). ``plan.apply(model)`` (copy + slice) is timed separately.
  - torch-pruning: wall time of constructing ``tp.pruner.BasePruner`` (builds the DependencyGraph) plus
    the time spent inside ``pruner.step(interactive=True)`` producing the groups (importance + ranking);
    the time spent in ``group.prune()`` is timed separately. Groups are pruned as they are produced, as
    Torch-Pruning does itself, because each group is computed on the model left by the previous one.
* Achieved FLOPs ratio (pruned / original) for both tools, measured with one counter for both:
  ``torch.utils.flop_counter.FlopCounterMode`` (2 x MACs of conv / linear / matmul / attention), with a
  formula added for the CPU SDPA kernel, which FlopCounterMode does not count by itself. graphprune's own
  estimate (``plan.flops_ratio``) is shown beside it.
* ONNX Runtime CPU latency of resnet50 before and after pruning (graphprune, and torch-pruning's result):
  exported with ``torch.onnx.export`` (TorchScript exporter, dynamo=False, falling back to the default
  exporter), outputs checked against PyTorch (max abs diff), 1 intra-op / 1 inter-op thread, 5 warm-up
  runs, then median and p90 over ``--onnx-runs`` runs; the models are run round-robin so load changes on
  the machine hit all of them alike.

Torch-pruning settings: for the CNNs, global pruning with ``MagnitudeImportance(p=2)``, iterative_steps=1,
the classifier ignored, and ``pruning_ratio`` (a channel ratio, not a FLOPs ratio) found by bisection so
that FLOPs come near 0.5; the calibration trials are not part of the timed run. For LLaMA, the recipe of
Torch-Pruning's LLM example (examples/LLMs/prune_llm.py): local pruning, lm_head ignored, ``num_heads``
for q/k/v, whole heads pruned (prune_num_heads=True, prune_head_dims=False), the same ratio for heads and
hidden/intermediate widths, set to 1 - sqrt(0.5) so that the FLOPs of the linear layers roughly halve.

Every case runs in its own subprocess (fresh interpreter, 2 torch threads, a small untimed warm-up of the
tool, then up to ``--repeats`` timed runs, the minimum reported) under a timeout, so a tool that hangs or
crashes is reported as such instead of stopping the benchmark.

Run (from the repository root):

    .venv/bin/python benchmarks/bench_plan.py              # everything (about 3 min on an idle 2-core machine)
    .venv/bin/python benchmarks/bench_plan.py --quick      # resnet50 only, plus the ONNX latency check

The table is printed and written as markdown to ``--out`` (default benchmarks/results.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

THREADS = 2
TARGET = 0.5
SEQ_LEN = 64
HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA_CONFIGS = {
    "llama-32x256": dict(num_hidden_layers=32, hidden_size=256, intermediate_size=688, num_attention_heads=8,
                         num_key_value_heads=8),
    "llama-16x1024-gqa": dict(num_hidden_layers=16, hidden_size=1024, intermediate_size=2816,
                              num_attention_heads=16, num_key_value_heads=4),
}
CNNS = ("resnet50", "densenet121")
ALL_CASES = CNNS + tuple(LLAMA_CONFIGS)
QUICK_CASES = ("resnet50",)


# ----- models and FLOPs --------------------------------------------------------------------------------

def build_case(name: str):
    """(model in eval mode, example inputs for graphprune, example inputs for torch-pruning), seeded."""
    import torch

    torch.manual_seed(0)
    if name in CNNS:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None).eval()
        x = torch.randn(1, 3, 224, 224)
        return model, x, x
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, max_position_embeddings=256, use_cache=False, **LLAMA_CONFIGS[name])
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ_LEN))
    return model, {"input_ids": ids}, ids


def run_model(model, inputs):
    import torch

    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


def count_flops(model, inputs) -> int:
    """FLOPs of one forward pass with FlopCounterMode, also counting the CPU SDPA kernel."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    extra = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        run_model(model, inputs)
    return counter.get_total_flops()


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def width_summary(original, pruned, name: str) -> str:
    """What was cut: conv widths kept (CNNs) or heads / MLP / hidden widths (LLaMA)."""
    import torch

    if name in CNNS:
        before = {n: m.weight.shape[0] for n, m in original.named_modules() if isinstance(m, torch.nn.Conv2d)}
        after = {n: m.weight.shape[0] for n, m in pruned.named_modules() if isinstance(m, torch.nn.Conv2d)}
        kept = sorted(after[n] / before[n] for n in before)
        return (f"conv out-channels kept: min {kept[0]:.0%}, median {statistics.median(kept):.0%}, "
                f"max {kept[-1]:.0%}; {sum(k == 1 for k in kept)}/{len(kept)} convs untouched")
    cfg = original.config
    layers = pruned.model.layers
    head_dim = layers[0].self_attn.head_dim
    q = statistics.mean(layer.self_attn.q_proj.weight.shape[0] / head_dim for layer in layers)
    kv = statistics.mean(layer.self_attn.k_proj.weight.shape[0] / head_dim for layer in layers)
    mlp = statistics.mean(layer.mlp.gate_proj.weight.shape[0] for layer in layers)
    hidden = pruned.model.embed_tokens.weight.shape[1]
    return (f"q/kv heads {q:.1f}/{kv:.1f} of {cfg.num_attention_heads}/{cfg.num_key_value_heads}, "
            f"MLP {mlp:.0f} of {cfg.intermediate_size}, hidden {hidden} of {cfg.hidden_size} (layer means)")


def timed_repeats(fn: Callable[[], Any], repeats: int, budget_s: float = 60.0) -> tuple[Any, float, int]:
    """Run fn up to `repeats` times (stop early once `budget_s` is spent); return (last result, min s, n)."""
    times, result = [], None
    while len(times) < repeats and sum(times) < budget_s:
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return result, min(times), len(times)


# ----- graphprune ----------------------------------------------------------------------------------------

def warm_up_graphprune() -> None:
    import torch

    import graphprune

    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(8, 4))
    graphprune.plan(tiny, torch.randn(1, 3, 16, 16), target_flops=0.7).apply(tiny)


def measure_graphprune(name: str, repeats: int, result: dict) -> None:
    """Time graphprune.plan and plan.apply; measure the achieved FLOPs; check slim == masked model."""
    import graphprune

    warm_up_graphprune()
    model, inputs, _ = build_case(name)
    result.update(params=param_count(model), flops_before=count_flops(model, inputs))
    result["stage"] = "plan"
    plan, result["plan_s"], result["plan_runs"] = timed_repeats(
        lambda: graphprune.plan(model, inputs, target_flops=TARGET), repeats)
    result.update(own_ratio=plan.flops_ratio, stage="apply")
    slim, result["apply_s"], _ = timed_repeats(lambda: plan.apply(model), repeats)
    result["stage"] = "check"
    result["flops_after"] = count_flops(slim, inputs)
    result["ratio"] = result["flops_after"] / result["flops_before"]
    result["widths"] = width_summary(model, slim, name)
    diff = (run_model(slim, inputs) - run_model(plan.mask(model), inputs)).abs().max().item()
    result.update(mask_diff=diff, lossy=plan.lossy, stage="done")


# ----- torch-pruning ----------------------------------------------------------------------------------

def tp_llama_kwargs(model) -> dict:
    """Torch-Pruning's LLM example settings (examples/LLMs/prune_llm.py)."""
    cfg = model.config
    num_heads = {}
    for module_name, module in model.named_modules():
        if module_name.endswith("self_attn"):
            num_heads[module.q_proj] = cfg.num_attention_heads
            num_heads[module.k_proj] = cfg.num_key_value_heads
            num_heads[module.v_proj] = cfg.num_key_value_heads
    ratio = 1 - math.sqrt(TARGET)
    return dict(global_pruning=False, pruning_ratio=ratio, ignored_layers=[model.lm_head],
                output_transform=lambda out: out.logits, num_heads=num_heads, prune_num_heads=True,
                prune_head_dims=False, head_pruning_ratio=ratio, round_to=4)


def fix_llama_after_tp(model) -> None:
    """The attribute updates of Torch-Pruning's LLM example, so the pruned model runs."""
    cfg = model.config
    for module_name, module in model.named_modules():
        if module_name.endswith("self_attn"):
            module.num_key_value_groups = module.q_proj.out_features // module.k_proj.out_features
            cfg.num_attention_heads = module.q_proj.out_features // module.head_dim
            cfg.num_key_value_heads = module.k_proj.out_features // module.head_dim
        elif module_name.endswith("mlp"):
            cfg.intermediate_size = module.gate_proj.out_features
    cfg.hidden_size = model.lm_head.in_features


def tp_prune(model, tp_inputs, name: str, ratio: float | None) -> dict:
    """Prune `model` in place with torch-pruning; return the phase times."""
    import torch_pruning as tp

    if name in CNNS:
        head = model.fc if name.startswith("resnet") else model.classifier
        kwargs = dict(global_pruning=True, pruning_ratio=ratio, ignored_layers=[head])
    else:
        kwargs = tp_llama_kwargs(model)
    started = time.perf_counter()
    pruner = tp.pruner.BasePruner(model, tp_inputs, importance=tp.importance.MagnitudeImportance(p=2),
                                  iterative_steps=1, **kwargs)
    times = {"build_s": time.perf_counter() - started, "select_s": 0.0, "prune_s": 0.0, "groups": 0}
    groups = pruner.step(interactive=True)
    while True:
        started = time.perf_counter()
        group = next(groups, None) if groups is not None else None
        times["select_s"] += time.perf_counter() - started
        if group is None:
            break
        started = time.perf_counter()
        group.prune()
        times["prune_s"] += time.perf_counter() - started
        times["groups"] += 1
    if name not in CNNS:
        fix_llama_after_tp(model)
    times["pruning_ratio"] = kwargs["pruning_ratio"]
    return times


def calibrate_tp_ratio(model, inputs, tp_inputs, name: str, base_flops: int, trials: int = 7,
                       tol: float = 0.015) -> tuple[float, list]:
    """Bisection on torch-pruning's channel pruning_ratio until FLOPs are within `tol` of the target."""
    lo, hi, best, history = 0.0, 0.9, None, []
    for _ in range(trials):
        ratio = (lo + hi) / 2
        trial = copy.deepcopy(model)
        tp_prune(trial, tp_inputs, name, ratio)
        achieved = count_flops(trial, inputs) / base_flops
        history.append((round(ratio, 4), round(achieved, 4)))
        if best is None or abs(achieved - TARGET) < abs(best[1] - TARGET):
            best = (ratio, achieved)
        if abs(achieved - TARGET) <= tol:
            break
        lo, hi = (ratio, hi) if achieved > TARGET else (lo, ratio)
    return best[0], history


def warm_up_torch_pruning() -> None:
    import torch
    import torch_pruning as tp

    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(8, 4))
    tp.pruner.BasePruner(tiny, torch.randn(1, 3, 16, 16), tp.importance.MagnitudeImportance(p=2),
                         pruning_ratio=0.3, ignored_layers=[tiny[-1]]).step()


def measure_torch_pruning(name: str, repeats: int, result: dict, ratio: float | None = None) -> None:
    """Calibrate (CNNs), then time DependencyGraph build, group selection and pruning; measure FLOPs."""
    warm_up_torch_pruning()
    model, inputs, tp_inputs = build_case(name)
    result.update(params=param_count(model), flops_before=count_flops(model, inputs))
    if name in CNNS and ratio is None:
        result["stage"] = "calibration"
        started = time.perf_counter()
        ratio, result["calibration"] = calibrate_tp_ratio(model, inputs, tp_inputs, name, result["flops_before"])
        result["calibration_s"] = time.perf_counter() - started
    result["stage"] = "prune"
    runs = []
    while len(runs) < repeats and sum(r["build_s"] + r["select_s"] + r["prune_s"] for r in runs) < 60:
        pruned = copy.deepcopy(model)
        runs.append(tp_prune(pruned, tp_inputs, name, ratio))
        result["stage"] = "prune (repeat)"
    best = min(runs, key=lambda r: r["build_s"] + r["select_s"])
    result.update(best, runs=len(runs), stage="check")
    result["flops_after"] = count_flops(pruned, inputs)
    result["ratio"] = result["flops_after"] / result["flops_before"]
    result["widths"] = width_summary(model, pruned, name)
    result["stage"] = "done"


# ----- ONNX Runtime latency ----------------------------------------------------------------------------

def export_onnx(model, x, path: str) -> str:
    """Export with the TorchScript exporter, falling back to the default (dynamo) one; return which."""
    import torch

    try:
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], output_names=["y"],
                          opset_version=17)
        return "torchscript"
    except Exception:  # noqa: BLE001 - fall back to the default exporter
        torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"])
        return "dynamo"


def measure_onnx(runs: int, tp_ratio: float | None, result: dict) -> None:
    """ORT CPU latency of resnet50: original, graphprune slim (default and exact widths), torch-pruning slim
    (1 thread each)."""
    import numpy as np
    import onnxruntime as ort

    import graphprune

    model, x, _ = build_case("resnet50")
    variants = {"original": model}
    result["stage"] = "graphprune plan"
    # the default (round_to="auto") keeps layers of 32 channels or more at multiples of 8, which suit ONNX
    # Runtime's blocked (NCHWc) convolution kernels; round_to=None keeps exact channel counts
    variants["graphprune (default)"] = graphprune.plan(model, x, target_flops=TARGET).apply(model).eval()
    variants["graphprune round_to=None"] = graphprune.plan(model, x, target_flops=TARGET,
                                                           round_to=None).apply(model).eval()
    if tp_ratio is not None:
        result["stage"] = "torch-pruning"
        pruned = copy.deepcopy(model)
        tp_prune(pruned, x, "resnet50", tp_ratio)
        variants["torch-pruning"] = pruned.eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    feed = {"x": x.numpy()}
    sessions, rows = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, variant in variants.items():
            result["stage"] = f"export {label}"
            path = os.path.join(tmp, f"{label}.onnx")
            exporter = export_onnx(variant, x, path)
            sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            reference = run_model(variant, x).numpy()
            got = sess.run(None, feed)[0]
            rows[label] = dict(exporter=exporter, max_abs_diff=float(np.abs(got - reference).max()),
                               max_abs_out=float(np.abs(reference).max()), flops=count_flops(variant, x),
                               times=[])
            sessions[label] = sess
    result["stage"] = "timing"
    for _ in range(5):
        for sess in sessions.values():
            sess.run(None, feed)
    for _ in range(runs):  # round-robin: load changes on the machine hit every variant alike
        for label, sess in sessions.items():
            started = time.perf_counter()
            sess.run(None, feed)
            rows[label]["times"].append(time.perf_counter() - started)
    for row in rows.values():
        times = sorted(row.pop("times"))
        row["median_ms"] = 1000 * statistics.median(times)
        row["p90_ms"] = 1000 * times[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)]
    result.update(rows=rows, runs=runs, stage="done")


# ----- subprocess workers -----------------------------------------------------------------------------

class LiveResult(dict):
    """A dict that rewrites its JSON file on every change, so a worker killed on timeout still shows how far it
    got."""

    def __init__(self, path: str):
        super().__init__(stage="start")
        self.path = path
        self.save()

    def save(self) -> None:
        with open(self.path, "w") as fh:
            json.dump(self, fh)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.save()

    def update(self, *args, **kwargs) -> None:
        super().update(*args, **kwargs)
        self.save()


def worker(args) -> None:
    """Entry point of a child process: run one measurement, keep `args.result` (JSON) up to date."""
    import torch

    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(THREADS)
    result = LiveResult(args.result)
    try:
        if args.worker == "graphprune":
            measure_graphprune(args.model, args.repeats, result)
        elif args.worker == "torch-pruning":
            measure_torch_pruning(args.model, args.repeats, result, args.tp_ratio)
        else:
            measure_onnx(args.onnx_runs, args.tp_ratio, result)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        result.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        reachable = getattr(exc, "reachable", None)
        if reachable is not None:
            result["reachable"] = reachable


def run_worker(kind: str, model: str, timeout_s: float, args, tp_ratio: float | None = None) -> dict:
    """Run one measurement in a fresh interpreter under a timeout; return its result dict."""
    fd, path = tempfile.mkstemp(prefix="bench_plan_", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--model", model, "--result", path,
           "--repeats", str(args.repeats), "--onnx-runs", str(args.onnx_runs)]
    if tp_ratio is not None:
        cmd += ["--tp-ratio", str(tp_ratio)]
    print(f"[{time.strftime('%H:%M:%S')}] {kind:14s} {model} ...", flush=True)
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        result = _read_json(path)
        if proc.returncode != 0 and "error" not in result:
            result["error"] = f"worker exited with code {proc.returncode}"
            result["traceback"] = proc.stderr[-4000:]
    except subprocess.TimeoutExpired:
        result = _read_json(path)
        result["error"] = f"did not finish in {_duration(timeout_s)} (stage: {result.get('stage', '?')})"
        result["timed_out"] = True
    finally:
        os.unlink(path)
    result["wall_s"] = time.perf_counter() - started
    status = result.get("error", "ok")
    print(f"[{time.strftime('%H:%M:%S')}] {kind:14s} {model}: {status} ({result['wall_s']:.0f} s)", flush=True)
    return result


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.3g} min" if seconds >= 120 else f"{seconds:.0f} s"


def _read_json(path: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return {}


# ----- table ----------------------------------------------------------------------------------------

def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _short(error: str, limit: int = 110) -> str:
    error = " ".join(error.split()).replace("|", "/")
    return error if len(error) <= limit else error[:limit - 3] + "..."


def comparison_table(rows: list[tuple[str, dict, dict]]) -> str:
    head = ["model", "params / GFLOPs", "graphprune plan [s]", "TP build + select [s]", "TP time / graphprune time",
            "graphprune apply [s]", "TP prune [s]", "graphprune FLOPs ratio (own estimate)",
            "TP FLOPs ratio (pruning_ratio)", "what was cut (graphprune / TP)", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, gp, tp in rows:
        base = gp.get("flops_before") or tp.get("flops_before")
        params = gp.get("params") or tp.get("params")
        size = f"{params / 1e6:.1f} M / {base / 1e9:.2f}" if base and params else "-"
        gp_plan = _s(gp.get("plan_s")) if "plan_s" in gp else f"error: {_short(gp.get('error', '?'))}"
        if "select_s" in tp:
            tp_total = tp["build_s"] + tp["select_s"]
            tp_plan = f"{tp_total:.2f} ({tp['build_s']:.2f} + {tp['select_s']:.2f})"
        else:
            tp_total = None
            tp_plan = f"error: {_short(tp.get('error', '?'))}"
        factor = f"{tp_total / gp['plan_s']:.1f}x" if tp_total and gp.get("plan_s") else "-"
        gp_ratio = (f"{gp['ratio']:.3f} ({gp['own_ratio']:.3f})" if "ratio" in gp
                    else f"{gp['own_ratio']:.3f} (planned)" if "own_ratio" in gp else "-")
        tp_ratio = f"{tp['ratio']:.3f} ({tp['pruning_ratio']:.3f})" if "ratio" in tp else "-"
        notes = []
        if "mask_diff" in gp:
            notes.append(f"graphprune slim vs masked: max diff {gp['mask_diff']:.1e}")
        if gp.get("lossy"):
            notes.append("graphprune plan is lossy")
        if "error" in gp and "plan_s" in gp:
            notes.append(f"graphprune: {_short(gp['error'])}")
        if "reachable" in gp:
            notes.append(f"graphprune reachable ratio {gp['reachable']:.3f}")
        if "error" in tp and "select_s" in tp:
            notes.append(f"TP: {_short(tp['error'])}")
        if "calibration" in tp:
            notes.append(f"TP ratio calibrated in {len(tp['calibration'])} trials ({tp['calibration_s']:.0f} s)")
        elif "pruning_ratio" in tp:
            notes.append("TP: LLM-example recipe (local, heads + widths)")
        if "plan_runs" in gp or "runs" in tp:
            notes.append(f"min of {gp.get('plan_runs', '-')} / {tp.get('runs', '-')} runs")
        cut = f"graphprune: {gp.get('widths', '-')}<br>TP: {tp.get('widths', '-')}"
        cells = [name, size, gp_plan, tp_plan, factor, _s(gp.get("apply_s")), _s(tp.get("prune_s")), gp_ratio,
                 tp_ratio, cut, "; ".join(notes)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def onnx_table(result: dict) -> str:
    if "rows" not in result:
        return f"ONNX Runtime latency: error: {_short(result.get('error', '?'), 300)}"
    rows = result["rows"]
    base = rows["original"]
    head = ["resnet50 (ONNX Runtime, 1 thread)", "FLOPs ratio", "median [ms]", "p90 [ms]", "speedup (median)",
            "max abs diff ORT vs PyTorch (max abs output)", "exporter"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in rows.items():
        lines.append("| " + " | ".join([
            label, f"{row['flops'] / base['flops']:.3f}", f"{row['median_ms']:.1f}", f"{row['p90_ms']:.1f}",
            f"{base['median_ms'] / row['median_ms']:.2f}x", f"{row['max_abs_diff']:.1e} ({row['max_abs_out']:.1f})",
            row["exporter"]]) + " |")
    return "\n".join(lines) + f"\n\n{result['runs']} timed runs per model after 5 warm-up runs, run round-robin."


def environment_line() -> str:
    import onnxruntime
    import torch
    import torch_pruning
    import transformers
    load = os.getloadavg()
    return (f"torch {torch.__version__}, torch-pruning {torch_pruning.__version__}, transformers "
            f"{transformers.__version__}, onnxruntime {onnxruntime.__version__}; {THREADS} torch threads; "
            f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); "
            f"load average at start {load[0]:.2f}")


def source_state() -> tuple[str, str]:
    """(git commit with a -dirty mark, hash of the graphprune sources) of the code being measured."""
    import hashlib

    root = os.path.dirname(HERE)
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    digest = hashlib.sha1()
    for folder, _, files in sorted(os.walk(os.path.join(root, "graphprune"))):
        for file in sorted(f for f in files if f.endswith(".py")):
            with open(os.path.join(folder, file), "rb") as fh:
                digest.update(file.encode() + fh.read())
    return commit, digest.hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="resnet50 only (skip densenet121 and LLaMA)")
    parser.add_argument("--out", default=os.path.join(HERE, "results.md"), help="markdown output file")
    parser.add_argument("--tp-timeout", type=float, default=900, help="seconds per torch-pruning case")
    parser.add_argument("--gp-timeout", type=float, default=900, help="seconds per graphprune case")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (min reported; a case "
                        "stops repeating after 60 s of timed work)")
    parser.add_argument("--onnx-runs", type=int, default=50, help="timed ONNX Runtime runs per model (>= 30)")
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--worker", choices=["graphprune", "torch-pruning", "onnx"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--tp-ratio", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    env = environment_line()
    commit, sources = source_state()
    started = time.time()
    cases = QUICK_CASES if args.quick else ALL_CASES
    rows = []
    for name in cases:
        gp = run_worker("graphprune", name, args.gp_timeout, args)
        tp = run_worker("torch-pruning", name, args.tp_timeout, args)
        rows.append((name, gp, tp))
    onnx = None
    if not args.skip_onnx:
        tp_resnet = next(tp for name, _, tp in rows if name == "resnet50")
        onnx = run_worker("onnx", "resnet50", args.tp_timeout, args, tp_ratio=tp_resnet.get("pruning_ratio"))

    command = " ".join([os.path.relpath(sys.executable)] + [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    parts = [
        "# graphprune vs torch-pruning: planning time and achieved FLOPs (target: keep 50 % of FLOPs)",
        f"`{command}` — {time.strftime('%Y-%m-%d %H:%M')}, {time.time() - started:.0f} s in all",
        f"{env}, at end {os.getloadavg()[0]:.2f} (other processes on the machine inflate the times); "
        f"graphprune at git {commit}, sources {sources}",
        comparison_table(rows),
        "Times are wall-clock seconds (minimum over the timed runs, each case in a fresh process after an untimed "
        "warm-up). graphprune plan = `graphprune.plan(...)`; TP build + select = `BasePruner(...)` construction "
        "(DependencyGraph) + time inside `step(interactive=True)` yielding groups. FLOPs ratios are measured "
        "with `torch.utils.flop_counter.FlopCounterMode` (2 x MACs; CPU SDPA attention included) on the original "
        "and the pruned model; in parentheses graphprune's own estimate `plan.flops_ratio` and "
        "torch-pruning's channel `pruning_ratio`.",
    ]
    if onnx is not None:
        parts.append(onnx_table(onnx))
    if source_state()[1] != sources:
        parts.insert(3, "**Warning: the graphprune sources changed while this ran; rows may come from different "
                        "code. Rerun on a quiet tree.**")
    markdown = "\n\n".join(parts) + "\n"
    print("\n" + markdown)
    with open(args.out, "w") as fh:
        fh.write(markdown)
    print(f"written to {args.out}")
    failures = [(f"{kind} {name}", r) for name, gp, tp in rows for kind, r in (("graphprune", gp), ("TP", tp))
                if "error" in r]
    if onnx is not None and "error" in onnx:
        failures.append(("onnx", onnx))
    for label, result in failures:
        print(f"\n--- {label}: {result['error']}\n{result.get('traceback', '').rstrip()}")


if __name__ == "__main__":
    main()
