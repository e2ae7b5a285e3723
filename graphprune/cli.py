"""Command line: ``graphprune demo [--target-flops R]``, ``graphprune version``, ``graphprune --version``.

Exit codes: 0 success, 1 error (one line on stderr; ``--debug`` shows the traceback), 2 usage error.
Only argument parsing lives here; the work is done in the library (see graphprune.demo).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphprune", description="Automatic structured pruning for PyTorch models.")
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

    version = sub.add_parser("version", help="print the version", description="Print graphprune's version.")
    for command in (demo, version):  # --debug works before or after the command name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # usage errors exit with status 2 (argparse)
    if args.debug:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "version":
            print(f"graphprune {__version__}")
        elif args.command == "demo":
            from . import demo

            demo.run(target_flops=args.target_flops, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                     seed=args.seed)
        return 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("graphprune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"graphprune: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
