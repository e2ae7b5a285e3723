"""graphprune inspect-hf: the weight-free analysis of a config (meta device, short traces extrapolated to every
layer) must say exactly what an ordinary full trace of a real model of that config says."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
import torch

import graphprune
from graphprune.cli import main
from graphprune.errors import UsageError
from graphprune.hf_inspect import inspect_model, inspect_pretrained
from graphprune.ir.from_torch import trace

T = pytest.importorskip("transformers")

FIELDS = ("groups", "flops", "params", "flops_by_role", "params_by_role", "pinned", "layers", "hidden_size")
LLAMA = {"vocab_size": 1000, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 6,
         "num_attention_heads": 8, "num_key_value_heads": 2}


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)  # transformers' config warnings
    yield
    logging.disable(logging.NOTSET)


def _real(config):
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config)


def _same(a, b):
    for name in FIELDS:
        assert getattr(a, name) == getattr(b, name), name


def _group(result, role, unit):
    return [(g.width, g.count) for g in result.groups if g.role == role and g.unit == unit]


def test_llama_gqa_from_a_config_directory_equals_a_full_trace(tmp_path):
    config = T.LlamaConfig(**LLAMA)
    config.save_pretrained(tmp_path)  # config.json only
    weight_free = inspect_pretrained(tmp_path, seq_len=16)
    assert "extrapolated to 6 layers" in weight_free.method
    model = _real(config)
    reference = inspect_model(model, seq_len=16)
    _same(weight_free, reference)
    assert _group(weight_free, "model.layers.#.self_attn", "KV groups") == [(2, 6)]
    assert _group(weight_free, "model.layers.#.mlp", "channels") == [(352, 6)]
    assert _group(weight_free, "hidden", "channels") == [(128, 1)]
    assert weight_free.params == sum(p.numel() for p in model.parameters())
    assert weight_free.flops == graphprune.count_flops(model, {"input_ids": torch.randint(0, 1000, (1, 16))})
    text = str(weight_free)
    assert "model.layers.#.self_attn KV groups: 2 per layer x 6 layers" in text
    assert "model.layers.#.mlp channels: 352 per layer x 6 layers" in text


@pytest.mark.parametrize("make", [
    lambda: T.Qwen2Config(**LLAMA),
    lambda: T.MistralConfig(**LLAMA),
    lambda: T.GPT2Config(vocab_size=1000, n_embd=64, n_layer=5, n_head=4, n_positions=32, bos_token_id=0,
                         eos_token_id=0),
    lambda: T.Qwen2MoeConfig(**LLAMA, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                             num_experts_per_tok=2),
], ids=["qwen2", "mistral", "gpt2", "qwen2-moe"])
def test_other_architectures_equal_a_full_trace(make):
    config = make()
    weight_free = inspect_pretrained(config, seq_len=16)
    assert "extrapolated" in weight_free.method
    _same(weight_free, inspect_model(_real(config), seq_len=16))


def test_config_that_varies_per_layer_is_traced_whole():
    """Gemma 2 alternates sliding-window and global attention: no extrapolation from the first layers."""
    config = T.Gemma2Config(**LLAMA, head_dim=16)
    weight_free = inspect_pretrained(config, seq_len=16)
    assert "whole model" in weight_free.method and "layer_types" in weight_free.method
    _same(weight_free, inspect_model(_real(config), seq_len=16))


class _WideConfig(T.LlamaConfig):
    model_type = "graphprune_test_wide_llama"


class _WideLastMLP(T.LlamaForCausalLM):
    """A LLaMA whose last layer has a wider MLP: the first three layers look uniform, the model is not."""

    config_class = _WideConfig

    def __init__(self, config):
        super().__init__(config)
        wide = T.LlamaConfig(**{**config.to_dict(), "intermediate_size": 2 * config.intermediate_size})
        self.model.layers[-1].mlp = T.models.llama.modeling_llama.LlamaMLP(wide)


def test_layers_of_different_shapes_are_traced_whole():
    T.AutoConfig.register(_WideConfig.model_type, _WideConfig, exist_ok=True)
    T.AutoModelForCausalLM.register(_WideConfig, _WideLastMLP, exist_ok=True)
    config = _WideConfig(**LLAMA)
    weight_free = inspect_pretrained(config, seq_len=16)
    assert "whole model" in weight_free.method and "parameter shapes" in weight_free.method
    assert sorted(_group(weight_free, "model.layers.#.mlp", "channels")) == [(352, 5), (704, 1)]
    _same(weight_free, inspect_model(_real(config), seq_len=16))


class _ViewThenInPlace(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        flat = self.a(x).view(-1, 8)  # a view: its storage is remembered
        h = self.b(x)
        h.relu_()  # in place on a fresh tensor of its own: safe, not a write into shared storage
        return h + flat


def test_meta_trace_records_what_a_real_trace_records():
    """On meta tensors (every data_ptr is 0) an in-place op on a fresh tensor is still told from a write into a
    viewed storage, and a LLaMA records the same ops as on the CPU but for copies of layout: the CPU's literal
    for the KV cache's empty start (aten.lift_fresh) and a .contiguous() that copies on meta, whose attention
    kernel lays its output out differently (aten.clone)."""
    module = _ViewThenInPlace()
    real, _ = trace(module, torch.randn(2, 8))
    meta, _ = trace(module.to("meta"), torch.randn(2, 8, device="meta"))
    assert [n.op for n in meta.nodes] == [n.op for n in real.nodes]
    assert "graphprune.mutation" not in [n.op for n in meta.nodes]

    config = T.LlamaConfig(**LLAMA)
    real, _ = trace(_real(config), {"input_ids": torch.randint(0, 1000, (1, 8))})
    with torch.device("meta"):
        meta_model = T.AutoModelForCausalLM.from_config(config)
    meta, _ = trace(meta_model, {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta")})
    layout = {"aten.lift_fresh.default", "aten.clone.default"}
    ops = [Counter(n.op for n in g.nodes if n.op not in layout) for g in (meta, real)]
    assert ops[0] == ops[1] and "graphprune.mutation" not in ops[0]


def test_a_config_without_kv_cache_still_traces_on_meta():
    """use_cache=False sends transformers through a packed-sequence check that reads position values."""
    config = T.LlamaConfig(**LLAMA, use_cache=False)
    _same(inspect_pretrained(config, seq_len=8), inspect_model(_real(config), seq_len=8))


def test_llama3_70b_config_is_fast_and_exact(tmp_path):
    config = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
              "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": False,
              "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = inspect_pretrained(tmp_path, seq_len=8)
    assert "extrapolated to 80 layers" in result.method
    assert result.params == 70_553_706_496
    assert _group(result, "model.layers.#.self_attn", "KV groups") == [(8, 80)]
    assert _group(result, "model.layers.#.mlp", "channels") == [(28672, 80)]
    assert _group(result, "hidden", "channels") == [(8192, 1)]
    assert result.params_by_role["model.layers.#.mlp"] == 80 * 3 * 8192 * 28672


def test_errors_say_the_way_out(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        inspect_pretrained(tmp_path)
    with pytest.raises(UsageError, match="does not exist"):
        inspect_pretrained(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    with pytest.raises(UsageError, match="model_type 'no_such_model'.*upgrade transformers"):
        inspect_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(UsageError, match="no causal-LM class"):
        inspect_pretrained(tmp_path)


def test_cli(tmp_path, capsys):
    T.LlamaConfig(**LLAMA).save_pretrained(tmp_path / "tiny")
    assert main(["inspect-hf", str(tmp_path / "tiny"), "--seq-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.#.self_attn KV groups: 2 per layer x 6 layers" in out
    assert "FLOPs per token" in out and "kept whole" in out
    assert main(["inspect-hf", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no config.json" in err
