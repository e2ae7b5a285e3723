"""Latency budgets on resnet50 in ONNX Runtime (CPU): target_latency against the FLOPs budget it replaces.

    .venv/bin/python benchmarks/bench_latency.py [--runs 50] [--threads 1] [--out benchmarks/results_latency.md]

resnet50 (torchvision, random weights with distinct values as in a trained model, seeded) is exported to ONNX
(dynamo). graphprune.onnx.prune then prunes the file to half its FLOPs (the default, widths multiples of 8) and,
from a per-layer latency table measured once on this machine (passes/latency.py; the table's measuring time is
shown, later runs read it from the cache), to half its measured latency. Every plan's latency is predicted
from the same table; all files are then timed together by graphprune.onnx.bench (same input, fixed threads,
warm-up, in turns of back-to-back runs). The prediction error compares predicted and measured speed-ups (both
against the original timed in the same run), so a change of machine load between measuring the table and
timing the files does not count as error.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--out", default=os.path.join(HERE, "results_latency.md"))
    args = parser.parse_args()

    import numpy as np
    import onnxruntime
    import torch
    import torchvision

    import graphprune.onnx as gonnx
    from graphprune.backends.onnx_latency import cache_dir, measure
    from graphprune.files import atomic_write
    from graphprune.passes.latency import LatencyModel
    from tests.conftest import distinct_params, export_onnx

    torch.set_num_threads(2)
    torch.manual_seed(0)
    started = time.time()
    tmp = tempfile.mkdtemp(prefix="bench_latency_")
    os.environ["GRAPHPRUNE_CACHE"] = os.path.join(tmp, "cache")  # measure the table in this run
    model = distinct_params(torchvision.models.resnet50()).eval()
    dense = export_onnx(model, torch.randn(1, 3, 224, 224), os.path.join(tmp, "resnet50.onnx"), dynamo=True)
    loaded = gonnx.read(dense)
    t = time.perf_counter()
    table = measure(loaded, args.threads)
    table_s = time.perf_counter() - t
    latency = LatencyModel(loaded.an, table)
    rows = [("original", dense, 1.0, "")]
    cases = [(f"FLOPs {args.target} (default widths)", {"target_flops": args.target}),
             (f"FLOPs {args.target}, round_to={table.block} (the measured block)",
              {"target_flops": args.target, "round_to": table.block}),
             (f"latency {args.target}", {"target_latency": args.target, "threads": args.threads})]
    for label, options in cases:
        out = os.path.join(tmp, f"{len(rows)}.onnx")
        t = time.perf_counter()
        plan = gonnx.prune(dense, out, **options)
        seconds = time.perf_counter() - t
        predicted = latency.total(np.nonzero(plan._gone)[0]) / latency.total()
        rows.append((label, out, predicted, f"{seconds:.1f} s; FLOPs {plan.flops_ratio:.3f}"))
    results = gonnx.bench([r[1] for r in rows], runs=args.runs, threads=args.threads)
    lines = [f"# resnet50: target_latency={args.target} vs target_flops={args.target}, ONNX Runtime CPU, "
             f"{args.threads} thread(s)", "",
             f"`.venv/bin/python benchmarks/bench_latency.py --runs {args.runs} --threads {args.threads}` — "
             f"{time.strftime('%Y-%m-%d %H:%M')}, {time.time() - started:.0f} s in all", "",
             f"torch {torch.__version__}, torchvision {torchvision.__version__}, onnxruntime {onnxruntime.__version__}; "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load average at end "
             f"{os.getloadavg()[0]:.2f}", "",
             f"Latency table: {len(table.layers)} layers, {table.notes[0]}; measured in {table_s:.0f} s (cached "
             f"after: {cache_dir()}). Whole model {table.whole_ms:.1f} ms when measured.", "",
             "| plan | FLOPs ratio | median [ms] | p90 [ms] | measured speed-up | predicted speed-up | "
             "prediction error | how |", "|---|---|---|---|---|---|---|---|"]
    base = results[0]["median_ms"]
    for (label, _, predicted, how), r in zip(rows, results):
        measured = base / r["median_ms"]
        lines.append(f"| {label} | {r['flops'] / results[0]['flops']:.3f} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | "
                     f"{measured:.2f}x | {1 / predicted:.2f}x | {100 * (1 / (predicted * measured) - 1):+.1f}% | {how} |")
    lines += ["", f"{args.runs} timed runs per model after 5 warm-up runs, in 5 turns of back-to-back runs "
              "(graphprune.onnx.bench). "
              "Prediction error: predicted speed-up / measured speed-up - 1 (positive: the prediction was "
              "optimistic), as `graphprune prune --target-latency` reports it."]
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write(args.out, text.encode())
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
