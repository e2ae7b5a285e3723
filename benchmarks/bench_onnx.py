"""ONNX in, ONNX out on resnet50: graphprune's ONNX path against torch-pruning, in ONNX Runtime.

    .venv/bin/python benchmarks/bench_onnx.py [--runs 50] [--threads 1] [--out benchmarks/results_onnx.md]

resnet50 (torchvision, random weights with distinct values as in a trained model, seeded) is exported to
ONNX once (dynamo exporter). graphprune then prunes the .onnx file itself to 50 % of its FLOPs with
``graphprune.onnx.prune`` (the function behind ``graphprune prune``; default settings, whose widths are
multiples of 8 in layers of 32 channels or more, and round_to=1 for exact channel counts),
timed end to end (read + shapes + analysis + plan + write + checker + ORT verification). The baseline is
torch-pruning on the PyTorch model (global magnitude pruning, its channel ratio bisected to the same
FLOPs) exported the same way. All files are timed together by ``graphprune.onnx.bench`` (the function
behind ``graphprune bench``): same random input, fixed intra-op threads, warm-up, turns of back-to-back runs,
median and p90.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(HERE, "results_onnx.md"))
    args = parser.parse_args()

    import onnxruntime
    import torch
    import torch_pruning
    import torchvision
    from bench_plan import calibrate_tp_ratio, count_flops, tp_prune

    import graphprune.onnx as gonnx
    from graphprune.files import atomic_write
    from tests.conftest import distinct_params, export_onnx

    torch.set_num_threads(2)
    torch.manual_seed(0)
    started = time.time()
    model = distinct_params(torchvision.models.resnet50())
    x = torch.randn(1, 3, 224, 224)
    tmp = tempfile.mkdtemp(prefix="bench_onnx_")
    dense = export_onnx(model, x, os.path.join(tmp, "resnet50.onnx"), dynamo=True)
    rows = [("original", dense, None)]
    for label, options in (("graphprune (default)", {}), ("graphprune round_to=1", {"round_to": 1})):
        out = os.path.join(tmp, f"resnet50_graphprune_round_to{options.get('round_to', 'auto')}.onnx")
        t = time.perf_counter()
        plan = gonnx.prune(dense, out, target_flops=0.5, **options)
        how = f"{time.perf_counter() - t:.1f} s ONNX to ONNX, verified; plan FLOPs {plan.flops_ratio:.3f}"
        rows.append((label, out, how))
    base = count_flops(model, x)
    ratio, history = calibrate_tp_ratio(model, x, x, "resnet50", base)
    tp_model = copy.deepcopy(model)
    t = time.perf_counter()
    tp_prune(tp_model, x, "resnet50", ratio)
    tp_s = time.perf_counter() - t
    tp_file = export_onnx(tp_model, x, os.path.join(tmp, "resnet50_tp.onnx"), dynamo=True)
    how = f"pruning_ratio {ratio:.3f} (bisected: {len(history)} trials), {tp_s:.1f} s on the PyTorch model, then exported"
    rows.append(("torch-pruning", tp_file, how))
    results = gonnx.bench([r[1] for r in rows], runs=args.runs, threads=args.threads)
    dense_flops = results[0]["flops"]
    command = (f"`.venv/bin/python benchmarks/bench_onnx.py --runs {args.runs} --threads {args.threads}` — "
               f"{time.strftime('%Y-%m-%d %H:%M')}, {time.time() - started:.0f} s in all")
    versions = (f"torch {torch.__version__}, torchvision {torchvision.__version__}, torch-pruning "
                f"{torch_pruning.__version__}, onnxruntime {onnxruntime.__version__}; {os.cpu_count()} CPUs "
                f"({platform.machine()}); load average at end {os.getloadavg()[0]:.2f}")
    lines = ["# resnet50: ONNX in, ONNX out (target: keep 50 % of FLOPs), ONNX Runtime CPU latency", "",
             command, "", versions, "",
             "| model | FLOPs ratio (counted in the ONNX graph) | params | median [ms] | p90 [ms] | speed-up | how |",
             "|---|---|---|---|---|---|---|"]
    for (label, _, how), r in zip(rows, results):
        lines.append(f"| {label} | {r['flops'] / dense_flops:.3f} | {r['params'] / 1e6:.1f} M | {r['median_ms']:.1f} | "
                     f"{r['p90_ms']:.1f} | {r['speedup']:.2f}x | {how or 'exported (dynamo)'} |")
    lines += ["", (f"{args.runs} timed runs per model after 5 warm-up runs, in 5 turns of back-to-back runs, {args.threads} intra-op "
                   "thread(s), the same random input (graphprune.onnx.bench)."), ""]
    text = "\n".join(lines)
    print(gonnx.bench_table(results))
    print(text)
    atomic_write(args.out, text.encode())


if __name__ == "__main__":
    main()
