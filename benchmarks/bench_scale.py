"""How graphprune scales to large LLMs on one machine: the weight-free analysis of a 70B LLaMA config, in-memory
prune()'s memory above the model, and prune-hf on checkpoints written to disk.

``graphprune inspect-hf DIR`` reads only config.json (graphprune/hf_inspect.py): the model is built on the meta
device, 1-, 2- and 3-layer copies are traced and analysed, and the counts are extrapolated to all 80 layers.
This measures that path on the Llama-3-70B config (hidden 8192, intermediate 28672, 80 layers, 64 / 8 GQA
heads, vocabulary 128256, 131072 positions), written to a temporary directory, and with ``--full`` also the
fallback path (the whole 80-layer model traced and analysed on meta), which must give the same numbers.

Each case runs in its own interpreter (2 torch threads) so its peak RSS is its own: wall time of the whole
call (config read, meta builds, traces, analyses; imports excluded) and the process's peak resident memory
(VmHWM, imports of torch and transformers included, about 0.65 GB by themselves).

    .venv/bin/python benchmarks/bench_scale.py            # the extrapolated analysis, about 10 s
    .venv/bin/python benchmarks/bench_scale.py --full     # also the whole-model trace (about 45 s, 8 GB)

``--in-memory`` measures instead what in-memory ``graphprune.prune()`` costs above the model it prunes: a random
LLaMA (default hidden 2048, intermediate 5632, 8 layers, 16 / 4 GQA heads, vocabulary 32000: 492 M parameters,
1.83 GiB in float32) is built and loaded, the process's peak resident memory is reset (``/proc/self/clear_refs``),
and prune() runs at target_params=0.8 on one 1 x 128-token example, plain and with ``importance="flap"``, four
calibration batches of 4 x 128 tokens, ``compensate=True``, ``uniform=True``; each returning a slim copy and with
``inplace=True`` (the model itself slimmed and checked). The table gives the peak (VmHWM)
less the resident memory just before the call, as a multiple of the weights' size; verification stays on.
Each case runs in its own interpreter (2 torch threads).

    .venv/bin/python benchmarks/bench_scale.py --in-memory                       # 492 M, a few minutes
    .venv/bin/python benchmarks/bench_scale.py --in-memory --hidden 1024 --intermediate 2816   # ~150 M

``--checkpoints`` measures ``prune-hf`` (graphprune/hf_prune.py): random LLaMA checkpoints are written to disk in
bfloat16 (2-GB safetensors shards, a tensor at a time): 0.5 B (hidden 1024, intermediate 4096, 24 layers), 1.6 B
(hidden 2048, intermediate 8192, 24 layers, 16 / 4 heads, vocabulary 32000; 3.2 GB) and the same with 12 layers
(does the peak grow with depth?), and 3 B on request. Each is pruned by ``prune_pretrained(target_params=0.8,
importance="flap", compensate=True, uniform=True)`` with 16 x 256 calibration tokens in its own interpreter (2
threads): wall time and the process's peak RSS (VmHWM, not ru_maxrss, which a child inherits from its parent;
imports of torch and transformers included, about 0.6-0.9 GB by themselves), as a multiple of the checkpoint's
size; then the output is loaded with from_pretrained and
generates 4 tokens (after the peak is read). Beside prune-hf, ``--paths`` (default: all three) runs the in-memory
path (the model loaded in bf16, then graphprune.prune with the same options; verification included) and
torch-pruning (the model loaded, magnitude pruning of MLP channels at the ratio that removes 20% of the
parameters), where they finish.

    .venv/bin/python benchmarks/bench_scale.py --checkpoints                       # ~1 hour on 2 idle cores
    .venv/bin/python benchmarks/bench_scale.py --checkpoints --sizes 3B --paths prune-hf
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

LLAMA3_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16",
}

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(2)
from graphprune import hf_inspect as h
from graphprune.hf_prune import peak_rss_bytes
path, mode, seq = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = time.perf_counter()
if mode == "extrapolated":
    r = h.inspect_pretrained(path, seq_len=seq)
else:  # the fallback: the whole model traced and analysed on meta
    config, name = h.load_config(path)
    full = h._build(config)
    stack = h._stack(full, config.num_hidden_layers)
    r = h._inspection(h._summary(full, h._meta_ids(seq), stack), config, name, full, stack,
                      config.num_hidden_layers, seq, "full")
seconds = time.perf_counter() - start
groups = sorted((g.role, g.unit, g.width, g.count) for g in r.groups)
print(json.dumps({"seconds": seconds, "rss_gb": peak_rss_bytes() / 2**30,
                  "flops": r.flops, "params": r.params, "groups": groups, "method": r.method}))
"""


