"""Every model graphprune returns works or graphprune raises: plan.apply verifies by default, falls back to a
regenerated graph whose batch and sequence sizes follow its inputs, rejects NaN, and touches the user's object
only once verified."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune
from graphprune.verify import compare_outputs

from .conftest import run, same_state, state_copy


class SplitNet(nn.Module):
    """A residual CNN that splits its channels with literal sizes: forward code the slim module cannot follow."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2, self.c3 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c4 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        a, b = torch.split(h, [8, 8], dim=1)
        h = torch.cat([self.c2(a), self.c3(b)], 1) + h
        return self.fc(torch.relu(self.c4(h)).mean((2, 3)))


class FlatNet(nn.Module):
    """LeNet-style: a flatten written as a constant, after a one-channel-per-group GroupNorm."""

    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(1, 6, 5), nn.GroupNorm(6, 6)
        self.c2 = nn.Conv2d(6, 16, 5)
        self.f1, self.f2 = nn.Linear(16 * 5 * 5, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.n1(self.c1(x))), 2)
        x = F.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.f2(torch.relu(self.f1(x.view(-1, 16 * 5 * 5))))


class TinyLM(nn.Module):
    """Token ids in, logits out; attention written with a literal head count, positions sliced to the length."""

    def __init__(self, vocab=50, dim=32, heads=4):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, dim), nn.Parameter(torch.randn(64, dim) * 0.1)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 64), nn.Linear(64, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, use_cache: bool = True):
        b, s = input_ids.shape
        x = self.emb(input_ids) + self.pos[:s]
        q, k, v = self.qkv(x).view(b, s, 3, 4, 8).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, 32)
        x = x + self.out(a)
        x = x + self.down(F.gelu(self.up(x)))
        return self.head(x)


class RMSNet(nn.Module):
    """An RMS norm over a prunable hidden size, then a view with a literal group count: the fallback must keep
    the norm's mean over the original width."""

    def __init__(self):
        super().__init__()
        self.emb, self.weight = nn.Embedding(50, 32), nn.Parameter(torch.rand(32) + 0.5)
        self.up, self.head = nn.Linear(32, 64), nn.Linear(64, 50)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        b, s, _ = x.shape
        h = torch.relu(self.up(x).view(b, s, 4, 16)).reshape(b, s, 64)
        return self.head(h)


def expected(plan, model, x):
    return run(plan.mask(model), x)


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_apply_verifies_and_falls_back_where_the_module_cannot_follow():
    model, x = SplitNet().eval(), torch.randn(1, 3, 16, 16)
    plan = graphprune.plan(model, x, target_flops=0.6, importance="random")
    with pytest.raises(RuntimeError, match="split_with_sizes"):
        run(plan.apply(model, verify=False), x)  # the module's own split cannot follow...
    slim = plan.apply(model)  # ...so the verified apply hands back the regenerated graph
    assert isinstance(slim, torch.fx.GraphModule)
    assert "it runs at any batch size" in plan.summary()
    for batch in (1, 4, 8):  # recorded at batch 1, used at others
        xb = torch.randn(batch, 3, 16, 16)
        assert rel(run(slim, xb), expected(plan, model, xb)) <= 1e-5


def test_flatten_constant_and_group_norm_fallback_runs_at_other_batch_sizes():
    model, x = FlatNet().eval(), torch.randn(2, 1, 32, 32)
    slim = graphprune.prune(model, x, target_flops=0.3)
    plan = slim.graphprune_plan
    assert "n1.weight" in plan.removed  # GroupNorm(6, 6) lost channels
    assert 0 in plan.removed["c2.weight"]  # the flattened conv too, which view(-1, 400) cannot follow
    assert isinstance(slim, torch.fx.GraphModule)
    for batch in (1, 3, 8):
        xb = torch.randn(batch, 1, 32, 32)
        assert rel(run(slim, xb), expected(plan, model, xb)) <= 1e-5


