"""Hugging Face architectures at small random configs, pruned with no hints: heads (GQA included), MLP
widths and RMS-normalized hidden sizes go exactly; causal LMs still generate; plans replay through
graphprune.save / load; uniform plans round-trip through save_pretrained / from_pretrained."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import graphprune

from .conftest import run

V = 512


def _ids(n=16):
    return torch.randint(0, V, (1, n))


def _causal(cls, cfg, **kw):
    return lambda: cls(cfg(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, **kw))


MODELS = {
    "bert": (lambda: T.BertModel(T.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=128)),
             lambda: {"input_ids": _ids()}),
    "roberta": (lambda: T.RobertaModel(T.RobertaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                                       num_attention_heads=4, intermediate_size=128)),
                lambda: {"input_ids": _ids()}),
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                    bos_token_id=0, eos_token_id=0)),
             lambda: {"input_ids": _ids()}),
    "llama": (_causal(T.LlamaForCausalLM, T.LlamaConfig), lambda: {"input_ids": _ids()}),
    "mistral": (_causal(T.MistralForCausalLM, T.MistralConfig), lambda: {"input_ids": _ids()}),
    "qwen2": (_causal(T.Qwen2ForCausalLM, T.Qwen2Config), lambda: {"input_ids": _ids()}),
    "phi3": (_causal(T.Phi3ForCausalLM, T.Phi3Config, pad_token_id=0, bos_token_id=0, eos_token_id=0),
             lambda: {"input_ids": _ids()}),
    "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, hidden_size=64,
                                                            num_hidden_layers=2, num_attention_heads=4,
                                                            intermediate_size=128, num_labels=10)),
            lambda: {"pixel_values": torch.randn(1, 3, 32, 32)}),
    "swin": (lambda: T.SwinForImageClassification(T.SwinConfig(image_size=32, patch_size=2, embed_dim=16,
                                                               depths=[1, 1], num_heads=[2, 4], window_size=4,
                                                               num_labels=10)),
             lambda: {"pixel_values": torch.randn(1, 3, 32, 32)}),
    "whisper": (lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
        max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=0, eos_token_id=0,
        decoder_start_token_id=1)),
        lambda: {"input_features": torch.randn(1, 16, 32), "decoder_input_ids": _ids(8)}),
    "t5": (lambda: T.T5ForConditionalGeneration(T.T5Config(vocab_size=V, d_model=64, d_kv=16, d_ff=128,
                                                           num_layers=2, num_heads=4, decoder_start_token_id=0)),
           lambda: {"input_ids": _ids(), "decoder_input_ids": _ids(8)}),
}
CAUSAL = {"gpt2", "llama", "mistral", "qwen2", "phi3"}


def _first(out):
    return out[0] if isinstance(out, tuple) else next(iter(out.values()))


def _build(name):
    torch.manual_seed(0)
    factory, inputs = MODELS[name]
    return factory, factory().eval(), inputs()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_prunes_exactly_with_no_hints(name, tmp_path):
    factory, model, x = _build(name)
    plan = graphprune.plan(model, x, target_flops=0.6)
    assert abs(plan.flops_ratio - 0.6) <= 0.01
    slim, masked = plan.apply(model), plan.mask(model)
    out, ref, dense = _first(run(slim, x)), _first(run(masked, x)), _first(run(model, x))
    assert out.shape == dense.shape
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, dense)
    if name in CAUSAL:
        tokens = slim.generate(x["input_ids"][:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert tokens.shape == (1, 9)
    graphprune.save(slim, tmp_path / "slim.pt")
    torch.manual_seed(1)  # a fresh instance with other weights: load must restore the pruned ones
    loaded = graphprune.load(tmp_path / "slim.pt", factory).eval()
    assert torch.allclose(_first(run(loaded, x)), out)


def test_llama_gqa_heads_go_with_their_query_heads_exactly():
    _, model, x = _build("llama")
    mlp = ["model.layers.0.mlp", "model.layers.1.mlp"]  # keeps the MLP and the hidden size: heads only
    plan = graphprune.plan(model, x, target_flops=0.9, ignore=mlp)
    q_gone = [i for k in ("0", "1") for i in plan.removed.get(f"model.layers.{k}.self_attn.q_proj.weight", {}).get(0, [])]
    k_gone = [i for k in ("0", "1") for i in plan.removed.get(f"model.layers.{k}.self_attn.k_proj.weight", {}).get(0, [])]
    assert len(q_gone) == 2 * len(k_gone) > 0  # 2 query heads per kv head leave with it
    for layer in ("0", "1"):
        q = plan.removed.get(f"model.layers.{layer}.self_attn.q_proj.weight", {}).get(0, [])
        k = plan.removed.get(f"model.layers.{layer}.self_attn.k_proj.weight", {}).get(0, [])
        assert {i // 16 // 2 for i in q} == {i // 16 for i in k}
    assert torch.allclose(run(plan.apply(model), x)[0], run(plan.mask(model), x)[0], rtol=1e-4, atol=1e-5)
    assert {r["kind"] for r in plan.rewrites} == {"heads"}


def test_eager_attention_at_batch_3_keeps_heads_prunable():
    """Eager attention's torch.matmul decomposes into a bmm over (batch x heads) folded into one axis for batch > 1;
    recorded whole, heads still go, and the slim model matches the mask at other batch sizes and lengths."""
    torch.manual_seed(0)
    model = _causal(T.LlamaForCausalLM, T.LlamaConfig, attn_implementation="eager")().eval()
    x = {"input_ids": torch.randint(0, V, (3, 12))}
    plan = graphprune.plan(model, x, target_flops=0.9, ignore=["model.layers.0.mlp", "model.layers.1.mlp"])
    assert any(r["kind"] == "heads" and r["after"] < r["before"] for r in plan.rewrites)
    slim, masked = plan.apply(model), plan.mask(model)
    for other in (x, {"input_ids": torch.randint(0, V, (2, 7))}):
        assert torch.allclose(run(slim, other)[0], run(masked, other)[0], rtol=1e-4, atol=1e-5)


def test_llama_rms_normalized_hidden_size_goes_exactly():
    _, model, x = _build("llama")
    plan = graphprune.plan(model, x, target_flops=0.5)
    hidden = plan.removed["model.embed_tokens.weight"][1]
    assert hidden and plan.removed["model.norm.weight"][0] == hidden
    assert {r["kind"] for r in plan.rewrites} >= {"rms"}
    slim = plan.apply(model)
    assert torch.allclose(run(slim, x)[0], run(plan.mask(model), x)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(set(MODELS) - {"swin"}))
def test_uniform_plans_round_trip_through_save_pretrained(name, tmp_path):
    _, model, x = _build(name)
    plan = graphprune.plan(model, x, target_flops=0.75, uniform=True)
    assert abs(plan.flops_ratio - 0.75) <= 0.01
    slim = plan.apply(model)
    for group in _roles(plan):  # every layer keeps the same width per role
        assert len(group) == 1
    slim.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()  # plain transformers, no graphprune code
    # the same weights; kernels may round differently (seen: ViT 1.5e-8)
    assert torch.allclose(_first(run(loaded, x)), _first(run(slim, x)), rtol=1e-5, atol=1e-6)
    if name in CAUSAL:
        assert loaded.generate(x["input_ids"][:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 7)


def test_compensated_uniform_llama_round_trips_through_save_pretrained(tmp_path):
    """Compensation gives down_proj a bias LLaMA has no field for alone: mlp_bias=True describes it, and the
    gate/up biases that flag also builds are zeros, so the loaded model computes exactly the same."""
    torch.manual_seed(0)
    model = _causal(T.LlamaForCausalLM, T.LlamaConfig)().eval()
    batches = [{"input_ids": _ids(32)} for _ in range(4)]
    plan = graphprune.plan(model, batches[0], target_flops=0.7, uniform=True, importance="flap",
                           calibration=batches, compensate=True)
    assert plan.added  # compensation created biases
    slim = plan.apply(model)
    assert slim.config.mlp_bias and not model.config.mlp_bias
    assert torch.equal(slim.model.layers[0].mlp.gate_proj.bias, torch.zeros_like(slim.model.layers[0].mlp.gate_proj.bias))
    x = batches[1]
    assert torch.allclose(run(slim, x)[0], run(plan.mask(model), x)[0], rtol=1e-4, atol=1e-5)
    slim.save_pretrained(tmp_path)
    loaded = T.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(run(loaded, x)[0], run(slim, x)[0], rtol=1e-5, atol=1e-6)


def test_uniform_hidden_width_stays_a_multiple_the_config_accepts(tmp_path):
    """LLaMA's config requires hidden_size to be a multiple of the head count even with head_dim explicit: the
    hidden width loses whole multiples of 4 heads' worth, so save_pretrained / from_pretrained still work."""
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = T.LlamaForCausalLM(config).eval()
    x = {"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))}
    slim = graphprune.prune(model, x, target_params=0.5, uniform=True)
    assert slim.config.hidden_size < 64 and slim.config.hidden_size % 4 == 0
    slim.save_pretrained(tmp_path)
    loaded = T.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(run(loaded, x)[0], run(slim, x)[0], rtol=1e-5, atol=1e-6)


def test_compensated_llama_with_layers_of_different_widths_keeps_its_config():
    """No config describes per-layer widths: the added biases stay the only new tensors, the config is left
    as it was, and the model matches the masked one (graphprune.save is the way to store it)."""
    torch.manual_seed(0)
    model = _causal(T.LlamaForCausalLM, T.LlamaConfig)().eval()
    batches = [{"input_ids": _ids(32)} for _ in range(4)]
    plan = graphprune.plan(model, batches[0], target_flops=0.6, importance="wanda", calibration=batches,
                           compensate=True)
    slim = plan.apply(model)
    biases = {n for n, _ in slim.named_parameters() if n.endswith(".bias")}
    assert biases == {b for b, _, _ in plan.added} and not slim.config.mlp_bias
    x = batches[1]
    assert torch.allclose(run(slim, x)[0], run(plan.mask(model), x)[0], rtol=1e-4, atol=1e-5)


def test_uniform_refuses_widths_the_config_cannot_describe():
    _, model, x = _build("swin")  # MLP width is mlp_ratio x embed_dim, a float ratio: nothing to write back
    with pytest.raises(graphprune.BudgetError, match="uniform=True"):
        graphprune.plan(model, x, target_flops=0.75, uniform=True)


def _roles(plan):
    import re

    widths: dict[str, set[int]] = {}
    for row in plan.groups:
        role = re.sub(r"\.\d+\.", ".#.", row["group"].split(",")[0])
        widths.setdefault(role, set()).add(row["after"])
    return list(widths.values())


def test_tied_input_and_output_embeddings_shrink_together():
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             tie_word_embeddings=True)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x = {"input_ids": _ids()}
    plan = graphprune.plan(model, x, target_flops=0.5)
    assert plan.removed["model.embed_tokens.weight"].get(1)  # the hidden size shrinks
    slim = plan.apply(model)
    assert slim.lm_head.weight is slim.model.embed_tokens.weight  # still tied, both sliced
    assert torch.allclose(run(slim, x)[0], run(plan.mask(model), x)[0], rtol=1e-4, atol=1e-5)