PRUNE_CHILD = r"""
import gc, json, sys, time, torch, transformers
torch.set_num_threads(2)
import graphprune
from graphprune.plan import named_tensors
hidden, inter, layers, case = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                  num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
model = transformers.LlamaForCausalLM(config).eval()
weights = sum(t.numel() * t.element_size() for t in named_tensors(model).values())
ids = torch.randint(0, 32000, (1, 128))
options = {"inplace": case.endswith("inplace")}
if case.startswith("flap"):
    options = dict(importance="flap", calibration=[torch.randint(0, 32000, (4, 128)) for _ in range(4)],
                   compensate=True, uniform=True)
gc.collect()

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) restarts at the current resident size
base = status("VmRSS")
start = time.perf_counter()
slim = graphprune.prune(model, ids, target_params=0.8, **options)
seconds = time.perf_counter() - start
peak = status("VmHWM")
print(json.dumps({"seconds": seconds, "weights": weights, "params": sum(p.numel() for p in model.parameters()),
                  "above": (peak - base) / weights, "ratio": slim.graphprune_plan.params_ratio}))
"""


def run_prune(args, case: str) -> dict:
    cmd = [sys.executable, "-c", PRUNE_CHILD, str(args.hidden), str(args.intermediate), str(args.layers), case]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def in_memory(args) -> None:
    cases = {"plain": "prune(target_params=0.8)", "flap": "flap + calibration + compensate + uniform",
             "plain inplace": "prune(target_params=0.8, inplace=True)",
             "flap inplace": "flap + ... + uniform, inplace=True"}
    rows = {case: run_prune(args, case) for case in cases}
    first = next((r for r in rows.values() if "error" not in r), None)
    if first:
        print(f"random LLaMA, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers: "
              f"{first['params'] / 1e6:.0f} M parameters, {first['weights'] / 2**30:.2f} GiB of weights")
    print(f"{'prune()':<44} {'time s':>7} {'peak above model (x weights)':>29} {'params kept':>12}")
    for case, label in cases.items():
        r = rows[case]
        if "error" in r:
            print(f"{label:<44} {r['error']}")
            continue
        print(f"{label:<44} {r['seconds']:>7.1f} {r['above']:>29.2f} {r['ratio']:>12.3f}")


CHECKPOINT_CHILD = r"""
import json, os, sys, time, torch
torch.set_num_threads(2)
from graphprune.hf_prune import peak_rss_bytes, prune_pretrained
src, out, mode, samples, tokens, propagate = sys.argv[1:7]
ids = torch.randint(0, 32000, (int(samples), int(tokens)), generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
if mode == "prune-hf":
    result = prune_pretrained(src, out, target_params=0.8, importance="flap", compensate=True, uniform=True,
                              calibration=ids, propagate=propagate)
    ratio = result.plan.params_ratio
elif mode == "torch-pruning":  # the model loaded, MLP channels pruned in place at the ratio that removes 20%
    import torch_pruning as tp, transformers
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[7])))
    from bench_llm import TPAdapter
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    channels = 0.2 * total / (3 * c.hidden_size * c.intermediate_size * c.num_hidden_layers)
    adapter = TPAdapter("llama", tp_heads=False)
    model.set_attn_implementation("eager")
    pruner = tp.pruner.BasePruner(model, {"input_ids": ids[:1]}, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  **adapter.kwargs(model, channels))
    for group in pruner.step(interactive=True):
        group.prune()
    ratio = sum(p.numel() for p in adapter.finish(model).parameters()) / total
else:  # the in-memory path: the whole model loaded, then graphprune.prune
    import transformers, graphprune
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    slim = graphprune.prune(model, {"input_ids": ids[:1]}, target_params=0.8, importance="flap", compensate=True,
                            uniform=True, calibration=[{"input_ids": b} for b in ids.split(4)])
    ratio = slim.graphprune_plan.params_ratio
seconds, rss = time.perf_counter() - start, peak_rss_bytes() / 2**30
generates = None
if mode == "prune-hf":  # after the peak is read: the output loads without graphprune and generates
    import transformers
    del result
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    generates = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False).shape[1] == 12
print(json.dumps({"seconds": seconds, "ratio": ratio, "rss_gb": rss, "generates": generates}))
"""


def write_checkpoint(folder: str, hidden: int, intermediate: int, layers: int) -> int:
    """A random LLaMA checkpoint in bfloat16, 2-GB shards, written a tensor at a time; returns its bytes."""
    import torch
    import transformers

    from graphprune.hf_prune import _skeleton
    from graphprune.shards import ShardWriter

    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                      num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                                      dtype="bfloat16")
    os.makedirs(folder)
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    total = 0
    with ShardWriter(folder) as writer:
        for name, p in _skeleton(config).named_parameters():
            t = torch.ones(p.shape) if p.ndim == 1 else torch.randn(p.shape, generator=gen) * 0.02
            writer.add(name, t.to(torch.bfloat16))
            total += 2 * t.numel()
    return total


