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


def check_exact(model, x, ratio=0.6, importance="random", tol=0.01, **kw):
    """Plan to `ratio`, land within `tol` of it (a model whose channels are too coarse passes a larger tol, said at
    the call site) and check apply against mask."""
    plan = graphprune.plan(model, x, target_flops=ratio, importance=importance, **kw)
    assert abs(plan.flops_ratio - ratio) <= tol, f"planned {plan.flops_ratio:.3f} for a target of {ratio}"
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
        plan = check_exact(model, x, ratio=0.3, tol=0.07)  # 16 channels, each 1/16 of the FLOPs
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
    plan = check_exact(m, X, tol=0.07)  # 8-channel layers: one channel moves the ratio by up to 0.06
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
    plan = check_exact(m, X, tol=0.07)  # 8-channel layers: one channel moves the ratio by up to 0.07
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
    check_exact(SingleHead(scale=0.3), x, ratio=0.7, tol=0.03)  # widths 10 and 12


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
    plan = check_exact(m, X, ratio=0.6, tol=0.14)  # 4 blocks of 4 channels, each 0.14 of the FLOPs
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

    check_exact(M(), X, tol=0.2)  # 8 channels coupled through all three convs: one is ~0.2 of the FLOPs


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


class RMSNorm(nn.Module):
    """An RMS norm written out, scaling by w (LLaMA) or by 1 + w (Gemma); `bias_too` also adds w afterwards."""

    def __init__(self, dim, offset=0.0, bias_too=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim) * 0.3)
        self.eps, self.offset, self.bias_too = 1e-6, offset, bias_too

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        y = h * (self.offset + self.weight) if self.offset else h * self.weight
        return y + self.weight if self.bias_too else y


