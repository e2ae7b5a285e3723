"""GPU check: what graphprune's outputs buy on an NVIDIA GPU, in one command (about 5 minutes on one H100/H200).

1. 2:4 Linear: a masked weight as a torch semi-structured sparse tensor (cuSPARSELt, else CUTLASS) against the same
   masked weight dense, float16 and bfloat16, LLaMA-MLP shapes (4096 -> 14336, 14336 -> 4096) and ViT-MLP shapes
   (768 -> 3072, 3072 -> 768), batch (tokens) 1 to 2048: largest error relative to the output, dense and sparse
   time (CUDA events, median of RUNS after warm-up), speed-up.
2. resnet50 and ViT-B/16 (random init) pruned to 0.5 of the FLOPs by graphprune.prune with exact widths
   (round_to=1), multiples of 8 and multiples of 64, run in float16 on the GPU, batch 64 at 224x224: time and
   speed-up over the dense model.
3. A LLaMA-3-8B-shaped MLP block (hidden 4096, intermediate 14336, SiLU gate) in bfloat16 at 2048 tokens: dense,
   channel-pruned to half its intermediate width, 2:4 on sparse kernels, and both.

The table goes to stdout and to ``--out`` (default benchmarks/results_gpu.md). Without a CUDA GPU the script says
so and exits 2; ``--device cpu --quick`` runs the same code on the CPU (2:4 rows report why they stay dense) to
check the script itself.

    python benchmarks/gpu_check.py                      # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --quick # smoke test anywhere
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

import graphprune
from graphprune.backends.sparse_kernels import to_kernel
from graphprune.passes.nm import magnitude_masked

RUNS, WARMUP = 20, 5


def timed(fn, device: str, runs: int = RUNS, warmup: int = WARMUP) -> float:
    """Median milliseconds of fn() (CUDA events on the GPU)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                started = time.perf_counter()
                fn()
                times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def masked_linear(rows: int, cols: int, dtype, device: str) -> nn.Linear:
    layer = nn.Linear(cols, rows, bias=False).to(device=device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(magnitude_masked(layer.weight.float(), "linear", 1, 2, 4)[0].to(dtype))
    return layer


def linear_rows(device: str, quick: bool) -> list[str]:
    shapes = [("LLaMA up", 14336, 4096), ("LLaMA down", 4096, 14336), ("ViT fc1", 3072, 768), ("ViT fc2", 768, 3072)]
    batches = [1, 16, 128, 512, 2048]
    if quick:
        shapes, batches = [(label, rows // 8, cols // 8) for label, rows, cols in shapes[2:]], [1, 64]
    out = ["| layer | out x in | dtype | tokens | dense ms | 2:4 ms | speed-up | max error / max output |",
           "|---|---|---|---|---|---|---|---|"]
    for dtype in (torch.float16, torch.bfloat16):
        for label, rows, cols in shapes:
            dense = masked_linear(rows, cols, dtype, device)
            sparse = masked_linear(rows, cols, dtype, device)
            sparse.load_state_dict(dense.state_dict())
            reason = to_kernel(sparse)
            for tokens in batches:
                x = torch.randn(tokens, cols, dtype=dtype, device=device)
                base = timed(lambda: dense(x), device)
                name = str(dtype).removeprefix("torch.")
                if reason is not None:
                    out.append(f"| {label} | {rows}x{cols} | {name} | {tokens} | {base:.3f} | dense: {reason} | - | - |")
                    continue
                with torch.inference_mode():
                    want, got = dense(x).float(), sparse(x).float()
                error = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-6)
                ms = timed(lambda: sparse(x), device)
                out.append(f"| {label} | {rows}x{cols} | {name} | {tokens} | {base:.3f} | {ms:.3f} | {base / ms:.2f}x | "
                           f"{error:.2e} |")
            print(out[-1], file=sys.stderr, flush=True)
    return out


def pruned_rows(device: str, quick: bool) -> list[str]:
    import torchvision

    batch, size = (64, 224) if not quick else (2, 64)
    dtype = torch.float16 if device == "cuda" else torch.float32
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    out = [f"| model | widths | FLOPs kept | ms ({str(dtype).removeprefix('torch.')}, batch {batch}) | speed-up |",
           "|---|---|---|---|---|"]
    for label, build in (("resnet50", torchvision.models.resnet50),
                         ("vit_b_16", lambda: torchvision.models.vit_b_16(image_size=size))):
        torch.manual_seed(0)
        model = build().eval()
        base = timed(lambda m=model.to(device=device, dtype=dtype): m(x), device)
        out.append(f"| {label} | dense | 1.000 | {base:.2f} | 1.00x |")
        for round_to, text in ((1, "exact"), (8, "multiples of 8"), (64, "multiples of 64")):
            model = model.float().cpu()
            example = torch.randn(1, 3, size, size)
            try:
                slim = graphprune.prune(model, example, target_flops=0.5, round_to=round_to)
            except graphprune.GraphPruneError as exc:
                out.append(f"| {label} | {text} | error: {' '.join(str(exc).split())[:80]} | - | - |")
                continue
            kept = slim.graphprune_plan.flops_ratio
            slim = slim.to(device=device, dtype=dtype)
            ms = timed(lambda: slim(x), device)
            out.append(f"| {label} | {text} | {kept:.3f} | {ms:.2f} | {base / ms:.2f}x |")
        print("\n".join(out[-4:]), file=sys.stderr, flush=True)
    return out


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate, self.up = nn.Linear(hidden, inner, bias=False), nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def mlp_rows(device: str, quick: bool) -> list[str]:
    hidden, inner, tokens = (4096, 14336, 2048) if not quick else (256, 896, 64)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    dense = GatedMLP(hidden, inner).eval()
    example = torch.randn(1, 16, hidden)
    slim = graphprune.prune(dense, example, target_params=0.5, round_to=64)  # half the intermediate width
    x = torch.randn(1, tokens, hidden, device=device, dtype=dtype)
    out = ["| LLaMA-3-8B MLP, %d tokens, %s | intermediate | ms | speed-up | on 2:4 kernels |"
           % (tokens, str(dtype).removeprefix("torch.")), "|---|---|---|---|---|"]
    base = None
    for label, model, sparse in (("dense", dense, False), ("channels pruned", slim, False),
                                 ("2:4", dense, True), ("pruned + 2:4", slim, True)):
        if sparse:
            model = graphprune.sparsify(model, example)
        model = model.to(device=device, dtype=dtype)
        reasons = [to_kernel(m) for m in (model.gate, model.up, model.down)] if sparse else []
        on = "-" if not sparse else ("yes" if not any(reasons) else f"no: {next(r for r in reasons if r)}")
        ms = timed(lambda: model(x), device)
        base = base or ms
        out.append(f"| {label} | {model.up.out_features} | {ms:.3f} | {base / ms:.2f}x | {on} |")
        print(out[-1], file=sys.stderr, flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="small shapes and batches (a smoke test)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_gpu.md"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine, or "
              "--device cpu --quick to check the script", file=sys.stderr)
        return 2
    where = (f"{torch.cuda.get_device_name()} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))})"
             if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads")
    lines = [f"# GPU check (benchmarks/gpu_check.py{' --quick' if args.quick else ''})", "",
             f"{where}; torch {torch.__version__}, cuSPARSELt "
             f"{getattr(torch.backends.cusparselt, 'version', lambda: None)() if args.device == 'cuda' else '-'}; "
             f"median of {RUNS} runs after {WARMUP} warm-up", "",
             "## 2:4 Linear vs the same masked weight dense", "", *linear_rows(args.device, args.quick), "",
             "## Pruned to 0.5 FLOPs: width rounding", "", *pruned_rows(args.device, args.quick), "",
             "## LLaMA MLP: channel pruning, 2:4, both", "", *mlp_rows(args.device, args.quick)]
    text = "\n".join(lines) + "\n"
    print(text)
    from bench_llm import write_atomic

    write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
