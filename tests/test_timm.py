"""A sample of timm CNNs, vision transformers and MLP models (random weights): prune to half the FLOPs with
no hints and pass the exactness oracle (heads go whole; LayerNorm-normalized hidden sizes stay)."""

from __future__ import annotations

import pytest
import timm
import torch

import graphprune

from .conftest import nonzero_params, oracle_error, run

MODELS = ["resnet18", "efficientnet_b0", "ghostnet_100", "convnext_atto", "vit_tiny_patch16_224",
          "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "mixer_s16_224", "resmlp_12_224",
          "poolformer_s12", "mobilevit_xxs", "efficientformer_l1"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_timm_model_prunes_to_half_and_is_exact(name):
    torch.manual_seed(0)
    model = nonzero_params(timm.create_model(name, pretrained=False).eval())
    x = torch.randn(1, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
    plan = graphprune.plan(model, x, target_flops=0.5)
    assert abs(plan.flops_ratio - 0.5) <= 0.01
    assert oracle_error(plan, model, x) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cait_xxs24_224", "eva02_tiny_patch14_224", "levit_128s"])
def test_heads_prune_through_the_regenerated_graph(name):
    """CaiT (talking heads: linear layers across heads) and EVA-02 (RoPE, SwiGLU, a zero k bias buffer)
    derive a width from their input (C // num_heads, reshape(B, N, C)), and LeViT (heads carry a bias table
    indexed by position) reshapes to its val_attn_dim attribute, so their modules cannot follow removed heads:
    prune() returns the regenerated graph, which must compute what the masked model does, at other batch sizes
    too."""
    model = nonzero_params(timm.create_model(name, pretrained=False).eval())
    x = torch.randn(1, 3, 224, 224)
    slim = graphprune.prune(model, x, target_flops=0.5)
    plan = slim.graphprune_plan
    assert isinstance(slim, torch.fx.GraphModule) and any("regenerated" in n for n in plan.notes)
    assert any(r["kind"] == "heads" and r["after"] < r["before"] for r in plan.rewrites)
    assert abs(plan.flops_ratio - 0.5) <= 0.01
    assert "it runs at any batch size" in plan.notes[-1]  # recorded at batch 1, checked at batch 2
    masked = plan.mask(model)
    for batch in (x, torch.randn(3, 3, 224, 224)):
        expected = run(masked, batch)
        assert float((run(slim, batch) - expected).abs().max() / expected.abs().max()) <= 1e-5


def test_swin_relative_position_bias_tables_let_heads_go():
    """A small Swin: each block indexes a (positions, heads) bias table, so heads go with their table columns."""
    torch.manual_seed(0)
    model = nonzero_params(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56,
                                             embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=7).eval())
    x = torch.randn(1, 3, 56, 56)
    plan = graphprune.plan(model, x, target_flops=0.5)
    assert abs(plan.flops_ratio - 0.5) <= 0.01
    tables = [n for n in plan.removed if n.endswith("relative_position_bias_table")]
    assert tables and all(plan.removed[n].keys() == {1} for n in tables)
    assert oracle_error(plan, model, x) <= 1e-5