class RMSBlock(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(8, 64), RMSNorm(64, **kw), nn.Linear(64, 4)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_in_both_forms_is_rescaled_exactly(offset):
    m, x = RMSBlock(offset=offset), torch.randn(3, 8)
    plan = check_exact(m, x)
    rms = [r for r in plan.rewrites if r["kind"] == "rms"]
    assert len(rms) == 1 and rms[0].get("offset", 0.0) == offset  # the plan says which form it replays
    slim = graphprune.prune(m, x, target_flops=0.6, importance="random")
    assert type(slim) is RMSBlock and slim.norm.weight.shape[0] < 64  # the module itself, not the fallback
    assert torch.allclose(run(slim, x), run(slim.graphprune_plan.mask(m), x), atol=1e-5)


def test_rms_norm_whose_weight_is_used_otherwise_pins_with_reason():
    # y = h * w + w: rescaling w for the mean would also scale the added term, so no rescale is exact
    m, x = RMSBlock(bias_too=True), torch.randn(3, 8)
    assert not prunable_axis(m, x, "a.weight", 0)
    assert "cannot rescale it exactly" in graphprune.plan(m, x, target_flops=1.0).explain()
    assert prunable_axis(RMSBlock(), x, "a.weight", 0)


def test_group_norm_with_one_channel_per_group_updates_num_groups():
    class M(nn.Module):
        def __init__(self, affine=True):
            super().__init__()
            self.a, self.g, self.b = nn.Conv2d(3, 16, 3), nn.GroupNorm(16, 16, affine=affine), nn.Conv2d(16, 4, 1)

        def forward(self, x):
            return self.b(F.relu(self.g(self.a(x))))

    m = M()
    plan = check_exact(m, X, tol=0.07)  # 16 channels, each 1/16 of the FLOPs
    slim = plan.apply(m)
    assert slim.g.num_groups == slim.g.num_channels == slim.a.out_channels < 16
    assert not prunable_axis(M(affine=False), X, "a.weight", 0)  # no weight to size it: its channels stay


class LinearToConvTranspose(nn.Module):
    """Torch-Pruning's test: a Linear's output viewed as (C, 4, 4) feeds a transposed convolution."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32 * 4 * 4)
        self.t1 = nn.ConvTranspose2d(32, 8, 2, stride=2)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.fc(x)).view(-1, self.t1.in_channels, 4, 4)
        return self.out(F.relu(self.t1(y)))


def test_linear_viewed_as_channels_feeds_a_transposed_conv():
    m, x = LinearToConvTranspose(), torch.randn(2, 16)
    plan = check_exact(m, x)
    gone = plan.removed["t1.weight"][0]  # the transposed weight is [in, out, kH, kW]: its input channels go
    assert gone and sorted(plan.removed["fc.weight"][0]) == sorted(c * 16 + k for c in gone for k in range(16))
    slim = graphprune.prune(m, x, target_flops=0.6, importance="random")
    assert type(slim) is LinearToConvTranspose and slim.t1.in_channels == 32 - len(gone)


def test_convolution_and_pooling_pin_the_axes_they_slide_over():
    class ToSpatial(nn.Module):  # a Linear's rows become the rows of an image
        def __init__(self, pool):
            super().__init__()
            self.fc, self.c, self.pool = nn.Linear(4, 64), nn.Conv2d(1, 4, 3), pool

        def forward(self, x):
            y = self.fc(x).view(-1, 1, 8, 8)
            return self.c(F.max_pool2d(y, 2)) if self.pool else self.c(y)

    class Eca(nn.Module):  # efficient channel attention: a Conv1d slides over the channel axis
        def __init__(self):
            super().__init__()
            self.a, self.k, self.b = nn.Conv2d(3, 16, 1), nn.Conv1d(1, 1, 3, padding=1, bias=False), nn.Conv2d(16, 4, 1)

        def forward(self, x):
            y = F.relu(self.a(x))
            gate = torch.sigmoid(self.k(y.mean((2, 3)).unsqueeze(1))).squeeze(1)
            return self.b(y * gate[:, :, None, None])

    for pool in (False, True):
        assert not prunable_axis(ToSpatial(pool), torch.randn(2, 4), "fc.weight", 0)
    assert not prunable_axis(Eca(), X, "a.weight", 0)


class RelPosBias(nn.Module):
    """Swin-style attention: a learned (positions, heads) table indexed by a position buffer, added per head."""

    def __init__(self, dim=32, heads=4, window=3):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads))
        pos = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (pos[:, :, None] - pos[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        attn = (q @ k.transpose(-2, -1) * 0.25 + bias).softmax(-1)
        return x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


def test_relative_position_bias_table_lets_heads_go():
    m, x = RelPosBias(), torch.randn(1, 9, 32)  # batch 1: matmul folds (batch, heads) into one axis otherwise
    plan = check_exact(m, x, ratio=0.75)  # one head of four is a quarter of the FLOPs
    gone = plan.removed["table"][1]
    assert gone and plan.removed["proj.weight"][1] == [h * 8 + i for h in gone for i in range(8)]
    assert plan.apply(m).heads == 4 - len(gone)


class Gather(nn.Module):
    """Advanced indexing that keeps the channel axis: at positions (i, j) of adjacent axes, or with the indexed
    axes apart, where PyTorch puts the index axes first."""

    def __init__(self, adjacent):
        super().__init__()
        self.adjacent = adjacent
        self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv1d(16, 4, 1)
        self.register_buffer("i", torch.tensor([0, 3, 5]), persistent=False)
        self.register_buffer("j", torch.tensor([1, 1, 7]), persistent=False)

    def forward(self, x):
        y = F.relu(self.a(x))
        if self.adjacent:
            return self.b(y[:, :, self.i, self.j])  # (B, C, 3)
        return self.b(y[self.i[:2] % 2, :, self.j[:2]])  # indexed axes 0 and 2 -> (2, C, W)


@pytest.mark.parametrize("adjacent", [True, False])
def test_advanced_indexing_passes_the_other_axes_through(adjacent):
    m = Gather(adjacent)
    plan = check_exact(m, X, tol=0.07)  # 16 channels, each 1/16 of the FLOPs
    assert plan.removed["a.weight"][0] == plan.removed["b.weight"][1]


def test_boolean_mask_indexing_pins():
    class M(Gather):
        def forward(self, x):
            y = F.relu(self.a(x))
            return self.b(y[y[:, 0, 0, 0] > -1].flatten(2))

    assert not prunable_axis(M(True), X, "a.weight", 0)
