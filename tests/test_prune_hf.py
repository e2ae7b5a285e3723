"""graphprune prune-hf: a checkpoint pruned one decoder layer at a time must give what in-memory graphprune.plan /
prune give on the loaded model (same plan, same outputs), load back (from_pretrained when uniform, graphprune's
loader otherwise), and refuse bad input with one line, leaving nothing behind and the input untouched."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np
import pytest
import torch

import graphprune
from graphprune.cli import main
from graphprune.errors import UsageError
from graphprune.hf_prune import PLAN_FILE, load_pretrained, prune_pretrained

T = pytest.importorskip("transformers")

LLAMA = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4,
             vocab_size=200)


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)  # transformers' load reports and config warnings
    yield
    logging.disable(logging.NOTSET)


def _checkpoint(tmp_path, config, dtype=torch.float32, shard="100KB", seed=0):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size=shard)
    return model, str(src)


def _digest(folder) -> dict[str, str]:
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("allocation", ["uniform", "global", "flap"])
def test_same_plan_and_outputs_as_in_memory(tmp_path, allocation):
    model, src = _checkpoint(tmp_path, T.LlamaConfig(**LLAMA))
    before = _digest(src)
    ids = torch.randint(0, 200, (8, 32), generator=torch.Generator().manual_seed(1))
    out = str(tmp_path / "out")
    uniform = allocation == "uniform"
    result = prune_pretrained(src, out, target_params=0.7, importance="flap", compensate=True, allocation=allocation,
                              calibration=ids, batch_size=2)
    reference = graphprune.plan(model, {"input_ids": ids[:1]}, target_params=0.7, importance="flap", compensate=True,
                                allocation=allocation, calibration=[{"input_ids": b} for b in ids.split(2)])
    assert ("allocation flap:" in result.plan.summary()) is (allocation == "flap")
    assert result.plan.removed == reference.removed
    assert result.plan.params == pytest.approx(reference.params)
    assert result.uniform_config is uniform
    assert _digest(src) == before
    slim = reference.apply(model)
    x = torch.randint(0, 200, (2, 24))
    loaded = load_pretrained(out)
    assert torch.allclose(_logits(loaded, x), _logits(slim, x), atol=1e-5, rtol=1e-5)
    assert graphprune.load(out).graphprune_plan.removed == reference.removed
    if uniform:  # no graphprune code at load time
        hf = T.AutoModelForCausalLM.from_pretrained(out)
        assert hf.config.intermediate_size < LLAMA["intermediate_size"]
        assert torch.allclose(_logits(hf, x), _logits(slim, x), atol=1e-5, rtol=1e-5)
        assert hf.generate(x[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    else:
        widths = {tuple(loaded.get_submodule(f"model.layers.{i}.mlp.down_proj").weight.shape) for i in range(3)}
        assert len(widths) > 1  # the global and flap allocations gave the layers different widths
    assert json.load(open(os.path.join(out, PLAN_FILE)))["format"] == "graphprune-plan/1"


def test_deci_layout_is_what_save_pretrained_writes(tmp_path):
    """layout="deci": where layers differ, prune-hf writes the DeciLM block_configs layout itself, tensor for tensor
    what graphprune.save_pretrained writes from the in-memory slim model, and graphprune.load reads it back; a
    model the layout cannot describe is refused before any work."""
    from graphprune.shards import ShardReader

    model, src = _checkpoint(tmp_path, T.LlamaConfig(**LLAMA))
    ids = torch.randint(0, 200, (8, 32), generator=torch.Generator().manual_seed(1))
    out = tmp_path / "out"
    options = dict(target_params=0.7, importance="flap", compensate=True, allocation="flap")
    result = prune_pretrained(src, out, layout="deci", calibration=ids, batch_size=2, **options)
    slim = graphprune.plan(model, {"input_ids": ids[:1]}, calibration=[{"input_ids": b} for b in ids.split(2)],
                           **options).apply(model)
    saved = graphprune.save_pretrained(slim, tmp_path / "saved")
    assert result.layout == saved.layout == "deci" and "DeciLM layout" in result.summary()
    config, reference = (json.load(open(d / "config.json")) for d in (out, tmp_path / "saved"))
    assert config["architectures"] == ["DeciLMForCausalLM"]
    assert config["block_configs"] == reference["block_configs"]
    assert len({layer.mlp.down_proj.in_features for layer in slim.model.layers}) > 1  # the layers do differ
    with ShardReader(out) as written, ShardReader(tmp_path / "saved") as expected:
        assert sorted(written.names) == sorted(expected.names)
        for name in written.names:
            assert torch.allclose(written.get(name), expected.get(name), atol=1e-5), name
    assert ".layers" not in os.listdir(out) and PLAN_FILE in os.listdir(out)
    x = torch.randint(0, 200, (2, 24))
    assert torch.allclose(_logits(graphprune.load(str(out)), x), _logits(slim, x), atol=1e-5, rtol=1e-5)

    _, qwen = _checkpoint(tmp_path / "qwen", T.Qwen2Config(**LLAMA))
    with pytest.raises(graphprune.UnsupportedModelError, match="LLaMA-architecture"):
        prune_pretrained(qwen, tmp_path / "o", layout="deci", calibration=ids, **options)
    assert not (tmp_path / "o").exists()


def test_bf16_sharded_qwen2_with_tied_embeddings(tmp_path):
    """Another family (q/k/v biases, tied embeddings), bf16 weights in several shards: the layers run in bf16, the
    statistics are float32, the written weights stay bf16. The in-memory path runs the whole model (with a KV
    cache, so another attention mask path): in bf16 that moves near-tied scores, so the same widths and nearly
    the same channels are asserted. Qwen2's config has no field for an o_proj bias, so the compensated model
    loads through graphprune, as in memory."""
    config = T.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=150, tie_word_embeddings=True)
    model, src = _checkpoint(tmp_path, config, dtype=torch.bfloat16, shard="50KB")
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    ids = torch.randint(0, 150, (4, 16), generator=torch.Generator().manual_seed(2))
    out = str(tmp_path / "out")
    with pytest.warns(UserWarning, match="cannot describe"):
        result = prune_pretrained(src, out, target_params=0.85, compensate="ls", uniform=True, calibration=ids,
                                  batch_size=2, max_shard_bytes=60_000)
    reference = graphprune.plan(model, {"input_ids": ids[:1]}, target_params=0.85, importance="flap",
                                compensate="ls", uniform=True, calibration=[{"input_ids": b} for b in ids.split(2)])
    assert result.plan.removed.keys() == reference.removed.keys()
    for name, axes in reference.removed.items():
        for axis, idx in axes.items():
            mine = result.plan.removed[name][axis]
            assert len(mine) == len(idx)
            assert len(set(mine) & set(idx)) >= 0.8 * len(idx), name
    assert not result.uniform_config
    loaded = load_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert result.plan.added
    for bias, _, _ in result.plan.added:  # the biases compensation gave layers that had none
        assert dict(loaded.named_parameters())[bias].abs().sum() > 0
    assert torch.isfinite(_logits(loaded, ids[:2])).all()
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1


def test_dtype_override_runs_float32_and_writes_the_checkpoints_dtype(tmp_path):
    """dtype=float32 on a bf16 checkpoint: the layers run in float32, so the plan is the in-memory one on the model
    loaded in float32, exactly; the written weights are bf16 again."""
    model, src = _checkpoint(tmp_path, T.LlamaConfig(**LLAMA), dtype=torch.bfloat16)
    ids = torch.randint(0, 200, (8, 32), generator=torch.Generator().manual_seed(3))
    out = str(tmp_path / "out")
    result = prune_pretrained(src, out, target_params=0.8, compensate=True, uniform=True, calibration=ids,
                              batch_size=4, dtype=torch.float32)
    reference = graphprune.plan(model.float(), {"input_ids": ids[:1]}, target_params=0.8, importance="flap",
                                compensate=True, uniform=True, calibration=[{"input_ids": b} for b in ids.split(4)])
    assert result.plan.removed == reference.removed
    from graphprune.shards import ShardReader

    with ShardReader(out) as written:
        assert {written.dtype(n) for n in written.names} == {torch.bfloat16}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: device='cuda' runs each layer on it")
def test_cuda_runs_each_layer_on_the_gpu(tmp_path):
    _, src = _checkpoint(tmp_path, T.LlamaConfig(**LLAMA))
    ids = torch.randint(0, 200, (8, 32), generator=torch.Generator().manual_seed(1))
    runs = {d: prune_pretrained(src, str(tmp_path / d), target_params=0.8, compensate=True, uniform=True,
                                calibration=ids, batch_size=4, device=d) for d in ("cpu", "cuda")}
    assert runs["cuda"].plan.removed.keys() == runs["cpu"].plan.removed.keys()
    x = ids[:2]
    a, b = (T.AutoModelForCausalLM.from_pretrained(str(tmp_path / d)) for d in ("cpu", "cuda"))
    assert torch.allclose(_logits(a, x), _logits(b, x), atol=1e-3, rtol=1e-3)


def test_pruned_propagation_fits_each_layer_to_the_pruned_inputs(tmp_path):
    """propagate="pruned": layer 0 sees the same inputs either way, so it is written identically; the next
    layers are compensated on the pruned model's activations, so their weights differ from the dense mode's."""
    _, src = _checkpoint(tmp_path, T.LlamaConfig(**LLAMA))
    ids = torch.randint(0, 200, (8, 32), generator=torch.Generator().manual_seed(1))
    models = {}
    for mode in ("dense", "pruned"):
        out = str(tmp_path / mode)
        prune_pretrained(src, out, target_params=0.8, compensate=True, uniform=True, calibration=ids,
                         batch_size=4, propagate=mode)
        models[mode] = T.AutoModelForCausalLM.from_pretrained(out)
    dense, pruned = (dict(models[m].named_parameters()) for m in ("dense", "pruned"))
    assert dense.keys() == pruned.keys()
    assert torch.equal(dense["model.layers.0.mlp.down_proj.weight"], pruned["model.layers.0.mlp.down_proj.weight"])
    assert not torch.equal(dense["model.layers.2.mlp.down_proj.weight"], pruned["model.layers.2.mlp.down_proj.weight"])
    assert torch.isfinite(_logits(models["pruned"], ids[:2])).all()


def test_pruned_propagation_is_what_prune_gives(tmp_path):
    """propagate="pruned" gives the in-memory plan's model: within a layer too, the MLP's down_proj is fitted on
    what it sees once attention's o_proj lost heads and was rewritten (one pass per layer fitted both on the
    unpruned attention: 3% of the largest logit apart)."""
    model, src = _checkpoint(tmp_path, T.LlamaConfig(**LLAMA))
    ids = torch.randint(0, 200, (8, 32), generator=torch.Generator().manual_seed(1))
    options = dict(target_params=0.5, importance="flap", compensate=True, allocation="flap", propagate="pruned")
    result = prune_pretrained(src, tmp_path / "out", calibration=ids, batch_size=2, **options)
    reference = graphprune.plan(model, {"input_ids": ids[:1]}, calibration=[{"input_ids": b} for b in ids.split(2)],
                                **options)
    assert result.plan.removed == reference.removed
    assert all(f"model.layers.{i}.{m}.weight" in reference.removed for i in range(3)
               for m in ("self_attn.o_proj", "mlp.down_proj"))  # both readers of every layer rewritten
    x = torch.randint(0, 200, (2, 24))
    slim = _logits(reference.apply(model), x)
    assert torch.allclose(_logits(graphprune.load(str(tmp_path / "out")), x), slim, atol=1e-5, rtol=1e-5)


def _tokenizer_dir(folder, text: str) -> None:
    """A real word-level fast tokenizer for `text`, saved into `folder` (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(text.split()))
    tok = Tokenizer(models.WordLevel({w: i + 1 for i, w in enumerate(words)} | {"<unk>": 0}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)


def test_cli_with_a_text_file_and_the_tokenizer(tmp_path, capsys):
    _, src = _checkpoint(tmp_path, T.LlamaConfig(**LLAMA))
    text = " ".join(f"word{i % 97} and{i % 13}" for i in range(400))
    _tokenizer_dir(src, text)
    (tmp_path / "calib.txt").write_text(text)
    out = tmp_path / "out"
    code = main(["prune-hf", src, "-o", str(out), "--target-params", "0.8", "--calibration", str(tmp_path / "calib.txt"),
                 "--seq-len", "16", "--samples", "8", "--batch-size", "2", "--uniform", "--compensate",
                 "--report", str(tmp_path / "r.html")])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "peak memory" in printed and "from_pretrained loads it" in printed
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", PLAN_FILE} <= set(os.listdir(out))
    assert "<svg" in (tmp_path / "r.html").read_text()
    hf = T.AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.intermediate_size < LLAMA["intermediate_size"]
    assert T.AutoTokenizer.from_pretrained(out)("word3 and4")["input_ids"] == \
        T.AutoTokenizer.from_pretrained(src)("word3 and4")["input_ids"]


def test_bad_input_one_line_nothing_left_behind(tmp_path, capsys):
    _, src = _checkpoint(tmp_path, T.LlamaConfig(**LLAMA))
    before = _digest(src)
    npy = tmp_path / "ids.npy"
    np.save(npy, np.random.default_rng(0).integers(0, 200, (8, 16)))
    (tmp_path / "empty").mkdir()
    only_config = tmp_path / "config_only"
    T.LlamaConfig(**LLAMA).save_pretrained(only_config)
    (tmp_path / "exists").mkdir()
    short = tmp_path / "short.npy"
    np.save(short, np.zeros((1, 16), dtype=np.int64))
    bad_ids = tmp_path / "bad.npy"
    np.save(bad_ids, np.full((8, 16), 999))
    cases = [
        ([str(tmp_path / "empty"), "-o", str(tmp_path / "o1")], "config.json", 2),
        ([str(only_config), "-o", str(tmp_path / "o2")], "safetensors", 2),
        ([src, "-o", str(tmp_path / "exists")], "exists", 2),
        ([src, "-o", os.path.join(src, "pruned")], "inside the input", 2),
        ([src, "-o", str(tmp_path / "o3"), "--batch-size", "4", "--calibration", str(short)], "fewer than one batch", 2),
        ([src, "-o", str(tmp_path / "o4"), "--calibration", str(bad_ids)], "tokenizer", 2),
        ([src, "-o", str(tmp_path / "o5"), "--calibration", str(tmp_path / "calib.txt")], "does not exist", 2),
        ([src, "-o", str(tmp_path / "o6"), "--device", "cuda"], "CUDA", 2),
        ([src, "-o", str(tmp_path / "o7"), "--target-params", "0.0001", "--max-ratio", "0.5"], "out of reach", 1),
        ([src, "-o", str(tmp_path / "o8"), "--allocation", "search"], "graphprune.prune(", 2),
    ]
    if torch.cuda.is_available():
        cases = [c for c in cases if "cuda" not in c[0]]
    for args, words, code in cases:
        if "--calibration" not in args:
            args = [*args, "--calibration", str(npy)]
        if "--target-params" not in args:
            args = [*args, "--target-params", "0.8"]
        assert main(["prune-hf", *args]) == code, args
        err = capsys.readouterr().err.strip()
        assert [line for line in err.splitlines() if "error" in line] == err.splitlines()[-1:], err
        assert err.splitlines()[-1].startswith("graphprune: error:") and "pass 1" not in err, err
        assert words in err, (words, err)
    assert _digest(src) == before
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith((".graphprune", "o"))]
    assert leftovers == [], leftovers
    assert os.listdir(tmp_path / "exists") == []