def test_group_norm_one_channel_per_group_slims_the_module_itself():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(8, 8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(2, 3, 12, 12)
    slim = graphprune.prune(model, x, target_flops=0.6)
    assert isinstance(slim, nn.Sequential) and slim[1].num_groups == slim[1].num_channels == slim[0].out_channels < 8


def test_language_model_fallback_follows_batch_and_sequence_length():
    torch.manual_seed(0)
    model = TinyLM().eval()
    ids = torch.randint(0, 50, (2, 12))
    slim = graphprune.prune(model, {"input_ids": ids, "use_cache": False}, target_flops=0.6)
    plan = slim.graphprune_plan
    assert isinstance(slim, torch.fx.GraphModule)
    assert "batch size and sequence length" in plan.summary()
    for shape in ((1, 12), (3, 7), (2, 30)):
        other = {"input_ids": torch.randint(0, 50, shape), "use_cache": False}
        assert rel(run(slim, other), expected(plan, model, other)) <= 1e-5


def test_rms_norm_in_the_regenerated_graph_is_exact():
    torch.manual_seed(0)
    model, ids = RMSNet().eval(), torch.randint(0, 50, (2, 9))
    plan = graphprune.plan(model, ids, target_flops=0.5, importance="random")
    assert 1 in plan.removed["emb.weight"] and 0 in plan.removed["up.weight"]  # hidden size and groups go
    slim = plan.apply(model)
    assert isinstance(slim, torch.fx.GraphModule)
    other = torch.randint(0, 50, (3, 5))
    assert rel(run(slim, other), expected(plan, model, other)) <= 1e-5


def test_loaded_plan_verifies_on_recorded_shapes_and_falls_back(tmp_path):
    model, x = FlatNet().eval(), torch.randn(2, 1, 32, 32)
    graphprune.plan(model, x, target_flops=0.3).save(tmp_path / "plan.json")
    plan = graphprune.PruningPlan.load(tmp_path / "plan.json")
    assert plan.inputs[0]["shape"] == [2, 1, 32, 32]
    slim = plan.apply(model)  # no analysis in memory: recorded again on random inputs of the recorded shape
    assert isinstance(slim, torch.fx.GraphModule)
    xb = torch.randn(5, 1, 32, 32)
    assert rel(run(slim, xb), expected(plan, model, xb)) <= 1e-5


def test_inplace_changes_the_users_object_only_once_verified():
    model, x = FlatNet().eval(), torch.randn(2, 1, 32, 32)
    before, snapshot = state_copy(model), _snapshot(model)
    slim = graphprune.prune(model, x, target_flops=0.3, inplace=True)
    assert isinstance(slim, torch.fx.GraphModule)  # the fallback: the user's module stays as it was
    assert same_state(before, state_copy(model)) and model.c1.out_channels == 6 and _unchanged(model, snapshot)
    chain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    assert graphprune.prune(chain, torch.randn(1, 3, 8, 8), target_flops=0.6, inplace=True) is chain
    assert chain[0].out_channels < 8


class NaNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x))) * float("nan")


def test_nan_outputs_never_verify():
    model, x = NaNNet().eval(), torch.randn(1, 3, 10, 10)
    with pytest.raises(graphprune.BackendError, match="NaN"):
        graphprune.prune(model, x, target_flops=0.6)


def test_compare_outputs_rules():
    a = np.ones((2, 3), dtype=np.float32)
    assert compare_outputs([a], [a.copy()]) is None
    assert "shape" in compare_outputs([a[:1]], [a])
    b = a.copy()
    b[0, 0] = np.inf
    assert "not finite" in compare_outputs([a], [b])
    assert "differs" in compare_outputs([a * 1.001], [a])
    assert compare_outputs([a * 1.001], [a], dtypes=["torch.float16"]) is None  # half precision rounds more
    assert compare_outputs([a * 2], [a], lossy=True) is None
    assert "NaN everywhere" in compare_outputs([a * np.nan], [a * np.nan])
    assert "integers" in compare_outputs([np.array([1, 37, 8, 8])], [np.array([1, 48, 8, 8])])


