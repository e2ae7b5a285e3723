"""importance="obs" (structured Optimal Brain Surgeon): its score is the output error its own least-squares
compensation leaves, the ls update is the OBS update, and on a CNN and a small transformer obs + ls lands on
the budget, applies exactly, and stays closer to the dense model than l2 without compensation."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import graphprune
from graphprune.demo import DigitsNet, load_data
from graphprune.passes import calibration as cal

from .conftest import applied_error, export_onnx, run
from .test_transformers import MODELS


def _linear_reader(n=4000, d_in=10, d_out=6):
    """One Linear layer on correlated, non-centred inputs; column pair (0, 1) is one component (a "head"). X^T X is
    gathered in float64: the identities below are exact, and a float32 sum (the default, for memory) rounds by
    1e-6, which the removed columns' correlation with the kept ones magnifies past 1e-4 on some CPUs."""
    gen = torch.Generator().manual_seed(0)
    mix = torch.eye(d_in) + 0.5 * torch.randn(d_in, d_in, generator=gen)
    x = torch.randn(n, d_in, generator=gen) @ mix + torch.randn(d_in, generator=gen)
    w, b = torch.randn(d_out, d_in, generator=gen), torch.randn(d_out, generator=gen)
    columns = np.concatenate([[0], np.arange(d_in - 1)])  # component 0 owns columns 0 and 1
    reader = cal.Reader("fc", "fc.weight", 1, "linear", want_gram=True, gram_dtype=torch.float64, columns=columns)
    reader.add(x)
    an = SimpleNamespace(prunable=np.ones(d_in - 1, dtype=bool))
    return x, {"fc.weight": w, "fc.bias": b}, reader, an


def _compensated_error(x, tensors, reader, an, comp):
    """Mean squared output error after removing component `comp` and applying the existing ls update."""
    gone = np.zeros(len(an.prunable), dtype=bool)
    gone[comp] = True
    updates, _ = cal.compensate([reader], an, gone, tensors, "ls")
    kept = torch.from_numpy(~gone[reader.columns])
    w, b = tensors["fc.weight"].double(), tensors["fc.bias"].double()
    new_w, new_b = updates.get("fc.weight", w).double(), updates["fc.bias"].double()
    dense = x.double() @ w.T + b
    slim = x.double()[:, kept] @ new_w[:, kept].T + new_b
    return float((slim - dense).pow(2).sum(1).mean()), updates


# with the default ridge the two sides differ only in the ridge's scale (mean variance of all inputs for the
# score, of the kept ones for compensation): under 10% here
@pytest.mark.parametrize("ridge,rtol", [(1e-9, 1e-4), (cal.RIDGE, 0.15)])
def test_obs_score_is_the_error_its_least_squares_compensation_leaves(ridge, rtol, monkeypatch):
    monkeypatch.setattr(cal, "RIDGE", ridge)
    x, tensors, reader, an = _linear_reader()
    score = cal.CalibratedImportance("obs", [reader])(an, tensors)
    for comp in range(len(an.prunable)):  # a 2-column block, then single columns
        real, _ = _compensated_error(x, tensors, reader, an, comp)
        assert score[comp] == pytest.approx(real, rel=rtol)
    assert score.max() > 3 * score.min()  # the scores discriminate, so the match is no accident


def test_least_squares_update_is_the_obs_update(monkeypatch):
    """dW = -W_P [(H^-1)_PP]^-1 (H^-1)_P. with H = E[x~ x~^T], x~ = [x; 1] (the bias as a column kept)."""
    monkeypatch.setattr(cal, "RIDGE", 1e-9)
    x, tensors, reader, an = _linear_reader()
    _, updates = _compensated_error(x, tensors, reader, an, 0)
    xt = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    h_inv = torch.linalg.inv(xt.T @ xt / len(x))
    wt = torch.cat([tensors["fc.weight"], tensors["fc.bias"][:, None]], 1).double()
    p = torch.tensor([0, 1])
    delta = -wt[:, p] @ torch.linalg.solve(h_inv[p][:, p], h_inv[p])
    obs = wt + delta
    ls = torch.cat([updates["fc.weight"], updates["fc.bias"][:, None]], 1).double()
    assert torch.allclose(obs[:, 2:], ls[:, 2:], rtol=1e-5, atol=1e-5 * float(wt.abs().max()))
    assert delta[:, 2:].abs().max() > 0.1 * wt.abs().max()  # the inputs are correlated: the update matters


