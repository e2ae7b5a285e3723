"""Prune an ONNX file from the command line, then time both files in ONNX Runtime.

The script exports torchvision's mobilenet_v3_small (random init) to ONNX, then runs the commands a user
types in a shell:

    graphprune inspect mobilenet_v3_small.onnx
    graphprune prune mobilenet_v3_small.onnx -o slim.onnx --target-flops 0.5 --report report.html --plan-out plan.json
    graphprune bench mobilenet_v3_small.onnx slim.onnx

(here as `python -m graphprune ...`, so they use this interpreter) and finally loads slim.onnx in ONNX
Runtime itself. Run it with

    python examples/prune_onnx_cli.py [--out DIR]

GRAPHPRUNE_EXAMPLE_SMALL=1 uses 64x64 images and few timing runs (seconds); GRAPHPRUNE_EXAMPLE_OUT sets the
output directory (default ./example-output). Needs torchvision, onnxscript (the exporter) and onnxruntime.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

import numpy as np
import onnxruntime
import torch
import torchvision

SMALL = os.environ.get("GRAPHPRUNE_EXAMPLE_SMALL") == "1"
SIZE = 64 if SMALL else 224
BENCH_RUNS = 5 if SMALL else 50


def graphprune_cli(*args: str) -> str:
    """Run `graphprune ARGS...` as a user would, show what it prints, and stop if it fails."""
    command = [sys.executable, "-m", "graphprune", *args]
    print(f"\n$ graphprune {' '.join(args)}", flush=True)
    # stderr (one line per step, or the error and its fix) merged into stdout, in the order it was written
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    print(done.stdout, end="", flush=True)
    if done.returncode != 0:
        raise SystemExit(f"graphprune {args[0]} failed with exit code {done.returncode}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("GRAPHPRUNE_EXAMPLE_OUT", "example-output"),
                        help="output directory (default: $GRAPHPRUNE_EXAMPLE_OUT or ./example-output)")
    out = pathlib.Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    src, dst = out / "mobilenet_v3_small.onnx", out / "slim.onnx"
    torch.onnx.export(model, (x,), src, input_names=["image"], output_names=["logits"], dynamo=True)
    print(f"exported mobilenet_v3_small ({SIZE}x{SIZE} input) to {src}")

    graphprune_cli("inspect", str(src))
    graphprune_cli("prune", str(src), "-o", str(dst), "--target-flops", "0.5", "--report", str(out / "report.html"),
                   "--plan-out", str(out / "plan.json"))
    graphprune_cli("bench", str(src), str(dst), "--runs", str(BENCH_RUNS))

    session = onnxruntime.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    print(f"\n{dst} runs in ONNX Runtime: logits {list(logits.shape)}, finite: {bool(np.isfinite(logits).all())}")
    print(f"open {out / 'report.html'} in a browser for the width chart")


if __name__ == "__main__":
    main()
