"""Per-rule tests on tiny models: what each op ties, what it must refuse (pin), and the exactness oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune
from graphprune.analysis.channels import analyze
from graphprune.ir.from_torch import trace

from .conftest import oracle_error, run


def prunable_axis(model, x, name: str, axis: int) -> bool:
    """True if any channel along `axis` of parameter `name` may be removed."""
    graph, _ = trace(model, x)
    an = analyze(graph)
    ids = an.elements(graph.params[name], axis)
    return bool(an.prunable[an.component[ids]].any())


def check_exact(model, x, ratio=0.6, importance="random", **kw):
    plan = graphprune.plan(model, x, target_flops=ratio, importance=importance, **kw)
    assert abs(plan.flops_ratio - ratio) <= 0.01 or plan.flops_ratio <= ratio
    assert plan.removed, "the plan removed nothing"
    assert oracle_error(plan, model, x) <= 1e-5
    return plan


class ConvChain(nn.Module):
    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.c1, self.b1, self.a1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), act()
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.a1(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.head(x.mean((2, 3)))


X = torch.randn(2, 3, 12, 12)


def test_conv_bn_chain_is_exact_and_updates_attributes():
    m = ConvChain()
    plan = check_exact(m, X)
    slim = plan.apply(m)
    assert slim.c1.out_channels == slim.c1.weight.shape[0] < 16
    assert slim.b1.num_features == slim.c1.out_channels
    assert slim.c2.in_channels == slim.c1.out_channels
    assert slim.head.out_features == 5  # the graph output is never pruned


class BufferBias(nn.Module):
    """EVA-style fused bias: a learned part and a zero buffer concatenated, added after a matmul."""

    def __init__(self, persistent: bool):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 12))
        self.b1 = nn.Parameter(torch.randn(8))
        self.register_buffer("b2", torch.zeros(8), persistent=persistent)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.relu(F.linear(x, self.w, torch.cat([self.b1, self.b2]))))


@pytest.mark.parametrize("persistent", [False, True])
def test_zero_buffer_counts_as_zero_only_when_nothing_can_load_it(persistent):
    # a non-persistent all-zero buffer is zero in every instance the code builds; a persistent one may be
    # loaded with other values later, so its channels (the second half) are pinned
    model, x = BufferBias(persistent), torch.randn(2, 12)
    graph, _ = trace(model, x)
    an = analyze(graph)
    second_half = an.component[an.elements(graph.params["w"], 0)][8:]
    assert bool(an.prunable[second_half].all()) is not persistent
    if not persistent:
        plan = check_exact(model, x, ratio=0.3)
        assert graphprune.plan(model, x, target_flops=0.3, importance="random", tracer="export").removed == \
            plan.removed  # both frontends know the zero buffer


def test_sigmoid_before_a_consumer_pins_the_channels():
    # sigmoid(0) = 0.5: a masked channel would still feed c2, so removal would not be exact
    m = ConvChain(act=nn.Sigmoid)
    assert not prunable_axis(m, X, "c1.weight", 0)
    assert prunable_axis(ConvChain(), X, "c1.weight", 0)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        s = F.relu(self.stem(x))
        return self.out(s + self.b(F.relu(self.a(s))))


def test_residual_add_couples_both_operands():
    m = Residual()
    plan = check_exact(m, X)
    stem = set(plan.removed.get("stem.weight", {}).get(0, []))
    b = set(plan.removed.get("b.weight", {}).get(0, []))
    assert stem == b  # the add ties them index by index


class BroadcastAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y = self.c1(x)
        return self.c2(y + y.mean(1, keepdim=True))  # a (B,1,H,W) term makes masked channels non-zero


def test_adding_a_channel_broadcast_term_pins():
    assert not prunable_axis(BroadcastAdd(), X, "c1.weight", 0)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 10, 1)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1))


def test_concat_binds_each_input_to_its_own_segment():
    m = Concat()
    plan = check_exact(m, X, ratio=0.5)
    gone_a = plan.removed.get("a.weight", {}).get(0, [])
    gone_b = plan.removed.get("b.weight", {}).get(0, [])
    gone_c = plan.removed["c.weight"][1]
    assert sorted(gone_c) == sorted(gone_a + [6 + i for i in gone_b])


class Chunked(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.p, self.q = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        u, v = self.a(x).chunk(2, dim=1)
        return self.p(u) + self.q(v)


def test_equal_chunks_lose_the_same_positions():
    m = Chunked()
    plan = graphprune.plan(m, X, target_flops=0.6, importance="random")
    gone = plan.removed["a.weight"][0]
    first, second = [i for i in gone if i < 4], [i - 4 for i in gone if i >= 4]
    assert first and first == second  # chunk(2) of the slim tensor still splits u from v
    assert plan.removed["p.weight"][1] == first and plan.removed["q.weight"][1] == first
    assert oracle_error(plan, m, X) <= 1e-6


class Sliced(nn.Module):
    """A partial slice with a width written into the forward code: the module cannot follow a pruned width,
    so prune() must notice and fall back to the regenerated graph."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.b(self.a(x)[:, :6])