class WidthLookup(nn.Module):
    """Forward code that breaks on a new width with an error no shape mismatch raises."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        if h.shape[1] != 8:
            raise ZeroDivisionError("not a shape error")
        return self.c2(h)


def test_errors_that_are_not_shape_mismatches_are_not_hidden_by_the_fallback():
    model, x = WidthLookup().eval(), torch.randn(1, 3, 10, 10)
    with pytest.raises(graphprune.BackendError, match="ZeroDivisionError"):
        graphprune.prune(model, x, target_flops=0.6)


def test_hf_config_that_cannot_describe_the_widths_refuses_save_pretrained(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 10))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slim = graphprune.prune(model, ids, target_flops=0.6)  # layers keep different widths
    assert any("no longer matches" in str(w.message) for w in caught)
    with pytest.raises(graphprune.UnsupportedModelError, match="graphprune.save"):
        slim.save_pretrained(tmp_path / "slim")
    assert not (tmp_path / "slim").exists()


def test_regenerated_model_saves_and_loads_without_pickled_code(tmp_path):
    model, x = FlatNet().eval(), torch.randn(2, 1, 32, 32)
    slim = graphprune.prune(model, x, target_flops=0.3)
    with torch.no_grad():
        for p in slim.parameters():  # pretend it was fine-tuned
            p.add_(0.01)
    graphprune.save(slim, tmp_path / "slim.pt")
    loaded = graphprune.load(tmp_path / "slim.pt", FlatNet)  # the plan is replayed and verified on a fresh FlatNet
    assert isinstance(loaded, torch.fx.GraphModule)
    xb = torch.randn(4, 1, 32, 32)
    assert torch.allclose(run(loaded, xb), run(slim, xb), atol=1e-6)


class MaskedAttention(nn.Module):
    """SDPA with a tensor attn_mask keyword, and a width written as a constant: regenerated with the keyword."""

    def __init__(self, dim=32, heads=4, n=8):
        super().__init__()
        self.inp, self.qkv, self.proj = nn.Linear(6, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.bias, self.heads, self.out = nn.Parameter(torch.randn(1, heads, n, n)), heads, nn.Linear(dim, 4)

    def forward(self, x):
        h = self.inp(x)
        b, n, c = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias * 2.0)
        return self.out(h + self.proj(a.transpose(1, 2).reshape(b, n, 32)))


class StridedChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 48, 3, padding=1), nn.Conv2d(24, 8, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x))[:, ::2])


@pytest.mark.parametrize("model, x", [(MaskedAttention, torch.randn(1, 8, 6)),
                                      (StridedChannels, torch.randn(1, 3, 8, 8))], ids=["attn-mask", "strided"])
def test_regenerated_graph_keeps_keyword_tensors_and_strided_channel_slices(model, x):
    torch.manual_seed(0)
    model = model().eval()
    slim = graphprune.prune(model, x, target_flops=0.6)
    assert isinstance(slim, torch.fx.GraphModule)
    plan = slim.graphprune_plan
    other = torch.randn(3, *x.shape[1:])
    with torch.enable_grad():  # outside no_grad attention may return other strides than where it was recorded
        assert rel(run(slim, other), expected(plan, model, other)) <= 1e-5
        assert rel(slim(x), plan.mask(model)(x)) <= 1e-5


def test_positions_from_arange_keep_their_channels():
    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 4, 3)

        def forward(self, x):
            h = torch.relu(self.c1(x))
            return self.c2(h * torch.arange(h.shape[1], dtype=h.dtype).view(1, -1, 1, 1))

    model = Positions().eval()
    with pytest.raises(graphprune.BudgetError):
        graphprune.plan(model, torch.randn(1, 3, 8, 8), target_flops=0.6)
    assert "arange holds positions" in graphprune.plan(model, torch.randn(1, 3, 8, 8), target_flops=1.0).explain()


class MixFFN(nn.Module):
    """pvt_v2 / Segformer style: a linear layer reads a transposed conv output, which records other ops at batch 1
    than at batch 2; the width of the reshape is a constant."""

    def __init__(self):
        super().__init__()
        self.fc1, self.dw, self.fc2 = nn.Linear(32, 64), nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.Linear(64, 32)

    def forward(self, x):
        h = self.fc1(x).transpose(1, 2).reshape(x.shape[0], 64, 4, 4)
        return x + self.fc2(F.gelu(self.dw(h).flatten(2).transpose(1, 2)))


def test_batch_one_recording_that_decomposes_otherwise_is_recorded_again_at_batch_two():
    torch.manual_seed(0)
    model, x = MixFFN().eval(), torch.randn(1, 16, 32)
    slim = graphprune.prune(model, x, target_flops=0.6)
    note = slim.graphprune_plan.notes[-1]
    assert "it runs at any batch size" in note and "recorded again at batch 2" in note
    for batch in (1, 3):
        other = torch.randn(batch, 16, 32)
        assert rel(run(slim, other), expected(slim.graphprune_plan, model, other)) <= 1e-5


# ----- verification masks the user's model in place, for one run, and restores it bit-identically -----------

class BiasFreeMLP(nn.Module):
    """Bias-free linear layers and a running-statistics buffer: compensation adds a bias to `down`, and the
    forward updates a buffer that must come back as it was."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 48, bias=False), nn.Linear(48, 16, bias=False)
        self.head = nn.Linear(16, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.head(self.down(torch.relu(self.up(x))))


def _snapshot(model):
    """Every tensor object with its exact bytes, and what each module holds under `bias`."""
    tensors = {n: (t, t.detach().clone()) for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    biases = {n: ("bias" in m._parameters, m._parameters.get("bias"), "bias" in m.__dict__)
              for n, m in model.named_modules()}
    return tensors, biases


def _unchanged(model, snapshot) -> bool:
    tensors, biases = snapshot
    now = dict(list(model.named_parameters()) + list(model.named_buffers()))
    if now.keys() != tensors.keys():
        return False
    for name, (obj, value) in tensors.items():  # the same objects, bit for bit (NaN-safe: compare bytes)
        if now[name] is not obj or value.dtype != now[name].dtype or value.shape != now[name].shape:
            return False
        if value.numel() and value.reshape(-1).view(torch.uint8).ne(now[name].detach().reshape(-1).view(torch.uint8)).any():
            return False
    return biases == {n: ("bias" in m._parameters, m._parameters.get("bias"), "bias" in m.__dict__)
                      for n, m in model.named_modules()}


def test_verification_leaves_the_users_model_bit_identical_with_compensation():
    model, x = BiasFreeMLP().eval(), torch.randn(8, 16)
    calibration = [torch.randn(32, 16) for _ in range(3)]
    plan = graphprune.plan(model, x, target_params=0.7, importance="flap", calibration=calibration,
                           compensate=True)
    assert plan.added and plan.updates  # a bias added, weights rewritten: all swapped in for the masked run
    snapshot = _snapshot(model)
    slim = plan.apply(model)
    assert _unchanged(model, snapshot) and model.down.bias is None
    assert slim.down.bias is not None and slim.up.out_features < 48
    assert rel(run(slim, x), expected(plan, model, x)) <= 1e-5
    assert _unchanged(model, snapshot)


def test_masked_in_place_restores_the_model_when_the_run_raises():
    from graphprune.backends.torch import masked_in_place

    model, x = BiasFreeMLP().eval(), torch.randn(8, 16)
    plan = graphprune.plan(model, x, target_params=0.7, importance="flap",
                           calibration=[torch.randn(32, 16) for _ in range(2)], compensate=True)
    want = expected(plan, model, x)  # plan.mask: a masked copy
    snapshot = _snapshot(model)
    with pytest.raises(ZeroDivisionError):
        with masked_in_place(plan, model):
            assert model.down.bias is not None  # the masked reference, in place
            assert torch.equal(run(model, x), want)
            raise ZeroDivisionError("raised inside the masked run")
    assert _unchanged(model, snapshot)


def test_users_model_is_bit_identical_when_the_slim_model_raises():
    model, x = WidthLookup().eval(), torch.randn(1, 3, 10, 10)
    snapshot = _snapshot(model)
    with pytest.raises(graphprune.BackendError, match="ZeroDivisionError"):
        graphprune.prune(model, x, target_flops=0.6)
    assert _unchanged(model, snapshot)
    with pytest.raises(graphprune.BackendError, match="ZeroDivisionError"):  # in place: raised too, and undone
        graphprune.prune(model, x, target_flops=0.6, inplace=True)
    assert _unchanged(model, snapshot)
    calibrated = BiasFreeMLP().eval()
    plan = graphprune.plan(calibrated, torch.randn(8, 16), target_params=0.7, importance="flap",
                           calibration=[torch.randn(32, 16)], compensate=True)
    snapshot = _snapshot(calibrated)
    plan._example_inputs = torch.randn(8, 17)  # the masked run itself raises (wrong width)
    with pytest.raises(RuntimeError):
        plan.apply(calibrated)
    assert _unchanged(calibrated, snapshot)


def test_inplace_really_slims_the_users_object_in_place():
    model, x = BiasFreeMLP().eval(), torch.randn(8, 16)
    plan = graphprune.plan(model, x, target_params=0.7, importance="flap",
                           calibration=[torch.randn(32, 16) for _ in range(2)], compensate=True)
    want = expected(plan, model, x)
    up, down = model.up, model.down
    slim = plan.apply(model, inplace=True)
    assert slim is model and model.up is up and model.down is down  # the same module objects, slimmed
    assert up.weight.shape[0] == up.out_features < 48 and down.weight.shape[1] == down.in_features < 48
    assert down.bias is not None and down.bias.shape == (down.out_features,)
    assert rel(run(model, x), want) <= 1e-5


def test_apply_copy_shares_no_memory_with_the_model_or_the_plan():
    model, x = BiasFreeMLP().eval(), torch.randn(8, 16)
    plan = graphprune.plan(model, x, target_params=0.7, importance="flap",
                           calibration=[torch.randn(32, 16) for _ in range(2)], compensate=True)
    slim = plan.apply(model)
    theirs = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    theirs |= {t.untyped_storage().data_ptr() for t in plan.updates.values()}
    assert not theirs & {t.untyped_storage().data_ptr() for t in list(slim.parameters()) + list(slim.buffers())}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rounding_is_told_from_a_wrong_model_by_a_wider_run(monkeypatch, dtype):
    """Through many layers the slim and masked models drift apart by rounding (a 1.6 B LLaMA in bf16: 2.3% of the
    largest logit; SmolLM2-135M in float32: 1.3e-4 of it, over the float32 tolerance); verification then runs the
    same weights in the wider type (float32, float64), which a correct slim model matches and a wrong one does not.
    The tolerances are set to zero here so that any rounding takes that path."""
    from graphprune.verify import _check_widened

    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=6,
                                      num_attention_heads=8, num_key_value_heads=4, vocab_size=100)
    model = transformers.LlamaForCausalLM(config).eval().to(dtype)
    ids = torch.randint(0, 100, (8, 64))
    # settings at which the slim model's outputs round differently from the masked one's on any CPU: in bfloat16 a
    # halved hidden size, whose RMS norms are rescaled by sqrt(2) and rounded (narrower MLPs alone match bit for
    # bit on some CPUs); in float32 narrower MLPs, whose sums are ordered differently (a halved hidden size there
    # differs in float64 too: Hugging Face's RMS norm computes in float32 whatever the weights' type)
    options = dict(target_params=0.8, importance="flap", uniform=True, round_to=8)
    if dtype == torch.bfloat16:
        options = dict(target_params=0.5)
    options.update(compensate=True, calibration=[{"input_ids": b} for b in ids.split(4)])
    monkeypatch.setattr(graphprune.verify, "_HALF_TOLERANCE", 0.0)
    monkeypatch.setattr(graphprune.verify, "_TOLERANCE", 0.0)
    snapshot = _snapshot(model)
    slim = graphprune.prune(model, {"input_ids": ids[:1]}, **options)
    assert any("wider float type" in note for note in slim.graphprune_plan.notes)  # the narrow type alone differed
    assert slim.model.norm.weight.shape[0] == (64 if dtype == torch.bfloat16 else 128)
    assert _unchanged(model, snapshot) and slim.model.layers[0].mlp.down_proj.weight.dtype == dtype

    plan = slim.graphprune_plan
    with torch.no_grad():
        slim.model.layers[1].mlp.down_proj.weight[:, 0] += 0.05  # one wrong column
    problem = _check_widened(plan, model, slim, {"input_ids": ids[:1]}, "differs")
    assert problem is not None and "differs" in problem
    assert _unchanged(model, snapshot) and slim.model.layers[1].mlp.down_proj.weight.dtype == dtype


X_IMAGE = torch.randn(2, 3, 32, 32)


def _tiny_llama(dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=4, vocab_size=100)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval().to(dtype), torch.randint(0, 100, (2, 16))


def test_undo_of_an_in_place_apply_brings_a_language_model_back_bit_identical():
    """What inplace=True verification relies on when the check fails: every change apply_plan makes (sliced
    hidden size, heads, MLP channels; RMS norms rescaled; compensation written and biases added; the config
    synced or save_pretrained refused) is taken back, as the same objects."""
    from graphprune.backends.torch import Undo, apply_plan

    transformers = pytest.importorskip("transformers")
    model, ids = _tiny_llama()
    inputs, calibration = {"input_ids": ids}, [{"input_ids": ids}]
    before = run(model, inputs).logits
    attention = model.model.layers[0].self_attn
    for options in (dict(target_params=0.6), dict(target_params=0.6, uniform=True),
                    dict(target_params=0.5, importance="flap", compensate=True, calibration=calibration)):
        plan = graphprune.plan(model, inputs, **options)
        snapshot, config = _snapshot(model), model.config.to_dict()
        attributes = {n: dict(vars(m)) for n, m in model.named_modules()}
        undo = Undo(model)
        apply_plan(plan, model, inplace=True, undo=undo)
        assert model.model.layers[0].mlp.up_proj.weight.shape[0] < 128 and not _unchanged(model, snapshot)
        assert plan.rewrites or model.model.layers[0].mlp.down_proj.bias is not None
        undo.restore()
        assert _unchanged(model, snapshot) and model.config.to_dict() == config
        assert {n: dict(vars(m)) for n, m in model.named_modules()} == attributes
        assert "save_pretrained" not in vars(model) and model.model.layers[0].self_attn is attention
        assert torch.equal(run(model, inputs).logits, before)
    clip = transformers.CLIPModel(transformers.CLIPConfig(  # sub-configs are objects its submodules hold
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=100, max_position_embeddings=32),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8), projection_dim=32)).eval()
    pair = {"input_ids": torch.randint(1, 100, (2, 8)), "pixel_values": torch.randn(2, 3, 32, 32)}
    plan, snapshot = graphprune.plan(clip, pair, target_flops=0.5), _snapshot(clip)
    undo = Undo(clip)
    apply_plan(plan, clip, inplace=True, undo=undo)
    undo.restore()
    assert _unchanged(clip, snapshot) and clip.config.text_config is clip.text_model.config
    assert clip.config.vision_config is clip.vision_model.config
    import torchvision

    cnn, x = torchvision.models.resnet18(num_classes=10).eval().to(memory_format=torch.channels_last), X_IMAGE
    plan, snapshot = graphprune.plan(cnn, x, target_flops=0.5), _snapshot(cnn)
    undo = Undo(cnn)
    apply_plan(plan, cnn, inplace=True, undo=undo)
    assert cnn.layer1[0].conv1.out_channels < 64
    undo.restore()
    assert _unchanged(cnn, snapshot) and cnn.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_inplace_verifies_the_users_model_itself_without_a_copy(monkeypatch):
    """inplace=True slims the model object and checks it, never copying it: also when bf16 misses its tolerance
    (zero here) and the float32 check needs the original model back for its reference."""
    import graphprune.backends.torch as torch_backend

    model, ids = _tiny_llama(torch.bfloat16)
    plan = graphprune.plan(model, {"input_ids": ids}, target_params=0.6)
    floats = plan.mask(model).float()
    want = run(floats, {"input_ids": ids}).logits
    layer = model.model.layers[1]

    def no_copy(*_args, **_kwargs):
        raise AssertionError("the model was copied")

    monkeypatch.setattr(torch_backend, "_copy", no_copy)
    monkeypatch.setattr(graphprune.verify, "_HALF_TOLERANCE", 0.0)
    slim = plan.apply(model, inplace=True)
    assert slim is model and model.model.layers[1] is layer and layer.mlp.up_proj.weight.dtype == torch.bfloat16
    assert layer.mlp.up_proj.out_features < 128 and any("wider float type" in note for note in plan.notes)
    assert rel(run(model.float(), {"input_ids": ids}).logits, want) <= 2e-2


