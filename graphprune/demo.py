"""A self-contained demo: train a small residual CNN on scikit-learn's bundled digits, prune it to a FLOPs
budget with graphprune, fine-tune briefly, and compare accuracy, cost and CPU latency before and after.

    python -m graphprune demo --target-flops 0.5

Needs scikit-learn (for ``load_digits``; the data ships with it, nothing is downloaded). Runs in well under
a minute on two CPU cores.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

import graphprune

from .errors import GraphPruneError

__all__ = ["DigitsNet", "load_data", "run"]


class DigitsNet(nn.Module):
    """Small CNN for 8x8 digits with one residual block, so channels are coupled across layers.

    conv2's output, the residual block's 1x1 output (conv4) and the classifier's input are added together,
    so graphprune must prune them as one group; conv1's output and the block's inner width (conv3) are
    independent groups.
    """

    def __init__(self, width: int = 64, stem: int = 32, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.conv2 = nn.Conv2d(stem, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, bias=False)  # residual block: 3x3 ...
        self.bn3 = nn.BatchNorm2d(width)
        self.conv4 = nn.Conv2d(width, width, 1, bias=False)  # ... then 1x1 back to the trunk width
        self.bn4 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool2(self.relu(self.bn1(self.conv1(x))))  # 8x8 -> 4x4
        x = self.relu(self.bn2(self.conv2(x)))
        y = self.relu(self.bn3(self.conv3(x)))
        x = self.relu(self.bn4(self.conv4(y)) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def load_data(seed: int = 0, test_fraction: float = 0.2):
    """The 1797 digits as float tensors [N, 1, 8, 8] in [0, 1], split per class (stratified) by `seed`."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise GraphPruneError("the demo needs scikit-learn for its bundled digits data: pip install scikit-learn") \
            from exc
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    rng = np.random.default_rng(seed)
    test_idx: list[int] = []
    for c in range(int(y.max()) + 1):
        members = np.flatnonzero(digits.target == c)
        rng.shuffle(members)
        test_idx.extend(members[:int(round(test_fraction * len(members)))].tolist())
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test_idx] = True
    train = torch.from_numpy(np.flatnonzero(~is_test))
    test = torch.from_numpy(np.flatnonzero(is_test))
    return (x[train], y[train]), (x[test], y[test])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _train(model: nn.Module, data, epochs: int, lr: float, seed: int, batch_size: int = 64) -> None:
    x, y = data
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, data) -> float:
    x, y = data
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def _latency_ms(model: nn.Module, x: torch.Tensor, runs: int, warmup: int = 10) -> float:
    """Median wall time of one forward pass, in milliseconds."""
    model.eval()
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def _num(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _widths(model: nn.Module) -> dict[str, str]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = f"{m.in_channels}->{m.out_channels}"
        elif isinstance(m, nn.Linear):
            out[name] = f"{m.in_features}->{m.out_features}"
    return out


def _table(result: dict[str, Any]) -> str:
    acc, lat = result["accuracy"], result["latency_ms"]
    rows = [("test accuracy", f"{acc['original']:.2%}", f"{acc['pruned']:.2%} / {acc['finetuned']:.2%}",
             "after pruning / after fine-tune")]
    rows.append(("FLOPs", _num(result["flops"]["before"]), _num(result["flops"]["after"]),
                 f"{result['flops_ratio']:.3f}x"))
    rows.append(("params", _num(result["params"]["before"]), _num(result["params"]["after"]),
                 f"{result['params_ratio']:.3f}x"))
    for batch in sorted(lat["original"]):
        a, b = lat["original"][batch], lat["pruned"][batch]
        rows.append((f"latency, batch {batch} (ms)", f"{a:.3f}", f"{b:.3f}", f"{a / b:.2f}x faster"))
    for layer, before in result["widths"]["original"].items():
        rows.append((f"width {layer}", before, result["widths"]["pruned"][layer], ""))
    w = [max(len(r[i]) for r in rows + [("", "original", "pruned", "")]) for i in range(3)]
    lines = [f"{'':<{w[0]}}  {'original':>{w[1]}}  {'pruned':>{w[2]}}"]
    lines += [f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}  {d}".rstrip() for a, b, c, d in rows]
    return "\n".join(lines)


def run(target_flops: float = 0.5, epochs: int = 8, finetune_epochs: int = 3, seed: int = 0, *,
        latency_runs: int = 200, threads: int = 1, file: TextIO | None = None) -> dict[str, Any]:
    """Train, prune to `target_flops` of the original FLOPs, fine-tune, and report.

    Training runs on `threads` CPU threads (one is fastest for a model this small) and latency is always
    timed on one; torch's thread setting is restored afterwards. Prints the plan summary and a
    before/after table to `file` (standard output by default) and returns the numbers as a dict:
    accuracy (original / pruned / finetuned), flops and params (before / after), flops_ratio,
    params_ratio, latency_ms ({"original"|"pruned": {batch: ms}}), widths, summary, roundtrip_ok, seconds,
    and the trained `model` and fine-tuned `pruned_model` themselves.
    """
    if isinstance(target_flops, bool) or not isinstance(target_flops, (int, float)) \
            or not 0 < target_flops <= 1:
        raise ValueError(f"target_flops must be a number in (0, 1] (the fraction of FLOPs to keep), got "
                         f"{target_flops!r}")
    for name, value, least in (("epochs", epochs, 1), ("finetune_epochs", finetune_epochs, 0),
                               ("latency_runs", latency_runs, 1), ("threads", threads, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    with _torch_threads(threads):
        return _run(float(target_flops), epochs, finetune_epochs, seed, latency_runs,
                    file if file is not None else sys.stdout)


def _run(target_flops: float, epochs: int, finetune_epochs: int, seed: int, latency_runs: int,
         out: TextIO) -> dict[str, Any]:
    def say(*parts: Any) -> None:
        print(*parts, file=out, flush=True)

    started = time.perf_counter()
    _seed_everything(seed)
    train, test = load_data(seed)
    say(f"digits: {len(train[0])} train / {len(test[0])} test images (8x8, 10 classes), seed {seed}")

    model = DigitsNet()
    t0 = time.perf_counter()
    _train(model, train, epochs, lr=1e-2, seed=seed)
    acc_original = _accuracy(model, test)
    say(f"trained {epochs} epochs in {time.perf_counter() - t0:.1f} s: test accuracy {acc_original:.2%}")

    example = test[0][:1]
    plan = graphprune.plan(model, example, target_flops=target_flops)
    say("")
    say(plan.summary())
    slim = plan.apply(model)
    acc_pruned = _accuracy(slim, test)

    t0 = time.perf_counter()
    if finetune_epochs:
        _train(slim, train, finetune_epochs, lr=2e-3, seed=seed + 1)
    acc_finetuned = _accuracy(slim, test)
    say(f"\nfine-tuned the pruned model {finetune_epochs} epochs in {time.perf_counter() - t0:.1f} s")

    latency: dict[str, dict[int, float]] = {"original": {}, "pruned": {}}
    with _torch_threads(1):
        for batch in (1, 64):
            x = test[0][:batch]
            latency["original"][batch] = _latency_ms(model, x, latency_runs)
            latency["pruned"][batch] = _latency_ms(slim, x, latency_runs)

    with tempfile.TemporaryDirectory(prefix="graphprune-demo-") as tmp:
        path = os.path.join(tmp, "slim.pt")
        graphprune.save(slim, path, plan=plan)
        loaded = graphprune.load(path, DigitsNet).eval()
        with torch.no_grad():
            same = torch.equal(slim(test[0]), loaded(test[0]))
    if not same:
        raise GraphPruneError("save/load round-trip changed the pruned model's outputs")
    say("save/load round-trip: OK")

    result: dict[str, Any] = {
        "target_flops": target_flops,
        "accuracy": {"original": acc_original, "pruned": acc_pruned, "finetuned": acc_finetuned},
        "flops": dict(plan.flops),
        "params": dict(plan.params),
        "flops_ratio": plan.flops_ratio,
        "params_ratio": plan.params_ratio,
        "latency_ms": latency,
        "widths": {"original": _widths(model), "pruned": _widths(slim)},
        "summary": plan.summary(),
        "roundtrip_ok": same,
        "model": model,
        "pruned_model": slim,
    }
    say("")
    say(_table(result))
    result["seconds"] = time.perf_counter() - started
    say(f"\ndemo finished in {result['seconds']:.1f} s")
    return result