def test_constant_slice_is_caught_by_verification():
    m = Sliced()
    slim = graphprune.prune(m, X, target_flops=0.6, importance="random")
    assert "regenerated" in " ".join(slim.graphprune_plan.notes)
    assert torch.allclose(run(slim, X), run(slim.graphprune_plan.mask(m), X), atol=1e-6)


class Grouped(nn.Module):
    def __init__(self, groups=4, depthwise=False):
        super().__init__()
        width = 16
        self.a = nn.Conv2d(3, width, 1)
        self.g = nn.Conv2d(width, width * (2 if depthwise else 1), 3, padding=1,
                           groups=width if depthwise else groups)
        self.c = nn.Conv2d(self.g.out_channels, 4, 1)

    def forward(self, x):
        return self.c(F.relu(self.g(F.relu(self.a(x)))))


@pytest.mark.parametrize("depthwise", [False, True])
def test_grouped_and_depthwise_conv_remove_whole_groups(depthwise):
    m = Grouped(depthwise=depthwise)
    plan = check_exact(m, X, ratio=0.5)
    slim = plan.apply(m)
    assert slim.g.groups < m.g.groups
    assert slim.g.in_channels == slim.a.out_channels
    assert slim.g.in_channels % slim.g.groups == 0 and slim.g.out_channels % slim.g.groups == 0
    assert slim.g.weight.shape[1] == m.g.weight.shape[1]  # per-group width is kept


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2)
        self.t = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.c = nn.Conv1d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.t(F.relu(self.a(x))))
        return self.c(y.flatten(2))


def test_transposed_conv_and_conv1d():
    m = Transposed()
    plan = check_exact(m, X)
    slim = plan.apply(m)
    assert slim.t.in_channels == slim.a.out_channels and slim.c.in_channels == slim.t.out_channels


class Mlp3d(nn.Module):
    """Linear layers on (batch, tokens, features) inputs, as transformers use them."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


def test_linear_on_3d_input_and_layernorm_pins_its_axis():
    m = Mlp3d()
    x = torch.randn(2, 5, 8)
    plan = check_exact(m, x, ratio=0.6)
    assert set(plan.removed) >= {"fc1.weight", "fc2.weight"}
    assert 0 not in plan.removed["fc2.weight"]  # the hidden axis is the model's input axis: pinned


def test_allow_lossy_prunes_layernorm_axes_and_says_so():
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.norm, self.out = nn.Linear(8, 32), nn.LayerNorm(32), nn.Linear(32, 4)

        def forward(self, x):
            return self.out(self.norm(self.inp(x)))

    x = torch.randn(3, 8)
    plan = graphprune.plan(Wide(), x, target_flops=0.5, allow_lossy=True)
    assert plan.lossy and "LOSSY" in plan.summary()
    slim = plan.apply(Wide())
    assert slim.norm.normalized_shape == (slim.inp.out_features,)
    with pytest.raises(graphprune.BudgetError):
        graphprune.plan(Wide(), x, target_flops=0.5)
    assert "layer norm normalizes over this axis" in graphprune.plan(Wide(), x, target_flops=1.0).explain()


class FlattenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 10 * 10, 4)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.c(x)), 1))


def test_flatten_into_linear_removes_blocks_of_columns():
    m = FlattenHead()
    plan = check_exact(m, X, ratio=0.5)
    gone = plan.removed["c.weight"][0]
    cols = plan.removed["fc.weight"][1]
    assert sorted(cols) == sorted(c * 100 + k for c in gone for k in range(100))


class Heads(nn.Module):
    """Multi-head attention written out: split into heads, SDPA, merge."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape

        def split(y):
            return y.view(b, t, self.heads, -1).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return x + self.o(y.transpose(1, 2).reshape(b, t, -1))


