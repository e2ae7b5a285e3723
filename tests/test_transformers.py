"""Hugging Face architectures at small random configs, with no hints: what the core compiler prunes today
(MLP widths; heads and normalized hidden sizes stay whole), exactly, and the pruned causal LMs still generate
and round-trip through graphprune.save / load."""

from __future__ import annotations

import pytest
import torch
import transformers

import graphprune

VOCAB = 512


def _models():
    return {
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)),
        "bert": lambda: transformers.BertModel(transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)),
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)),
    }


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids)[0]


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_hf_model_prunes_exactly_with_no_hints(name, tmp_path):
    torch.manual_seed(0)
    factory = _models()[name]
    model = factory().eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    plan = graphprune.plan(model, {"input_ids": ids}, target_flops=0.7)
    assert abs(plan.flops_ratio - 0.7) <= 0.01
    slim, masked = plan.apply(model), plan.mask(model)
    out, ref, dense = _logits(slim, ids), _logits(masked, ids), _logits(model, ids)
    assert out.shape == dense.shape
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, dense)
    if hasattr(slim, "generate"):
        tokens = slim.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert tokens.shape == (1, 9)
    graphprune.save(slim, tmp_path / "slim.pt")
    torch.manual_seed(1)  # a fresh instance with other weights: load must restore the pruned ones
    loaded = graphprune.load(tmp_path / "slim.pt", factory).eval()
    assert torch.allclose(_logits(loaded, ids), out)
