"""How graphprune scales to large LLMs on one machine. For now: the weight-free analysis of a 70B LLaMA config.

``graphprune inspect-hf DIR`` reads only config.json (graphprune/hf_inspect.py): the model is built on the meta
device, 1-, 2- and 3-layer copies are traced and analysed, and the counts are extrapolated to all 80 layers.
This measures that path on the Llama-3-70B config (hidden 8192, intermediate 28672, 80 layers, 64 / 8 GQA
heads, vocabulary 128256, 131072 positions), written to a temporary directory, and with ``--full`` also the
fallback path (the whole 80-layer model traced and analysed on meta), which must give the same numbers.

Each case runs in its own interpreter (2 torch threads) so its peak RSS is its own: wall time of the whole
call (config read, meta builds, traces, analyses; imports excluded) and the process's peak resident memory
(ru_maxrss, imports of torch and transformers included, about 0.65 GB by themselves).

    .venv/bin/python benchmarks/bench_scale.py            # the extrapolated analysis, about 10 s
    .venv/bin/python benchmarks/bench_scale.py --full     # also the whole-model trace (about 45 s, 8 GB)
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
import json, resource, sys, time, torch
torch.set_num_threads(2)
from graphprune import hf_inspect as h
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
print(json.dumps({"seconds": seconds, "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "flops": r.flops, "params": r.params, "groups": groups, "method": r.method}))
"""


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
    parser.add_argument("--timeout", type=int, default=300, help="seconds per case (default: %(default)s)")
    args = parser.parse_args()
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