def _relative_error(slim, model, batches, out=lambda y: y):
    num = den = 0.0
    for b in batches:
        dense = out(run(model, b))
        num += float((out(run(slim, b)) - dense).pow(2).sum())
        den += float(dense.pow(2).sum())
    return num / den


def _compare(model, x, calibration, held_out, budget, out=lambda y: y, **options):
    """obs + ls against l2 without compensation on held-out batches; plans land and apply exactly."""
    errors, plans = {}, {}
    for importance, compensate in (("l2", False), ("obs", True)):
        plan = graphprune.plan(model, x, importance=importance, calibration=calibration, compensate=compensate,
                               **budget, **options)
        ratio = plan.flops_ratio if "target_flops" in budget else plan.params_ratio
        assert abs(ratio - next(iter(budget.values()))) <= 0.01
        slim, masked = plan.apply(model, example_inputs=x), plan.mask(model)  # apply verifies on x
        for b in held_out[:2]:  # as conftest.applied_error, for outputs that are not tensors
            a, ref = out(run(slim, b)), out(run(masked, b))
            assert float((a - ref).abs().max() / ref.abs().max()) < 1e-4
        errors[importance] = _relative_error(slim, model, held_out, out)
        plans[importance] = plan
    print(f"relative output error vs dense: obs+ls {errors['obs']:.4f}, l2 {errors['l2']:.4f}")
    return errors, plans


@functools.lru_cache(maxsize=1)
def _trained_digits():
    torch.manual_seed(0)
    (x, y), (xt, _) = load_data(0)
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small steps: one thread is many times faster on shared cores
    try:
        for _ in range(60):
            idx = torch.randint(0, len(x), (64,))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), x, xt


def test_obs_with_compensation_beats_l2_on_a_cnn():
    model, x, xt = _trained_digits()
    calibration = [x[i:i + 64] for i in range(0, 512, 64)]
    held_out = [xt[i:i + 64] for i in range(0, len(xt), 64)]
    errors, _ = _compare(model, x[:8], calibration, held_out, {"target_flops": 0.5})
    assert errors["obs"] < errors["l2"]
    slim = graphprune.prune(model, x[:8], 0.5, importance="obs", calibration=calibration, compensate=True)
    assert applied_error(slim.graphprune_plan, model, x[:8], held_out[0], slim=slim) < 1e-4


@pytest.mark.filterwarnings("ignore:the pruned model.s Hugging Face config")
def test_obs_with_compensation_beats_l2_on_a_transformer():
    torch.manual_seed(0)
    factory, _ = MODELS["llama"]
    model = factory().eval()

    def ids():
        return {"input_ids": torch.randint(0, 512, (1, 32))}

    calibration, held_out = [ids() for _ in range(24)], [ids() for _ in range(6)]
    errors, plans = _compare(model, held_out[0], calibration, held_out, {"target_params": 0.6}, out=lambda y: y[0])
    assert errors["obs"] < errors["l2"]
    assert any(name.endswith("o_proj.weight") for name in plans["obs"].removed)  # whole heads: the block form


def test_obs_on_an_onnx_file(tmp_path):
    import graphprune.onnx as gonnx

    model, x, _ = _trained_digits()
    src = export_onnx(model, x[:1], tmp_path / "m.onnx")
    batches = [{"input_0": x[i:i + 1].numpy()} for i in range(32)]
    plan = gonnx.prune(src, tmp_path / "obs.onnx", 0.5, importance="obs", calibration=batches, round_to=1)
    assert abs(plan.flops_ratio - 0.5) <= 0.01
    assert plan.removed != gonnx.plan(src, 0.5, round_to=1).removed
    with pytest.raises(graphprune.UsageError, match="calibration"):
        gonnx.plan(src, 0.5, importance="obs")


def test_obs_needs_calibration():
    with pytest.raises(graphprune.UsageError, match="calibration"):
        graphprune.plan(DigitsNet().eval(), torch.rand(8, 1, 8, 8), 0.5, importance="obs")