def test_regenerated_graph_carries_the_biases_compensation_added(monkeypatch):
    """When the slim module fails its check, the GraphModule fallback is recorded again from the masked model,
    so the biases compensation added (LLaMA's layers have none) are in it."""
    model, ids = _tiny_llama()
    calibration = [{"input_ids": c} for c in torch.randint(0, 100, (4, 16)).split(2)]
    plan = graphprune.plan(model, {"input_ids": ids}, target_params=0.7, importance="flap", compensate=True,
                           calibration=calibration)
    assert plan.added
    real, calls = graphprune.verify.check, []

    def first_fails(*args, **kwargs):
        calls.append(1)
        return "forced mismatch" if len(calls) <= 2 else real(*args, **kwargs)  # the check and its float64 rerun

    monkeypatch.setattr(graphprune.verify, "check", first_fails)
    slim = plan.apply(model)
    assert isinstance(slim, torch.fx.GraphModule)
    for x in ({"input_ids": ids}, {"input_ids": torch.randint(0, 100, (3, 11))}):  # also another batch / length
        want = graphprune.verify.outputs(plan.mask(model), x)[0]
        assert rel(graphprune.verify.outputs(slim, x)[0], want) <= 1e-5


class ExpandedBuffer(nn.Module):
    """A buffer made with expand() (stride 0): no in-place op can write it, nor copy values back into it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 10)
        self.register_buffer("pos", torch.arange(16.0).expand(4, 16), persistent=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x + self.pos[0])))


def test_expanded_buffers_are_left_alone_by_the_masked_run_and_the_undo():
    model, x = ExpandedBuffer().eval(), torch.randn(2, 16)
    plan = graphprune.plan(model, x, target_flops=0.5)
    want = expected(plan, model, x)
    assert rel(run(graphprune.prune(model, x, target_flops=0.5), x), want) <= 1e-5
    slim = graphprune.prune(model, x, target_flops=0.5, inplace=True)
    assert slim is model and model.a.out_features < 64 and rel(run(model, x), want) <= 1e-5