def test_no_decoder_stack_is_refused(tmp_path):
    """A hybrid stack (attention and Mamba layers of different classes) has no repeated decoder layer to stream."""
    config = T.JambaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=100, attn_layer_period=2, attn_layer_offset=1,
                           expert_layer_period=10, num_experts=1, mamba_d_state=4, mamba_expand=2,
                           use_mamba_kernels=False)
    _, src = _checkpoint(tmp_path, config)
    with pytest.raises(UsageError, match="no decoder stack"):
        prune_pretrained(src, str(tmp_path / "out"), target_params=0.8, calibration=np.zeros((4, 8), dtype=np.int64))
    assert not os.path.exists(tmp_path / "out")


def test_checkpoint_keys_transformers_renames(tmp_path):
    """GPT-NeoX stores its output embedding as embed_out (the model calls it lm_head): read under the model's name,
    written back under the checkpoint's, so from_pretrained loads the output; a MoE checkpoint whose experts
    transformers stacks while loading is refused before any work."""
    model, src = _checkpoint(tmp_path, T.GPTNeoXConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                                       num_attention_heads=8, vocab_size=200))
    ids = torch.randint(0, 200, (8, 32), generator=torch.Generator().manual_seed(1))
    out = str(tmp_path / "out")
    result = prune_pretrained(src, out, target_params=0.8, compensate=True, uniform=True, calibration=ids,
                              batch_size=2)
    reference = graphprune.plan(model, {"input_ids": ids[:1]}, target_params=0.8, importance="flap", compensate=True,
                                uniform=True, calibration=[{"input_ids": b} for b in ids.split(2)])
    assert result.plan.removed == reference.removed and result.uniform_config
    with graphprune.shards.ShardReader(out) as written:
        assert "embed_out.weight" in written.names and "lm_head.weight" not in written.names
    x = torch.randint(0, 200, (2, 12))
    hf = T.AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(_logits(hf, x), _logits(reference.apply(model), x), atol=1e-5, rtol=1e-5)

    moe = T.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=100, num_local_experts=2)
    moe_src = tmp_path / "moe"
    T.AutoModelForCausalLM.from_config(moe).save_pretrained(moe_src)
    with pytest.raises(UsageError, match="converts while loading.*graphprune.prune"):
        prune_pretrained(moe_src, str(tmp_path / "moe-out"), target_params=0.8, calibration=ids % 100, batch_size=2)
    assert not os.path.exists(tmp_path / "moe-out")


def test_peak_memory_is_the_process_own():
    """ru_maxrss of a process started from another includes the parent's resident size (fork, then exec): the
    peak prune-hf reports must not."""
    import subprocess
    import sys

    from graphprune.hf_prune import peak_rss_bytes

    ballast = np.ones(2 * 2**30 // 8)  # 2 GiB resident in this process while the child starts
    child = subprocess.run([sys.executable, "-c", "from graphprune.hf_prune import peak_rss_bytes; "
                            "print(peak_rss_bytes())"], capture_output=True, text=True, check=True)
    mine = peak_rss_bytes()
    del ballast
    assert mine > 2 * 2**30 and int(child.stdout) < mine - 2**30
