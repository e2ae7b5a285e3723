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
    slim, masked = plan.apply(model), plan.mask(model)
    a, b = run(slim, inputs), run(masked, inputs)
    assert a.shape == b.shape
    scale = b.abs().max().clamp_min(1e-12)
    return float((a - b).abs().max() / scale)


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
