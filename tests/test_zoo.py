"""The torchvision classification zoo (random weights): every model pruned to half its FLOPs, run, and
checked with the exactness oracle, once with the default importance and once with random importance
(which spreads the cuts over many more channel groups). Set GRAPHPRUNE_ZOO_REPORT=path to write the
results table (make zoo-report writes docs/zoo.md)."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torchvision

import graphprune

from .conftest import applied_error, nonzero_params, run

MODELS = torchvision.models.list_models(module=torchvision.models)
RESULTS: dict[str, tuple[float, str, float]] = {}


def input_size(name: str) -> int:
    if name.startswith(("vit", "swin", "maxvit")):
        return 224  # fixed-size position embeddings / windows
    if name.startswith("inception"):
        return 299
    return 96


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    path = os.environ.get("GRAPHPRUNE_ZOO_REPORT")
    if path and RESULTS:
        ok = sum(1 for _, status, _ in RESULTS.values() if status.startswith("ok"))
        lines = ["# torchvision classification zoo at target_flops=0.5", "",
                 f"{ok} of {len(RESULTS)} models pruned and passed the exactness oracle "
                 "(random weights, CPU, `make zoo-report`).", "",
                 "| model | input | achieved FLOPs ratio | status | plan + apply + check (s) |",
                 "|---|---|---|---|---|"]
        for name in sorted(RESULTS):
            ratio, status, seconds = RESULTS[name]
            lines.append(f"| {name} | {input_size(name)} | {ratio:.3f} | {status} | {seconds:.1f} |")
        from graphprune.files import atomic_write
        atomic_write(path, ("\n".join(lines) + "\n").encode())


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_prunes_to_half_and_is_exact(name):
    started = time.perf_counter()
    torch.manual_seed(0)
    model = nonzero_params(torchvision.models.get_model(name).eval())
    size = input_size(name)
    x = torch.randn(1, 3, size, size)
    batch3 = torch.randn(3, 3, size, size)
    try:
        plan = graphprune.plan(model, x, target_flops=0.5)
        assert abs(plan.flops_ratio - 0.5) <= 0.01
        slim = plan.apply(model)  # verified; the regenerated graph where the module cannot follow
        assert run(slim, x).shape == run(model, x).shape
        # the regenerated graph follows the batch size, unless its note says why not
        follows = not isinstance(slim, torch.fx.GraphModule) or "batch size" in plan.notes[-1]
        assert follows or "replays the recorded shapes" in plan.notes[-1]
        assert applied_error(plan, model, x, *([batch3] if follows else []), slim=slim) <= 1e-5
        assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
        spread = graphprune.plan(model, x, target_flops=0.5, importance="random")
        assert abs(spread.flops_ratio - 0.5) <= 0.01
        assert applied_error(spread, model, x) <= 1e-5
    except Exception as exc:
        RESULTS[name] = (float("nan"), f"failed: {type(exc).__name__}", time.perf_counter() - started)
        raise
    status = "ok (regenerated graph)" if isinstance(slim, torch.fx.GraphModule) else "ok"
    RESULTS[name] = (plan.flops_ratio, status, time.perf_counter() - started)
