"""Prune a Hugging Face causal LM with calibration data and save it as an ordinary checkpoint.

A small LLaMA (random init, byte-level vocabulary of 256) is first trained briefly on Python's own
documentation text (`pydoc_data.topics`) so that perplexity means something. graphprune then removes 20%
of its parameters with the best retraining-free setting measured (FLAP importance from calibration text,
least-squares compensation, the same widths in every layer), and the result is saved with `save_pretrained`,
reloaded with `from_pretrained` (no graphprune needed to load it) and asked to generate. (A model this small
and this briefly trained leans on its embeddings and attention, so losing close to a third of the MLP barely moves its
perplexity; the README's SmolLM2 results show the same setting on a real model.)

    python examples/prune_hf_llm.py [--out DIR]

GRAPHPRUNE_EXAMPLE_SMALL=1 trains for a few steps only (seconds); GRAPHPRUNE_EXAMPLE_OUT sets the output
directory (default ./example-output). Needs transformers. Writes DIR/slim-llm/ (config.json + safetensors).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
from pydoc_data.topics import topics

import torch
import transformers

import graphprune

SMALL = os.environ.get("GRAPHPRUNE_EXAMPLE_SMALL") == "1"
TRAIN_STEPS = 8 if SMALL else 200
SEQ_LEN = 64 if SMALL else 128
CALIBRATION_WINDOWS = 16 if SMALL else 64
HELD_OUT_WINDOWS = 8 if SMALL else 32


def byte_tokens(text: str) -> torch.Tensor:
    """A trivial tokenizer: one token per UTF-8 byte (vocabulary 256), so no tokenizer files are needed."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def windows(ids: torch.Tensor, count: int, length: int, start: int) -> list[dict[str, torch.Tensor]]:
    """`count` consecutive [1, length] batches, as graphprune's calibration and the model take them."""
    return [{"input_ids": ids[start + i * length:start + (i + 1) * length][None]} for i in range(count)]


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    losses = [float(model(**b, labels=b["input_ids"], use_cache=False).loss) for b in batches]
    return math.exp(sum(losses) / len(losses))


def train(model: torch.nn.Module, ids: torch.Tensor, steps: int, batch: int = 8) -> None:
    """A short language-model training run on the first half of the text."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - SEQ_LEN - 1, (batch,), generator=gen)
        x = torch.stack([ids[s:s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("GRAPHPRUNE_EXAMPLE_OUT", "example-output"),
                        help="output directory (default: $GRAPHPRUNE_EXAMPLE_OUT or ./example-output)")
    out = pathlib.Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    text = " ".join(topics[k] for k in sorted(topics))
    ids = byte_tokens(text)
    half = len(ids) // 2  # calibrate and train on the first half, measure on the second
    calibration = windows(ids, CALIBRATION_WINDOWS, SEQ_LEN, start=0)
    held_out = windows(ids, HELD_OUT_WINDOWS, SEQ_LEN, start=half)

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    train(model, ids[:half], TRAIN_STEPS)
    dense_ppl = perplexity(model, held_out)
    print(f"dense LLaMA: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, trained "
          f"{TRAIN_STEPS} steps, held-out perplexity {dense_ppl:.2f}")

    # Keep 80% of the parameters: FLAP scores channels from the calibration text, least squares refits the
    # layers that lost inputs, and uniform=True keeps one width per layer type so the HF config describes it.
    slim = graphprune.prune(model, calibration[0], target_params=0.8, importance="flap", calibration=calibration,
                            compensate=True, uniform=True)
    plan = slim.graphprune_plan
    slim_ppl = perplexity(slim, held_out)
    print(f"pruned: params ratio {plan.params_ratio:.3f}, FLOPs ratio {plan.flops_ratio:.3f}")
    print(f"pruned config: intermediate_size {slim.config.intermediate_size}, heads "
          f"{slim.config.num_attention_heads}/{slim.config.num_key_value_heads} (query/KV), "
          f"hidden_size {slim.config.hidden_size}")
    print(f"held-out perplexity: dense {dense_ppl:.2f}, pruned {slim_ppl:.2f} ({slim_ppl / dense_ppl:.2f}x)")

    path = out / "slim-llm"
    slim.save_pretrained(path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(path).eval()  # plain transformers, no graphprune
    x = held_out[0]["input_ids"]
    with torch.no_grad():
        same = torch.allclose(loaded(x).logits, slim(x).logits, rtol=1e-4, atol=1e-5)
    if not same:
        raise SystemExit("the reloaded checkpoint computes something else than the pruned model")
    prompt = byte_tokens("The for statement")[None]
    generated = loaded.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=0)
    continuation = bytes(generated[0, prompt.shape[1]:].tolist()).decode("utf-8", errors="replace")
    print(f"saved to {path}; reloaded with from_pretrained: same outputs")
    print(f"generated {generated.shape[1] - prompt.shape[1]} tokens: 'The for statement{continuation}'")


if __name__ == "__main__":
    main()