def checkpoints(args) -> None:
    sizes = {"0.5B": (1024, 4096, 24), "1.6B/12": (2048, 8192, 12), "1.6B": (2048, 8192, 24),
             "3B": (2560, 10240, 32)}
    chosen = [s for s in args.sizes.split(",")]
    print(f"prune-hf vs in-memory prune(): target_params=0.8, flap + compensate + uniform, "
          f"{args.samples} x {args.tokens} calibration tokens, bf16 checkpoints, 2 threads")
    print(f"{'checkpoint':<10} {'GB':>6} {'path':<22} {'time s':>7} {'peak RSS GB':>12} {'x checkpoint':>13} "
          f"{'params kept':>12} {'loads+generates':>16}")
    for key in chosen:
        hidden, inter, layers = sizes[key]
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            src = os.path.join(tmp, "src")
            size = write_checkpoint(src, hidden, inter, layers)
            for mode in args.paths.split(","):
                out = os.path.join(tmp, f"out-{mode}")
                cmd = [sys.executable, "-c", CHECKPOINT_CHILD, src, out, mode, str(args.samples), str(args.tokens),
                       args.propagate, os.path.abspath(__file__)]
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
                    r = (json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else
                         {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]})
                except subprocess.TimeoutExpired:
                    r = {"error": f"timed out after {args.timeout} s"}
                label = f"{key} ({layers} layers)"
                if "error" in r:
                    print(f"{label:<10} {size / 1e9:>6.2f} {mode:<22} {r['error']}", flush=True)
                    continue
                print(f"{label:<10} {size / 1e9:>6.2f} {mode:<22} {r['seconds']:>7.1f} {r['rss_gb']:>12.2f} "
                      f"{r['rss_gb'] * 2**30 / size:>13.2f} {r['ratio']:>12.3f} {str(r['generates']):>16}", flush=True)


def run(path: str, mode: str, seq_len: int, timeout: int) -> dict:
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, path, mode, str(seq_len)], capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="also trace the whole 80-layer model (8 GB)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens traced (default: %(default)s)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per case (default: %(default)s)")
    parser.add_argument("--in-memory", action="store_true",
                        help="peak memory of in-memory prune() on a random LLaMA, above the loaded model")
    parser.add_argument("--hidden", type=int, default=2048, help="--in-memory: hidden size (default: %(default)s)")
    parser.add_argument("--intermediate", type=int, default=5632,
                        help="--in-memory: MLP width (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=8, help="--in-memory: layers (default: %(default)s)")
    parser.add_argument("--checkpoints", action="store_true",
                        help="prune-hf on random bf16 LLaMA checkpoints written to disk (peak RSS, time)")
    parser.add_argument("--sizes", default="0.5B,1.6B/12,1.6B", help="--checkpoints: which (default: %(default)s; "
                        "also 3B)")
    parser.add_argument("--samples", type=int, default=16, help="--checkpoints: calibration windows")
    parser.add_argument("--tokens", type=int, default=256, help="--checkpoints: tokens per window")
    parser.add_argument("--propagate", default="dense", choices=["dense", "pruned"])
    parser.add_argument("--paths", default="prune-hf,in-memory,torch-pruning",
                        help="--checkpoints: which to run on each (default: %(default)s; in-memory loads the whole "
                             "model and runs graphprune.prune, torch-pruning prunes its MLP channels by magnitude)")
    parser.add_argument("--tmp", default=None, help="--checkpoints: where to write them (default: the temp dir)")
    args = parser.parse_args()
    unknown = set(args.paths.split(",")) - {"prune-hf", "in-memory", "torch-pruning"}
    if unknown:
        parser.error(f"--paths: unknown {', '.join(sorted(unknown))}")
    if args.checkpoints:
        checkpoints(args)
        return
    if args.in_memory:
        in_memory(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "Llama-3-70B")
        os.makedirs(folder)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(LLAMA3_70B, f)
        modes = ["extrapolated"] + (["full"] if args.full else [])
        rows = {mode: run(folder, mode, args.seq_len, args.timeout) for mode in modes}
    print(f"Llama-3-70B config, weight-free analysis ({args.seq_len} tokens, batch 1)")
    print(f"{'method':<40} {'time s':>7} {'peak RSS GB':>12} {'FLOPs/token':>14} {'params':>16}")
    for mode, r in rows.items():
        label = "1/2/3-layer traces, extrapolated" if mode == "extrapolated" else "whole 80-layer meta trace"
        if "error" in r:
            print(f"{label:<40} {r['error']}")
            continue
        print(f"{label:<40} {r['seconds']:>7.1f} {r['rss_gb']:>12.2f} {r['flops'] / args.seq_len:>14,.0f} "
              f"{r['params']:>16,}")
    ok = [r for r in rows.values() if "error" not in r]
    if len(ok) == 2:
        same = all(ok[0][k] == ok[1][k] for k in ("flops", "params", "groups"))
        print("extrapolated == whole trace (FLOPs, params, groups):", same)


if __name__ == "__main__":
    main()
