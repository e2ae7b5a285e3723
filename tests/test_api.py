"""Public API on real torchvision models: plan / apply / mask / summary / save / load, FLOP counting,
budgets, options, and bad input (clear errors, user's model unchanged)."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import graphprune

from .conftest import oracle_error, run, same_state, state_copy

X = torch.randn(1, 3, 64, 64)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def test_prune_meets_target_and_leaves_model_alone(resnet):
    before = state_copy(resnet)
    slim = graphprune.prune(resnet, X, target_flops=0.5)
    assert same_state(before, state_copy(resnet))
    assert abs(graphprune.count_flops(slim, X) / graphprune.count_flops(resnet, X) - 0.5) <= 0.01
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in resnet.parameters())
    assert type(slim) is type(resnet) and run(slim, X).shape == (1, 1000)


def test_plan_summary_explain_and_oracle(resnet):
    plan = graphprune.plan(resnet, X, target_flops=0.6, importance="l1")
    text = plan.summary()
    assert "layer1.0.conv1" in text and "FLOPs:" in text and "params:" in text
    assert abs(plan.flops_ratio - 0.6) <= 0.01
    assert "graph output" in plan.explain()  # fc rows stay: the classifier output is never pruned
    assert oracle_error(plan, resnet, X) <= 1e-5


def test_plan_json_round_trip(tmp_path, resnet):
    plan = graphprune.plan(resnet, X, target_flops=0.5)
    path = tmp_path / "plan.json"
    plan.save(path)
    again = graphprune.PruningPlan.load(path)
    assert again.removed == plan.removed and again.flops == plan.flops
    assert json.loads(path.read_text())["format"] == "graphprune-plan/1"
    a, b = run(plan.apply(resnet), X), run(again.apply(resnet), X)
    assert torch.equal(a, b)


def test_save_load_without_pickled_code(tmp_path, resnet):
    slim = graphprune.prune(resnet, X, target_flops=0.5)
    with torch.no_grad():
        for p in slim.parameters():  # pretend it was fine-tuned
            p.add_(0.01)
    graphprune.save(slim, tmp_path / "slim.pt")
    loaded = graphprune.load(tmp_path / "slim.pt", torchvision.models.resnet18)
    assert torch.allclose(run(loaded, X), run(slim, X), atol=1e-6)
    with pytest.raises(graphprune.GraphPruneError, match="different model"):
        graphprune.load(tmp_path / "slim.pt", torchvision.models.resnet34)


def test_inplace_prunes_the_given_object():
    model = torchvision.models.resnet18().eval()
    slim = graphprune.prune(model, X, target_flops=0.7, inplace=True)
    assert slim is model and model.conv1.out_channels < 64


def test_target_params_budget(resnet):
    plan = graphprune.plan(resnet, X, target_params=0.5)
    assert abs(plan.params_ratio - 0.5) <= 0.01


def test_ignore_keeps_layers_whole(resnet):
    plan = graphprune.plan(resnet, X, target_flops=0.6, ignore=[resnet.layer1, "conv1"])
    assert not any(n.startswith(("layer1.", "conv1.")) for n in plan.removed)


def test_custom_importance_object(resnet):
    calls = []

    def by_index(an, tensors):
        calls.append(len(tensors))
        import numpy as np
        return np.arange(an.component.max() + 1, dtype=float)

    plan = graphprune.plan(resnet, X, target_flops=0.7, importance=by_index)
    assert calls and abs(plan.flops_ratio - 0.7) <= 0.01


def test_unreachable_target_names_the_smallest_ratio(resnet):
    with pytest.raises(graphprune.BudgetError) as err:
        graphprune.plan(resnet, X, target_flops=0.01, max_ratio=0.5)
    assert err.value.reachable is not None and 0.01 < err.value.reachable < 1
    assert f"{err.value.reachable:.3f}" in str(err.value)


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, "half", True])
def test_bad_target(resnet, bad):
    before = state_copy(resnet)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        graphprune.plan(resnet, X, target_flops=bad)
    assert same_state(before, state_copy(resnet))


def test_bad_inputs_give_clear_errors_and_leave_the_model_alone(resnet):
    before = state_copy(resnet)
    training = resnet.training
    with pytest.raises(graphprune.TraceError, match="example_inputs"):
        graphprune.plan(resnet, torch.randn(1, 5, 64, 64), target_flops=0.5)  # wrong channel count
    with pytest.raises(graphprune.TraceError, match="no tensor"):
        graphprune.plan(resnet, "not a tensor", target_flops=0.5)
    with pytest.raises(graphprune.GraphPruneError, match="torch.nn.Module"):
        graphprune.plan(lambda x: x, X, target_flops=0.5)
    with pytest.raises(ValueError, match="names no module"):
        graphprune.plan(resnet, X, target_flops=0.5, ignore=["layer9"])
    with pytest.raises(ValueError, match="unknown importance"):
        graphprune.plan(resnet, X, target_flops=0.5, importance="hessian-magic")
    with pytest.raises(ValueError, match="exactly one budget"):
        graphprune.plan(resnet, X)
    assert same_state(before, state_copy(resnet)) and resnet.training == training


def test_training_model_is_traced_in_eval_and_restored():
    model = torchvision.models.resnet18().train()
    before = state_copy(model)  # BN running stats must not move
    graphprune.plan(model, X, target_flops=0.5)
    assert model.training and model.layer1[0].bn1.training
    assert same_state(before, state_copy(model))


def _reference_flops(model, x) -> int:
    """FlopCounterMode, with formulas it lacks on the CPU registered (SDPA for CPU, native MHA)."""

    def cpu_sdpa(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    def native_mha(q, k, v, embed_dim, num_heads, *args, out_shape=None, **kwargs):
        b, lq, e = q
        lk = k[1]
        proj = 2 * b * lq * e * e + 2 * 2 * b * lk * e * e + 2 * b * lq * e * e
        return proj + 2 * 2 * b * lq * lk * e

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa,
               torch.ops.aten._native_multi_head_attention: native_mha}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("name,size", [("resnet50", 64), ("densenet121", 64), ("mobilenet_v3_small", 64),
                                       ("regnet_y_400mf", 64), ("convnext_tiny", 64), ("vit_b_32", 224),
                                       ("swin_t", 224), ("maxvit_t", 224)])
def test_count_flops_matches_flop_counter_mode(name, size):
    model = torchvision.models.get_model(name)
    x = torch.randn(1, 3, size, size)
    ours, ref = graphprune.count_flops(model, x), _reference_flops(model, x)
    assert abs(ours - ref) / ref <= 0.01, (ours, ref)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_export_tracer_gives_the_same_plan(name):
    model = torchvision.models.get_model(name).eval()
    by_dispatch = graphprune.plan(model, X, target_flops=0.5)
    by_export = graphprune.plan(model, X, target_flops=0.5, tracer="export")
    assert by_export.flops["before"] == by_dispatch.flops["before"]
    assert by_export.removed == by_dispatch.removed
    assert oracle_error(by_export, model, X) <= 1e-5
    with pytest.raises(ValueError, match="unknown tracer"):
        graphprune.plan(model, X, target_flops=0.5, tracer="fx")


def test_forward_that_updates_buffers_leaves_the_model_unchanged():
    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.out = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 2, 1)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return self.out(torch.relu(self.conv(x)))

    model = Counting()
    before = state_copy(model)
    plan = graphprune.plan(model, X, target_flops=0.5)
    assert same_state(before, state_copy(model))
    assert abs(plan.flops_ratio - 0.5) <= 0.01


def test_budget_lands_close_when_the_last_unit_is_a_whole_head():
    """Heads ranked low: at 0.9 of the parameters the unit that crosses the budget is a whole KV group (two
    query heads and their key/value head, 0.02 of the model), more than the next 64 MLP channels make up.
    The MLP channels ranked after it then finish the budget instead of the group overshooting it."""
    import numpy as np
    import transformers as T

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                             num_attention_heads=8, num_key_value_heads=4, head_dim=64)).eval()
    x = {"input_ids": torch.randint(0, 64, (1, 16))}

    def heads_low(an, tensors):
        score = np.ones(len(an.prunable))
        for name, v in an.graph.params.items():
            if name.endswith("k_proj.weight"):
                score[an.component[an.elements(v, 0)]] = 1e-6
        return score

    plan = graphprune.plan(model, x, target_params=0.9, importance=heads_low, ignore=["model.embed_tokens"])
    assert 0.89 <= plan.params_ratio <= 0.9
    assert torch.allclose(run(plan.apply(model), x).logits, run(plan.mask(model), x).logits, rtol=1e-4, atol=1e-5)


def test_default_widths_round_to_8_in_wide_layers_and_stay_exact_in_narrow_ones(resnet):
    slim = graphprune.plan(resnet, X, target_flops=0.5).apply(resnet, verify=False)
    convs = [(m, o) for m, o in zip(slim.modules(), resnet.modules()) if isinstance(m, torch.nn.Conv2d)]
    assert any(m.out_channels < o.out_channels for m, o in convs)
    assert all(m.out_channels % 8 == 0 for m, o in convs)  # resnet18's layers are all 64 channels or more
    exact = graphprune.plan(resnet, X, target_flops=0.5, round_to=None).apply(resnet, verify=False)
    assert any(m.out_channels % 8 for m in exact.modules() if isinstance(m, torch.nn.Conv2d))
    narrow = torch.nn.Sequential(torch.nn.Conv2d(3, 12, 3), torch.nn.ReLU(), torch.nn.Conv2d(12, 4, 3)).eval()
    plan = graphprune.plan(narrow, torch.randn(1, 3, 16, 16), target_flops=0.59)
    assert plan.apply(narrow)[0].out_channels == 7  # 7/12 of the FLOPs: narrow layers keep exact widths
    with pytest.raises(graphprune.UsageError, match="round_to"):
        graphprune.plan(resnet, X, target_flops=0.5, round_to="eight")


def test_a_plan_far_under_its_target_says_why(caplog):
    """Whole groups of a grouped convolution are the only units here: the plan cannot land near 0.9 and says so."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 1), torch.nn.ReLU(),
                                torch.nn.Conv2d(64, 64, 3, padding=1, groups=4), torch.nn.ReLU(),
                                torch.nn.Conv2d(64, 8, 1)).eval()
    plan = graphprune.plan(model, torch.randn(1, 3, 8, 8), target_flops=0.9, round_to=None)
    assert plan.flops_ratio < 0.89
    assert any("too coarse" in n for n in plan.notes) and "too coarse" in caplog.text
    close = graphprune.plan(model, torch.randn(1, 3, 8, 8), target_flops=plan.flops_ratio, round_to=None)
    assert not any("too coarse" in n for n in close.notes)