def test_whole_heads_go_and_the_head_count_attribute_follows():
    m = Heads()
    x = torch.randn(2, 6, 16)
    plan = graphprune.plan(m, x, target_flops=0.8, importance="random")
    gone = plan.removed["v.weight"][0]
    assert gone and len(gone) % 4 == 0 and all(i // 4 == gone[k - k % 4] // 4 for k, i in enumerate(gone))
    assert plan.removed["q.weight"][0] == plan.removed["k.weight"][0] == gone == plan.removed["o.weight"][1]
    slim = plan.apply(m)
    assert slim.heads == 4 - len(gone) // 4  # without it view(b, t, heads, -1) would regroup silently
    assert oracle_error(plan, m, x) <= 1e-6


class SingleHead(nn.Module):
    """One attention head: q/k width is contracted inside SDPA, v width flows to the output."""

    def __init__(self, scale=None):
        super().__init__()
        self.scale = scale
        self.q, self.k, self.v, self.o = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(8, 10), nn.Linear(10, 8)

    def forward(self, x):
        q, k, v = (f(x).unsqueeze(1) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.o(y.squeeze(1))


def test_sdpa_value_width_flows_and_qk_width_needs_an_explicit_scale():
    x = torch.randn(2, 5, 8)
    assert prunable_axis(SingleHead(), x, "v.weight", 0)
    assert not prunable_axis(SingleHead(), x, "q.weight", 0)  # default scale is 1/sqrt(width)
    assert prunable_axis(SingleHead(scale=0.3), x, "q.weight", 0)
    check_exact(SingleHead(scale=0.3), x, ratio=0.7)


def test_softmax_and_mean_over_channels_pin():
    class M(nn.Module):
        def __init__(self, op):
            super().__init__()
            self.a, self.b, self.op = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), op

        def forward(self, x):
            y = self.a(x)
            return self.b(y) + self.op(y)

    assert not prunable_axis(M(lambda y: y.softmax(1)[:, :4]), X, "a.weight", 0)
    assert not prunable_axis(M(lambda y: y.mean(1, keepdim=True)), X, "a.weight", 0)
    assert prunable_axis(M(lambda y: y.sum(1, keepdim=True)), X, "a.weight", 0)  # sum of zeros is exact


def test_unknown_op_pins_with_reason():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = torch.fft.fft(self.a(x), dim=1).real
            return self.b(y)

    m = M()
    assert not prunable_axis(m, X, "a.weight", 0)
    with pytest.raises(graphprune.BudgetError):
        graphprune.plan(m, X, target_flops=0.5)
    plan = graphprune.plan(m, X, target_flops=1.0)
    assert "no rule for op aten._fft" in plan.explain()


def test_pixel_shuffle_keeps_blocks_and_channel_shuffle_pins():
    class PS(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(F.pixel_shuffle(F.relu(self.a(x)), 2))

    m = PS()
    plan = check_exact(m, X, ratio=0.6)
    gone = sorted(plan.removed["a.weight"][0])
    assert len(gone) % 4 == 0 and all(g // 4 == gone[i - i % 4] // 4 for i, g in enumerate(gone))

    class CS(PS):
        def forward(self, x):
            return self.b(F.channel_shuffle(F.relu(self.a(x)), 4)[:, :4])

    assert not prunable_axis(CS(), X, "a.weight", 0)


def test_inplace_ops_and_shared_modules():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = F.relu(self.a(x), inplace=True)
            y = self.b(y)
            y += self.b(y)  # shared weights, in-place add
            return self.out(y)

    check_exact(M(), X)


def test_writing_into_a_view_pins():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.a(x)
            buf = torch.zeros_like(y)
            buf[:, :8] = y  # copy_ into a view of another tensor
            return self.b(buf)

    assert not prunable_axis(M(), X, "a.weight", 0)


def test_round_to_and_max_ratio():
    m = ConvChain()
    plan = graphprune.plan(m, X, target_flops=0.5, round_to=4)
    slim = plan.apply(m)
    assert slim.c1.out_channels % 4 == 0 and slim.c2.out_channels % 4 == 0
    plan = graphprune.plan(m, X, target_flops=0.9, max_ratio=0.25)
    for name in ("c1.weight", "c2.weight"):
        assert len(plan.removed.get(name, {}).get(0, [])) <= 4
