"""Command line: ``graphprune prune IN.onnx -o OUT.onnx --target-flops R``, ``graphprune inspect IN.onnx``,
``graphprune bench A.onnx B.onnx``, ``graphprune inspect-hf MODEL_DIR``, ``graphprune prune-hf MODEL_DIR -o OUT``, ``graphprune demo``, ``graphprune version``.

Exit codes: 0 success, 2 usage error (a bad argument, a missing input file or output directory), 1 any
other error; errors are one line on stderr with a hint (``--debug`` shows the traceback). Only argument
parsing lives here; the work is done in the library (graphprune.onnx, graphprune.demo).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence

from . import __version__


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2
        self.exit(2, f"graphprune: error: {message}; see '{self.prog} --help'\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="graphprune", description="Automatic structured pruning for PyTorch and ONNX models.")
    parser.add_argument("--version", action="version", version=f"graphprune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser("demo", help="train a small CNN on the bundled digits data, prune it, compare",
                          description="Train a small residual CNN on scikit-learn's bundled 8x8 digits, prune "
                                      "it to a FLOPs budget, fine-tune, and compare accuracy, FLOPs, params "
                                      "and CPU latency. Takes seconds; needs scikit-learn.")
    demo.add_argument("--target-flops", type=float, default=0.5, metavar="R",
                      help="fraction of the original FLOPs to keep, in (0, 1] (default: %(default)s)")
    demo.add_argument("--epochs", type=int, default=8, help="training epochs (default: %(default)s)")
    demo.add_argument("--finetune-epochs", type=int, default=3,
                      help="fine-tuning epochs after pruning (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")

    prune = sub.add_parser("prune", help="prune an ONNX model to a FLOPs, parameter or latency budget",
                           description="Prune an ONNX model: the output keeps the given fraction of FLOPs (or "
                                       "parameters), passes the ONNX checker and is verified in ONNX Runtime "
                                       "against the original with the removed channels zeroed. The input file "
                                       "is never modified.")
    prune.add_argument("input", help="the .onnx file to prune")
    prune.add_argument("-o", "--output", required=True, help="where to write the pruned .onnx file")
    budget = prune.add_mutually_exclusive_group()
    budget.add_argument("--target-flops", type=_ratio, metavar="R", help="fraction of the FLOPs to keep, in (0, 1]")
    budget.add_argument("--target-params", type=_ratio, metavar="R", help="fraction of the parameters to keep")
    budget.add_argument("--target-latency", type=_ratio, metavar="R",
                        help="fraction of the latency measured in ONNX Runtime on this CPU to keep (per-layer "
                             "tables measured once, cached in ~/.cache/graphprune or $GRAPHPRUNE_CACHE)")
    budget.add_argument("--plan", metavar="PLAN.json", help="apply this plan (graphprune plan JSON) instead")
    prune.add_argument("--importance", default="l2", choices=["l2", "l1", "random", "wanda", "flap", "obs"],
                       help="how channels are ranked (default: %(default)s; wanda, flap and obs read --calibration)")
    prune.add_argument("--round-to", type=_round_to, default="auto", metavar="N",
                       help="keep every layer's width a multiple of N, which kernels run fastest (default: "
                            "%(default)s: multiples of 8 for layers of 32 channels or more, exact below; 1 keeps "
                            "exact channel counts)")
    prune.add_argument("--max-ratio", type=_ratio, default=0.9, metavar="R",
                       help="largest fraction of one layer's channels that may go (default: %(default)s)")
    prune.add_argument("--allow-lossy", action="store_true",
                       help="also prune axes a LayerNormalization normalizes (changes outputs; verification "
                            "then checks shapes only)")
    prune.add_argument("--calibration", metavar="FILE.npz",
                       help="real inputs: one array per model input, named like it, samples along the first axis; "
                            "shapes are recorded and the result verified on the first batch")
    prune.add_argument("--threads", type=_positive, default=1, metavar="N",
                       help="with --target-latency: ONNX Runtime intra-op threads the latency is measured with "
                            "(default: %(default)s)")
    prune.add_argument("--plan-out", metavar="PLAN.json", help="also write the plan as JSON")
    prune.add_argument("--report", metavar="REPORT.html", help="also write an HTML report with a width chart")
    prune.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime comparison")
    prune.add_argument("--sparsity", type=_pattern, metavar="N:M",
                       help="also mask the N largest of every M input-channel weights of each eligible Conv / Gemm / "
                            "MatMul (2:4: what sparse tensor cores run; --round-to auto then keeps widths multiples "
                            "of 16); without a budget the model is only masked")
    prune.add_argument("--fp16", action="store_true",
                       help="write float16 weights and compute (what TensorRT 11 and sparse kernels need), checked "
                            "against float32 with half-precision tolerances; inputs and outputs stay float32")
    prune.add_argument("--fp16-io", action="store_true", help="with --fp16: float16 inputs and outputs too")

    inspect = sub.add_parser("inspect", help="show prunable groups, widths, FLOPs and pinned channels",
                             description="Read an ONNX model and show its prunable channel groups and widths, "
                                         "FLOPs and parameters, and the channels kept whole with the reasons.")
    inspect.add_argument("input", help="the .onnx file")
    inspect.add_argument("--sparsity", type=_pattern, nargs="?", const="2:4", metavar="N:M",
                         help="per weighted layer instead: does it hold N:M (default 2:4), can it, and would "
                              "TensorRT run it sparse")

    inspect_hf = sub.add_parser(
        "inspect-hf", help="what could be pruned in a Hugging Face LLM, from its config.json alone",
        description="Read a Hugging Face model directory's config.json (weights are never read, so they need not "
                    "be downloaded) and show the prunable groups and their widths per layer role, FLOPs per token "
                    "and parameters (total and per role), and the channels kept whole with the reasons.")
    inspect_hf.add_argument("input", metavar="MODEL_DIR", help="a directory holding config.json (or the file itself)")
    inspect_hf.add_argument("--seq-len", type=_positive, default=128, metavar="N",
                            help="tokens in the traced forward; FLOPs per token include attention at this "
                                 "length (default: %(default)s)")

    prune_hf = sub.add_parser(
        "prune-hf", help="prune a Hugging Face LLM checkpoint one decoder layer at a time",
        description="Prune a Hugging Face causal-LM directory (config.json and safetensors shards) into a new "
                    "directory, one decoder layer in memory at a time, so checkpoints larger than memory prune. "
                    "With --uniform the output loads with transformers' from_pretrained; otherwise with "
                    "graphprune.hf.load_pretrained. The input directory is never modified.")
    prune_hf.add_argument("input", metavar="MODEL_DIR", help="the model directory")
    prune_hf.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="a new directory to write")
    hf_budget = prune_hf.add_mutually_exclusive_group(required=True)
    hf_budget.add_argument("--target-params", type=_ratio, metavar="R", help="fraction of the parameters to keep")
    hf_budget.add_argument("--target-flops", type=_ratio, metavar="R",
                           help="fraction of the FLOPs (of one calibration window) to keep")
    prune_hf.add_argument("--calibration", required=True, metavar="FILE",
                          help="a text file (tokenized with the directory's tokenizer) or a .npy array of token ids "
                               "shaped [samples, tokens]")
    prune_hf.add_argument("--importance", default="flap", choices=["flap", "wanda", "obs"],
                          help="how channels and heads are ranked (default: %(default)s)")
    prune_hf.add_argument("--compensate", nargs="?", const="ls", choices=["ls", "bias"],
                          help="rewrite the layers that lost inputs: least squares (ls, the default when given) or "
                               "the mean into the bias")
    prune_hf.add_argument("--uniform", action="store_true",
                          help="every layer keeps the same widths (the config describes them)")
    prune_hf.add_argument("--layout", default="graphprune", choices=["graphprune", "deci"],
                          help="where layers differ: the original config.json plus graphprune's plan (graphprune, "
                               "the default; graphprune.load reads it) or the DeciLM block_configs layout vLLM and "
                               "llama.cpp read (deci; LLaMA architecture)")
    prune_hf.add_argument("--allocation", default="global", choices=["global", "uniform", "flap", "search"],
                          help="how many channels each layer loses: one ranking across layers (global, the default), "
                               "the same in every layer (uniform, as --uniform), or FLAP's adaptive structure "
                               "(flap: FLAP's metric standardized per layer); search needs the whole model: use "
                               "graphprune.prune")
    prune_hf.add_argument("--seq-len", type=_positive, default=256, metavar="N",
                          help="tokens per calibration window cut from a text file (default: %(default)s)")
    prune_hf.add_argument("--samples", type=_positive, default=16, metavar="N",
                          help="calibration windows taken from a text file, at most (default: %(default)s)")
    prune_hf.add_argument("--batch-size", type=_positive, default=4, metavar="N",
                          help="calibration windows per forward (default: %(default)s)")
    prune_hf.add_argument("--propagate", default="dense", choices=["dense", "pruned"],
                          help="what feeds each layer: the original model's activations (dense, the default) or "
                               "the pruned layers' outputs")
    prune_hf.add_argument("--device", default="cpu", help="where layers run, one at a time (default: %(default)s)")
    prune_hf.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                          help="the dtype layers run in (default: the checkpoint's; written weights keep it)")
    prune_hf.add_argument("--round-to", type=_round_to, default="auto", metavar="N",
                          help="keep widths a multiple of N (default: %(default)s)")
    prune_hf.add_argument("--max-ratio", type=_ratio, default=0.9, metavar="R",
                          help="largest fraction of one layer's channels that may go (default: %(default)s)")
    prune_hf.add_argument("--report", metavar="REPORT.html", help="also write an HTML report with a width chart")

    bench = sub.add_parser("bench", help="latency of ONNX models side by side (ONNX Runtime CPU or TensorRT)",
                           description="Time ONNX models in ONNX Runtime on the CPU (fixed threads, warm-up, "
                                       "median and p90 over the runs, the same input for all) or, with --runtime "
                                       "tensorrt, as TensorRT engines on the GPU, and show their FLOPs and "
                                       "parameters; the first model is the baseline.")
    bench.add_argument("inputs", nargs="+", metavar="MODEL.onnx")
    bench.add_argument("--runs", type=_positive, default=50, help="timed runs per model (default: %(default)s)")
    bench.add_argument("--warmup", type=_count, default=5, help="untimed runs first (default: %(default)s)")
    bench.add_argument("--threads", type=_positive, help="ONNX Runtime intra-op threads (default: cores, at most 4)")
    bench.add_argument("--runtime", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                       help="onnxruntime: the CPU; tensorrt: each file built into an engine (2:4 sparse kernels "
                            "allowed) and timed on the GPU; needs TensorRT and an NVIDIA GPU (default: %(default)s)")
    for command in (prune, inspect, bench):
        command.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
                             type=_input_shape, help="shape for an input with unknown dimensions (repeatable)")

    trt = sub.add_parser("trt", help="build a TensorRT engine and report which layers run 2:4 sparse kernels",
                         description="Build a TensorRT (10 or 11) engine from an ONNX file with sparse weights enabled "
                                     "and print, per layer, whether TensorRT found it eligible for 2:4 sparse math, "
                                     "picked a sparse kernel, and what the engine inspector says. Needs TensorRT and "
                                     "an NVIDIA GPU; the engine is written whole or not at all.")
    trt.add_argument("input", metavar="SLIM.onnx", help="the ONNX file (float16 for TensorRT 11: prune ... --fp16)")
    trt.add_argument("-o", "--output", required=True, metavar="SLIM.engine", help="where to write the engine")
    trt.add_argument("--sparse", action=argparse.BooleanOptionalAction, default=True,
                     help="let layers whose weights hold 2:4 use sparse kernels (default: on)")
    trt.add_argument("--fp16", action="store_true", default=None,
                     help="require float16 (default: the FP16 builder flag where the installed TensorRT has one; "
                          "TensorRT 11 takes precision from the file)")

    version = sub.add_parser("version", help="print the version", description="Print graphprune's version.")
    for command in (demo, prune, inspect, inspect_hf, prune_hf, bench, trt, version):  # --debug works before or after the command name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (the fraction to keep), got {text}")
    return value


def _integer(minimum: int, expected: str):
    """An argparse type: an integer of at least `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    return parse


_positive = _integer(1, "a positive integer")
_count = _integer(0, "a whole number, 0 or more")


def _pattern(text: str) -> str:
    from .passes.nm import parse_pattern

    try:
        parse_pattern(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _round_to(text: str):
    return text if text == "auto" else _positive(text)


def _input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, dims = text.partition("=")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        shape = ()
    if not name or not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME=D0,D1,... with positive dims, got {text!r}")
    return name, shape


def _progress(message: str) -> None:
    """One line per step; "label i/n" messages redraw one progress bar in place on a terminal."""
    count = re.fullmatch(r"(.*?) ?(\d+)/(\d+)", message)
    if count is None:
        print(f"graphprune: {message}", file=sys.stderr, flush=True)
        return
    label, i, n = count.group(1), int(count.group(2)), int(count.group(3))
    if sys.stderr.isatty():
        filled = 30 * i // max(n, 1)
        end = "\n" if i >= n else ""
        print(f"\rgraphprune: {label} [{'#' * filled}{'.' * (30 - filled)}] {i}/{n}", end=end, file=sys.stderr,
              flush=True)
    elif i in (1, n):
        print(f"graphprune: {label} {i}/{n}", file=sys.stderr, flush=True)


def _run(args) -> None:
    """The command's work, through the public API."""
    if args.command == "version":
        print(f"graphprune {__version__}")
    elif args.command == "demo":
        from . import demo

        demo.run(target_flops=args.target_flops, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                 seed=args.seed)
        return
    elif args.command == "inspect-hf":
        from .hf_inspect import inspect_pretrained

        print(inspect_pretrained(args.input, seq_len=args.seq_len))
        return
    elif args.command == "prune-hf":
        import torch

        from .hf_prune import calibration_ids, prune_pretrained

        ids = calibration_ids(args.calibration, args.input, args.seq_len, args.samples)
        result = prune_pretrained(args.input, args.output, args.target_params, args.target_flops,
                                  importance=args.importance, compensate=args.compensate or False,
                                  uniform=args.uniform, allocation=args.allocation, calibration=ids,
                                  batch_size=args.batch_size, propagate=args.propagate, layout=args.layout,
                                  device=args.device,
                                  dtype=getattr(torch, args.dtype) if args.dtype else None, round_to=args.round_to,
                                  max_ratio=args.max_ratio, progress=_progress)
        if args.report:
            result.plan.report(args.report)
        print(result.summary())
        return
    elif args.command == "trt":
        import os

        from .backends import tensorrt as trt_backend
        from .errors import UsageError

        if not os.path.isfile(args.input):
            raise UsageError(f"no such ONNX file: {args.input}")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            raise UsageError(f"the directory of {args.output} does not exist")
        reason = trt_backend.available()
        if reason is not None:
            raise UsageError(reason)
        print(trt_backend.build(args.input, args.output, sparse=args.sparse, fp16=args.fp16).summary())
        return
    from . import onnx as gonnx

    shapes = dict(getattr(args, "input_shape", []))
    if args.command == "prune":
        from .errors import UsageError
        from .plan import PruningPlan

        if args.threads != 1 and args.target_latency is None:
            raise UsageError("--threads sets the ONNX Runtime threads a latency budget is measured with: add "
                             "--target-latency R")
        if args.fp16_io and not args.fp16:
            raise UsageError("--fp16-io changes the inputs and outputs of a float16 model: add --fp16")
        if args.target_flops is None and args.target_params is None and args.target_latency is None \
                and args.plan is None:
            if args.sparsity is None:
                raise UsageError("give a budget: --target-flops R, --target-params R or --target-latency R (or --plan "
                                 "PLAN.json), or --sparsity N:M to mask without pruning")
            print(gonnx.sparsify(args.input, args.output, args.sparsity, verify=not args.no_verify,
                                 input_shapes=shapes, fp16=args.fp16, float16_io=args.fp16_io))
            return
        batches = gonnx.load_calibration(args.calibration, args.input) if args.calibration else None
        latency = {"target_latency": args.target_latency, "threads": args.threads} if args.target_latency else {}
        result = gonnx.prune(args.input, args.output, args.target_flops, target_params=args.target_params,
                             importance=args.importance, round_to=args.round_to, max_ratio=args.max_ratio,
                             allow_lossy=args.allow_lossy, input_shapes=shapes, calibration=batches,
                             verify=not args.no_verify, plan_out=args.plan_out, report=args.report,
                             the_plan=PruningPlan.load(args.plan) if args.plan else None, progress=_progress,
                             sparsity=args.sparsity, fp16=args.fp16, float16_io=args.fp16_io, **latency)
        print(result.summary())
    elif args.command == "inspect":
        print(gonnx.inspect(args.input, shapes, sparsity=args.sparsity))
    elif args.command == "bench":
        rows = gonnx.bench(args.inputs, runs=args.runs, warmup=args.warmup, threads=args.threads,
                           input_shapes=shapes, progress=_progress, runtime=args.runtime)
        print(gonnx.bench_table(rows))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # usage errors exit with status 2 (argparse)
    if args.debug:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    try:
        _run(args)
        return 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("graphprune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        from .errors import UsageError

        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"graphprune: error: {message}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