def test_gemma_rms_norm_of_one_plus_weight_goes_exactly():
    """Gemma's norms scale by (1 + w): the plan records that form and the backend rescales 1 + w, not w."""
    torch.manual_seed(0)
    model = T.GemmaForCausalLM(T.GemmaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    with torch.no_grad():  # trained norms are not all zero
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    x = {"input_ids": _ids()}
    plan = graphprune.plan(model, x, target_flops=0.6)
    assert abs(plan.flops_ratio - 0.6) <= 0.01
    assert plan.removed["model.norm.weight"][0] == plan.removed["model.embed_tokens.weight"][1]
    rms = [r for r in plan.rewrites if r["kind"] == "rms"]
    assert rms and all(r["offset"] == 1.0 for r in rms)
    slim = graphprune.prune(model, x, target_flops=0.6)
    assert type(slim) is T.GemmaForCausalLM  # the module itself, not the regenerated graph
    assert torch.allclose(run(slim, x).logits, run(plan.mask(model), x).logits, rtol=1e-4, atol=1e-5)


def test_swin_relative_position_bias_lets_heads_go():
    """Swin indexes a (positions, heads) bias table by a position buffer: the heads axis passes through."""
    torch.manual_seed(0)
    model = T.SwinModel(T.SwinConfig(image_size=32, patch_size=2, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                     window_size=4)).eval()
    x = {"pixel_values": torch.randn(1, 3, 32, 32)}
    plan = graphprune.plan(model, x, target_flops=0.6)
    assert abs(plan.flops_ratio - 0.6) <= 0.01
    heads = [r for r in plan.rewrites if r["kind"] == "heads"]
    assert heads and all(r["after"] < r["before"] for r in heads)
    tables = [n for n in plan.removed if n.endswith("relative_position_bias_table")]
    assert tables and all(plan.removed[n].keys() == {1} for n in tables)  # heads columns, never positions
    slim = plan.apply(model)
    out, ref = run(slim, x).last_hidden_state, run(plan.mask(model), x).last_hidden_state
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_causal_lm_widths_are_multiples_of_64_by_default():
    """round_to="auto" rounds a causal LM's MLP widths to multiples of 64 (what GPU GEMM kernels tile); the same
    decoder without the LM head (it does not generate) keeps the general rule, multiples of 8."""
    config = T.LlamaConfig(hidden_size=64, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=V)
    widths = {}
    for cls in (T.LlamaForCausalLM, T.LlamaModel):
        torch.manual_seed(0)
        model = cls(config).eval()
        decoder = getattr(model, "model", model)
        slim = graphprune.prune(model, {"input_ids": _ids()}, target_params=0.8, ignore=[decoder.embed_tokens])
        widths[cls] = [layer.mlp.gate_proj.out_features for layer in getattr(slim, "model", slim).layers]
    assert all(w % 64 == 0 for w in widths[T.LlamaForCausalLM]) and min(widths[T.LlamaForCausalLM]) < 1024
    assert all(w % 8 == 0 for w in widths[T.LlamaModel]) and any(w % 64 for w in widths[T.LlamaModel])
