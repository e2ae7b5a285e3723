"""A sample of timm CNNs, vision transformers and MLP models (random weights): prune to half the FLOPs with
no hints and pass the exactness oracle. What they prune today is what the core compiler allows (MLP and
convolution widths; heads and normalized hidden sizes stay whole)."""

from __future__ import annotations

import pytest
import timm
import torch

import graphprune

from .conftest import nonzero_params, oracle_error

MODELS = ["resnet18", "efficientnet_b0", "ghostnet_100", "convnext_atto", "vit_tiny_patch16_224",
          "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "levit_128s", "mixer_s16_224", "resmlp_12_224",
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
