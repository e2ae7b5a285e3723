"""Inspect a pruning plan before cutting anything: per-layer summary, why channels were kept whole, and an
HTML report with a chart of every group's width.

torchvision's convnext_tiny (random init) is a good subject: its LayerNorms normalize over the channels,
so graphprune keeps those channels whole unless told that changing the statistics is acceptable, and
`plan.explain()` says so. The script plans half the FLOPs, prints `plan.summary()` and `plan.explain()`,
writes `plan.report("report.html")` and the plan as JSON, then applies the JSON plan to a fresh instance of
the architecture (how a plan is replayed elsewhere), and shows what `allow_lossy=True` would change.

    python examples/inspect_plan.py [--out DIR]

GRAPHPRUNE_EXAMPLE_SMALL=1 uses 64x64 inputs instead of 224x224; GRAPHPRUNE_EXAMPLE_OUT sets the output
directory (default ./example-output). Writes DIR/report.html and DIR/plan.json.
"""

from __future__ import annotations

import argparse
import os
import pathlib

import torch
import torchvision

import graphprune

SMALL = os.environ.get("GRAPHPRUNE_EXAMPLE_SMALL") == "1"
SIZE = 64 if SMALL else 224


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("GRAPHPRUNE_EXAMPLE_OUT", "example-output"),
                        help="output directory (default: $GRAPHPRUNE_EXAMPLE_OUT or ./example-output)")
    out = pathlib.Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    model = torchvision.models.convnext_tiny(num_classes=10).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    plan = graphprune.plan(model, x, target_flops=0.5)

    print("== plan.summary(): every layer that changes, and the totals")
    print(plan.summary())
    print("\n== plan.explain(): channels that own weights but were kept whole, and why")
    print(plan.explain())

    plan.report(out / "report.html")  # width chart, summary and reasons in one page
    plan.save(out / "plan.json")
    print(f"\nwrote {out / 'report.html'} (open it in a browser) and {out / 'plan.json'}")

    # A plan is data: it replays on any instance of the same architecture (here freshly initialised).
    fresh = torchvision.models.convnext_tiny(num_classes=10).eval()
    slim = graphprune.PruningPlan.load(out / "plan.json").apply(fresh)
    ratio = graphprune.count_flops(slim, x) / graphprune.count_flops(fresh, x)
    print(f"plan.json applied to a fresh convnext_tiny: FLOPs ratio {ratio:.3f}, "
          f"{sum(p.numel() for p in slim.parameters()) / 1e6:.2f}M parameters "
          f"(from {sum(p.numel() for p in fresh.parameters()) / 1e6:.2f}M)")

    # explain() named the way out for the LayerNorm-normalized channels: allow_lossy=True prunes them too,
    # at the price of outputs that change beyond the removed channels' contribution (the summary says LOSSY).
    lossy = graphprune.plan(model, x, target_flops=0.5, allow_lossy=True)
    pinned = sum(p["channels"] for p in plan.pinned)
    pinned_lossy = sum(p["channels"] for p in lossy.pinned)
    print(f"with allow_lossy=True: {pinned_lossy} weighted channels pinned instead of {pinned}, params ratio "
          f"{lossy.params_ratio:.3f} instead of {plan.params_ratio:.3f}, lossy: {lossy.lossy}")


if __name__ == "__main__":
    main()