def test_greedy_obs_takes_each_next_component_given_the_ones_gone(monkeypatch):
    """compensate="obs" re-chooses a layer's removed components one at a time (ZipLM's order): one component is
    the best single one, and for more it leaves no more error than the one-shot ranking (here far less: the inputs
    are correlated, and once one of a correlated pair is gone the other is no longer cheap), checked against the
    real least-squares error of each set."""
    import itertools

    from graphprune.passes.reselect import greedy_obs

    monkeypatch.setattr(cal, "RIDGE", 1e-9)
    x, tensors, reader, an = _linear_reader()
    n = len(an.prunable)

    def error(comps):
        gone = np.zeros(n, dtype=bool)
        gone[list(comps)] = True
        updates, _ = cal.compensate([reader], an, gone, tensors, "ls")
        kept = torch.from_numpy(~gone[reader.columns])
        w, b = tensors["fc.weight"].double(), tensors["fc.bias"].double()
        slim = x.double()[:, kept] @ updates["fc.weight"].double()[:, kept].T + updates["fc.bias"].double()
        return float((slim - (x.double() @ w.T + b)).pow(2).sum(1).mean())

    one_shot = np.argsort(cal.CalibratedImportance("obs", [reader])(an, tensors))
    gains = []
    for k in (1, 2, 3, 4):
        theta, _ = cal._ridge_precision(reader)
        greedy = greedy_obs(theta, cal._weight_columns(tensors, reader).clone(),
                            [reader.columns == c for c in range(n)], k)
        assert len(set(greedy)) == k
        if k == 1:
            assert error(greedy) == pytest.approx(min(error([c]) for c in range(n)))
        assert error(greedy) <= error(one_shot[:k]) * (1 + 1e-9)
        assert error(greedy) >= min(error(s) for s in itertools.combinations(range(n), k)) * (1 - 1e-9)
        gains.append(error(one_shot[:k]) / error(greedy))
    assert max(gains) > 1.5


def test_compensate_obs_keeps_the_widths_and_applies_exactly():
    """On a LLaMA: the same widths as compensate="ls" (the selection's counts), other channels in some layers,
    and a slim model equal to its masked one."""
    from .test_calibration import _llama

    factory, model, inputs, calibration = _llama()
    x = inputs()
    options = dict(target_params=0.6, importance="flap", calibration=calibration, uniform=True)
    ls = graphprune.plan(model, x, compensate="ls", **options)
    obs = graphprune.plan(model, x, compensate="obs", **options)
    widths = lambda plan: {n: {a: len(i) for a, i in axes.items()} for n, axes in plan.removed.items()}  # noqa: E731
    assert widths(obs) == widths(ls) and obs.removed != ls.removed
    assert obs.params == ls.params and any("greedily by structured OBS" in n for n in obs.notes)
    slim = obs.apply(model)  # verified
    assert torch.allclose(run(slim, x)[0], run(obs.mask(model), x)[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="compensate must be"):
        graphprune.plan(model, x, compensate="sparsegpt", **options)


def test_search_with_obs_measures_the_members_obs_removes():
    """allocation="search" with compensate="obs": each candidate width is measured with the components the greedy
    order removes at that width, so the re-choice after the selection changes nothing."""
    from .test_calibration import _llama

    factory, model, inputs, calibration = _llama()
    x = inputs()
    options = dict(target_params=0.7, importance="flap", calibration=calibration, allocation="search")
    obs = graphprune.plan(model, x, compensate="obs", **options)
    assert any("(0 differ from the selection's" in n for n in obs.notes), obs.notes
    assert obs.removed != graphprune.plan(model, x, compensate="ls", **options).removed
    slim = obs.apply(model)  # verified
    assert torch.allclose(run(slim, x)[0], run(obs.mask(model), x)[0], rtol=1e-4, atol=1e-5)


def test_greedy_obs_drops_removed_columns_without_changing_the_order(monkeypatch):
    """The one-column path drops removed columns from theta and w every COMPACT steps: the same order as with the
    full matrices throughout (columns of very different scales, so no near-ties decide it)."""
    from graphprune.passes import reselect

    g = torch.Generator().manual_seed(0)
    n = 96
    mix = torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64)
    x = torch.randn(2000, n, generator=g, dtype=torch.float64) @ mix
    theta = torch.linalg.inv(x.T @ x / len(x) + 1e-3 * torch.eye(n, dtype=torch.float64))
    w = torch.randn(40, n, generator=g, dtype=torch.float64) * torch.logspace(0, 3, n, dtype=torch.float64)[
        torch.randperm(n, generator=g)]
    orders = []
    for compact in (5, 10**9):
        monkeypatch.setattr(reselect, "COMPACT", compact)
        orders.append(reselect.greedy_obs(theta.clone(), w.clone(), [np.arange(n) == c for c in range(n)], 90))
    assert orders[0] == orders[1] and len(set(orders[0])) == 90
