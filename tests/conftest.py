"""Shared test helpers: the exactness oracle and model preparation."""

from __future__ import annotations

import pytest
import torch

from graphprune.ir.from_torch import normalize_inputs

torch.set_num_threads(2)


def run(model, inputs):
    args, kwargs = normalize_inputs(inputs)
    model.eval()
    with torch.no_grad():
        return model(*args, **kwargs)


def oracle_error(plan, model, inputs) -> float:
    """Relative error between plan.apply(m)(x) and plan.mask(m)(x); also checks shapes agree."""
    slim, masked = plan.apply(model, verify=False), plan.mask(model)  # the slimmed module itself, no fallback
    a, b = run(slim, inputs), run(masked, inputs)
    assert a.shape == b.shape
    scale = b.abs().max().clamp_min(1e-12)
    return float((a - b).abs().max() / scale)


def applied_error(plan, model, inputs, *others, slim=None) -> float:
    """Relative error of plan.apply(model) (verified: the slim module, or the regenerated graph where the module
    cannot follow; `slim` if already applied) against plan.mask(model), the largest over `inputs` and others."""
    slim, masked = slim or plan.apply(model, example_inputs=inputs), plan.mask(model)
    worst = 0.0
    for x in (inputs, *others):
        a, b = run(slim, x), run(masked, x)
        assert a.shape == b.shape
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)))
    return worst


def nonzero_params(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give all-zero parameters (zero-initialised heads, layer scales) random values so outputs are informative."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def state_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def distinct_params(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random, pairwise different parameters and batch-norm statistics, as in a trained model (exporters merge
    identical initializers, such as the zero biases of a fresh model, into one shared tensor)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.1))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return model.eval()


def export_onnx(model: torch.nn.Module, inputs, path, dynamo: bool = False, dynamic: dict | None = None) -> str:
    """Export with the dynamo exporter or the TorchScript one (dynamic: dynamic_axes, TorchScript only)."""
    import contextlib
    import io
    import warnings

    args = inputs if isinstance(inputs, tuple) else (inputs,)
    path = str(path)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, args, path, dynamo=True, verbose=False)
        else:
            names = [f"input_{i}" for i in range(len(args))]
            torch.onnx.export(model, args, path, dynamo=False, input_names=names, dynamic_axes=dynamic)
    return path
