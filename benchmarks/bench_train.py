"""Training-aware pruning quality: graphprune (one-shot + fine-tune, HESSO) vs Torch-Pruning sparse learning.

What is measured, per dataset, FLOPs target (0.5 and 0.3 of the dense model's FLOPs) and method, over
``--seeds`` seeds (mean +- std): test accuracy of the final model, its FLOPs ratio (``graphprune.count_flops``
for every model, so one counter), its CPU latency (batch 64, eval mode, no_grad, median of 30 runs after 10
warm-up runs) and the test accuracy after every epoch (plotted). Every method gets the same total number of
epochs E and the same base recipe (SGD, momentum 0.9, Nesterov, weight decay 5e-4, cosine LR restarted for
every training phase, per-dataset LR and batch size):

* dense:          E epochs.
* gp-<imp>:       E/2 dense epochs, ``graphprune.prune(model, x, target_flops=R, importance=imp)`` with
                  imp in l2, taylor (calibration (x, y) batches + loss_fn), obs (calibration x batches; 512
                  training samples), and obs+ls (obs with compensate=True, the least-squares update that
                  obs's score assumes), then E/2 epochs of fine-tuning the slim model. The E/2-epoch dense
                  model is shared by these rows.
* gp-hesso:       ``graphprune.HESSO`` around the same SGD for E epochs: dense warm-up E/4 epochs, pruning
                  periods over E/2 epochs, E/4 epochs holding the pruned channels at zero; the result is
                  ``opt.slim()`` (checked to compute what the trained model computes).
* tp-groupnorm:   Torch-Pruning's sparse learning (DepGraph): E/2 epochs with ``GroupNormPruner.regularize``
                  after every backward (reg 5e-4), then global pruning of that model with
                  ``GroupMagnitudeImportance(p=2)``, classifier ignored, max_pruning_ratio 0.9, the channel
                  ``pruning_ratio`` found by bisection so FLOPs land at the target, then E/2 fine-tune epochs.

Datasets (nothing is downloaded): mnist1d (``make_dataset(get_dataset_args())``: 4000 / 1000 40-sample
signals, 10 classes) with a residual 1-D CNN (width 64, 3 residual blocks); sklearn digits with
``graphprune.demo.DigitsNet`` and ``graphprune.demo.load_data`` (split seed 0). Seeds change the
initialization and the data order, not the data. Everything runs on 2 torch threads.

Run (from the repository root):

    .venv/bin/python benchmarks/bench_train.py             # 3 seeds, both datasets, E = 10 (~4 min on 2 cores)
    .venv/bin/python benchmarks/bench_train.py --epochs 40 # a long budget: every method recovers (~12 min)
    .venv/bin/python benchmarks/bench_train.py --quick     # smoke run: 1 seed, 8 epochs, mnist1d, no files

Prints the table; a full run writes it to benchmarks/results_train.md and the accuracy-per-epoch curves
(mean over seeds, one panel per dataset x target) to benchmarks/train_curves.png.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import graphprune

HERE = os.path.dirname(os.path.abspath(__file__))
THREADS = 2
TARGETS = (0.5, 0.3)
IMPORTANCES = ("l2", "taylor", "obs", "obs+ls")
RECIPES = {"mnist1d": dict(lr=0.1, batch=128), "digits": dict(lr=0.05, batch=64)}
TP_REG = 5e-4
HESSO_PERIODS = 10
CALIB_SAMPLES = 512
NOTES = ("FLOPs by `graphprune.count_flops` for every model. Latency: batch 64, eval, no_grad, median of 30 runs (a "
         "seed's models in turns) on 2 threads of a shared machine. 'after pruning' is the test accuracy right after "
         "the cut (before fine-tuning); for gp-hesso the column compares `opt.slim()`'s accuracy with the trained "
         "(zeroed, unsliced) model's and gives their largest logit difference over the test set and seeds. "
         "gp-obs+ls: importance='obs' with compensate=True. Curves (mean over seeds): train_curves.png.")


def say(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ----- data and models ---------------------------------------------------------------------------------

def load(name: str):
    """((x_train, y_train), (x_test, y_test)) as float / long tensors."""
    if name == "digits":
        from graphprune.demo import load_data
        return load_data(0)
    from mnist1d.data import get_dataset_args, make_dataset
    d = make_dataset(get_dataset_args())
    as_x = lambda a: torch.tensor(a, dtype=torch.float32).unsqueeze(1)  # noqa: E731
    return (as_x(d["x"]), torch.tensor(d["y"])), (as_x(d["x_test"]), torch.tensor(d["y_test"]))


class Block1d(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv1d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(width)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class MNIST1DNet(nn.Module):
    """Residual 1-D CNN: stem, 3 blocks (max-pool 40 -> 20 after the first), global average pool, Linear."""

    def __init__(self, width: int = 64, blocks: int = 3, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, width, 5, padding=2, bias=False), nn.BatchNorm1d(width), nn.ReLU())
        self.blocks = nn.ModuleList(Block1d(width) for _ in range(blocks))
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == 0:
                x = F.max_pool1d(x, 2)
        return self.fc(x.mean(-1))


def make_model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "digits":
        from graphprune.demo import DigitsNet
        return DigitsNet()
    return MNIST1DNet()


# ----- training and measuring --------------------------------------------------------------------------

def sgd(model: nn.Module, recipe: dict) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=0.9, weight_decay=5e-4, nesterov=True)


def steps_per_epoch(train, recipe) -> int:
    return math.ceil(len(train[0]) / recipe["batch"])


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    return 100.0 * float((model(data[0]).argmax(1) == data[1]).float().mean())


def fit(model, train, test, epochs, recipe, seed, opt=None, after_backward=None) -> list[float]:
    """Train `epochs` epochs (cosine LR over all steps); returns the test accuracy after each epoch."""
    opt = opt if opt is not None else sgd(model, recipe)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch(train, recipe)))
    gen = torch.Generator().manual_seed(seed)
    x, y, bs = train[0], train[1], recipe["batch"]
    curve = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), bs):
            idx = order[start:start + bs]
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            if after_backward is not None:
                after_backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        curve.append(accuracy(model, test))
    return curve


@torch.no_grad()
def latencies_ms(models: list[nn.Module], x: torch.Tensor, runs: int = 30, warmup: int = 10) -> list[float]:
    """Median forward time of each model; the models take turns, so load changes on the machine hit all alike."""
    for m in models:
        m.eval()
        for _ in range(warmup):
            m(x)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(runs):
        for m, t in zip(models, times):
            t0 = time.perf_counter()
            m(x)
            t.append(time.perf_counter() - t0)
    return [1000.0 * statistics.median(t) for t in times]


def measure(model, ctx, curve, started, **extra) -> dict:
    """Accuracy, FLOPs ratio and curve; latency is timed later, for all of a seed's models together."""
    flops = graphprune.count_flops(model, ctx["example"]) / ctx["dense_flops"]
    return dict(acc=accuracy(model, ctx["test"]), flops=flops, model=model, curve=curve,
                seconds=time.perf_counter() - started, **extra)


# ----- methods -----------------------------------------------------------------------------------------

def run_dense(ctx, seed):
    t0 = time.perf_counter()
    model = make_model(ctx["name"], seed)
    curve = fit(model, ctx["train"], ctx["test"], ctx["E"], ctx["recipe"], seed)
    return measure(model, ctx, curve, t0)


def first_half(ctx, seed, regularize=False):
    """The E/2-epoch model that the two-phase rows start from, shared by their targets: dense (graphprune
    one-shot) or trained with DepGraph's group-norm regularization after every backward (tp-groupnorm)."""
    import torch_pruning as tp
    t0 = time.perf_counter()
    model, hook = make_model(ctx["name"], seed), None
    if regularize:
        pruner = tp.pruner.GroupNormPruner(model, ctx["example"], tp.importance.GroupMagnitudeImportance(p=2),
                                           reg=TP_REG, global_pruning=True, ignored_layers=[model.fc])
        pruner.update_regularizer()
        hook = lambda: pruner.regularize(model)  # noqa: E731
    curve = fit(model, ctx["train"], ctx["test"], ctx["E"] // 2, ctx["recipe"], seed, after_backward=hook)
    return model, curve, time.perf_counter() - t0


def second_half(ctx, seed, start, slim, t0, **extra):
    """Fine-tune the pruned model for the other E/2 epochs and measure it (wall time includes the first half)."""
    pruned = accuracy(slim, ctx["test"])
    curve = fit(slim, ctx["train"], ctx["test"], ctx["E"] - ctx["E"] // 2, ctx["recipe"], seed + 1)
    result = measure(slim, ctx, start[1] + curve, t0, pruned_acc=pruned, **extra)
    result["seconds"] += start[2]
    return result


def run_oneshot(ctx, seed, start, target, importance):
    t0 = time.perf_counter()
    (x, y), bs = ctx["train"], ctx["recipe"]["batch"]
    calib = [(x[i:i + bs], y[i:i + bs]) for i in range(0, min(len(x), CALIB_SAMPLES), bs)]
    importance, _, ls = importance.partition("+")
    options = dict(target_flops=target, importance=importance, compensate=bool(ls))
    if importance == "taylor":
        options.update(calibration=calib, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    elif importance == "obs":
        options.update(calibration=[b[0] for b in calib])
    return second_half(ctx, seed, start, graphprune.prune(start[0], ctx["example"], **options), t0)


def run_hesso(ctx, seed, target):
    t0 = time.perf_counter()
    E, spe = ctx["E"], steps_per_epoch(ctx["train"], ctx["recipe"])
    model = make_model(ctx["name"], seed)
    base = sgd(model, ctx["recipe"])
    opt = graphprune.HESSO(model, ctx["example"], base, target_flops=target, start_step=(E // 4) * spe,
                           pruning_steps=(E // 2) * spe, pruning_periods=min(HESSO_PERIODS, E // 2))
    curve = fit(model, ctx["train"], ctx["test"], E, ctx["recipe"], seed, opt=opt)
    status = opt.status()
    slim = opt.slim()
    trained_acc = accuracy(model, ctx["test"])
    with torch.no_grad():
        model.eval(), slim.eval()
        diff = float((model(ctx["test"][0]) - slim(ctx["test"][0])).abs().max())
    return measure(slim, ctx, curve, t0, trained_acc=trained_acc, slim_diff=diff, status=status)


def tp_prune_to(model, ctx, target, trials: int = 14):
    """Global group-norm pruning of a copy, the channel ratio bisected so FLOPs land at or under target."""
    import torch_pruning as tp

    def cut(ratio):
        m = copy.deepcopy(model)
        tp.pruner.GroupNormPruner(m, ctx["example"], tp.importance.GroupMagnitudeImportance(p=2),
                                  global_pruning=True, pruning_ratio=ratio, max_pruning_ratio=0.9,
                                  ignored_layers=[m.fc]).step()
        return m, graphprune.count_flops(m, ctx["example"]) / ctx["dense_flops"]

    lo, hi = 0.0, 0.9
    best, _ = cut(hi)
    for _ in range(trials):
        mid = (lo + hi) / 2
        m, flops = cut(mid)
        if flops > target:
            lo = mid
        else:
            hi, best = mid, m
    return best, hi


def run_tp(ctx, seed, start, target):
    t0 = time.perf_counter()
    slim, ratio = tp_prune_to(start[0], ctx, target)
    return second_half(ctx, seed, start, slim, t0, tp_ratio=ratio)


# ----- the benchmark -----------------------------------------------------------------------------------

def available_methods() -> list[str]:
    methods = ["dense"]
    x = torch.randn(4, 1, 40)
    for imp in IMPORTANCES:
        if "+" in imp:
            if f"gp-{imp.partition('+')[0]}" in methods:
                methods.append(f"gp-{imp}")
            continue
        try:
            graphprune.plan(MNIST1DNet(), x[:1], target_flops=0.5, importance=imp, calibration=[x],
                            loss_fn=lambda m, b: m(b).sum())
            methods.append(f"gp-{imp}")
        except Exception as err:  # noqa: BLE001 - report and skip the row
            say(f"note: skipping importance={imp!r}: {type(err).__name__}: {err}")
    if hasattr(graphprune, "HESSO"):
        methods.append("gp-hesso")
    else:
        say("note: graphprune.HESSO does not exist (yet); skipping the HESSO rows")
    return methods + ["tp-groupnorm"]


def run_dataset(name, epochs, seeds, methods) -> dict:
    train, test = load(name)
    ctx = dict(name=name, train=train, test=test, E=epochs, recipe=RECIPES[name], example=test[0][:1])
    ctx["dense_flops"] = graphprune.count_flops(make_model(name, 0), ctx["example"])
    results: dict = {}
    add = lambda target, method, r: results.setdefault((name, target, method), []).append(r)  # noqa: E731
    for seed in range(seeds):
        r = run_dense(ctx, seed)
        add(1.0, "dense", r)
        say(f"[{name} seed {seed}] dense: {r['acc']:.2f}% ({r['seconds']:.0f} s)")
        pre = first_half(ctx, seed) if any(m.startswith("gp-") and m != "gp-hesso" for m in methods) else None
        reg = first_half(ctx, seed, regularize=True)
        for target in TARGETS:
            for method in methods[1:]:
                if method == "gp-hesso":
                    r = run_hesso(ctx, seed, target)
                elif method == "tp-groupnorm":
                    r = run_tp(ctx, seed, reg, target)
                else:
                    r = run_oneshot(ctx, seed, pre, target, method[3:])
                add(target, method, r)
                extra = "".join(f", {k} {r[k]:.3g}" for k in ("pruned_acc", "trained_acc", "slim_diff", "tp_ratio")
                                if k in r)
                say(f"[{name} seed {seed}] {target} {method}: {r['acc']:.2f}%, FLOPs {r['flops']:.3f}{extra} "
                    f"({r['seconds']:.0f} s)")
                if "status" in r:
                    say(f"    hesso status: {r['status']}")
        rows = [rs[-1] for rs in results.values()]
        for r, ms in zip(rows, latencies_ms([r.pop("model") for r in rows], test[0][:64])):
            r["lat"] = ms
    return results


def pm(values, fmt="{:.2f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def table(results) -> str:
    lines = ["| dataset | target | method | accuracy % (mean ± std) | FLOPs ratio | latency ms (batch 64) "
             "| after pruning, before fine-tune % | wall s per seed |", "|---|---|---|---|---|---|---|---|"]
    for (name, target, method), rs in results.items():
        after = pm([r["pruned_acc"] for r in rs]) if "pruned_acc" in rs[0] else ""
        if "trained_acc" in rs[0]:
            after = (f"slim() {pm([r['acc'] for r in rs])}, trained model {pm([r['trained_acc'] for r in rs])}; "
                     f"max logit diff {max(r['slim_diff'] for r in rs):.1e}")
        lines.append(f"| {name} | {'—' if target == 1.0 else target} | {method} | {pm([r['acc'] for r in rs])} | "
                     f"{pm([r['flops'] for r in rs], '{:.3f}')} | {pm([r['lat'] for r in rs], '{:.3f}')} | "
                     f"{after} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    return "\n".join(lines)


def plot(results, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(k[0] for k in results))
    fig, axes = plt.subplots(len(names), len(TARGETS), figsize=(6 * len(TARGETS), 4 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        for j, target in enumerate(TARGETS):
            ax = axes[i][j]
            for (n, t, method), rs in results.items():
                if n != name or t not in (1.0, target):
                    continue
                curve = [statistics.mean(c) for c in zip(*(r["curve"] for r in rs))]
                ax.plot(range(1, len(curve) + 1), curve, label=method, ls="--" if method == "dense" else "-")
            lows = [min(r["curve"][-1] for r in rs) for (n, _, _), rs in results.items() if n == name]
            ax.set_ylim(max(0.0, min(lows) - 10), 100.5)
            ax.set(title=f"{name}, target FLOPs {target}", xlabel="epoch", ylabel="test accuracy %")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> str:
    import subprocess

    import torch_pruning as tp
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    return (f"graphprune: the working tree at run time, on git {head.stdout.strip() or '?'}; "
            f"{os.cpu_count()} CPUs ({platform.machine()}), {THREADS} torch threads; torch {torch.__version__}, "
            f"torch-pruning {tp.__version__}, Python {platform.python_version()}; load average at start "
            f"{os.getloadavg()[0]:.2f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 8 epochs, mnist1d only, writes no files")
    ap.add_argument("--seeds", type=int, default=None, help="seeds (default 3, quick 1)")
    ap.add_argument("--epochs", type=int, default=None, help="total epochs E per row (default 10, quick 8)")
    ap.add_argument("--datasets", nargs="+", choices=sorted(RECIPES), default=None)
    ap.add_argument("--out", default=None, help="markdown output (default benchmarks/results_train.md; none if quick)")
    ap.add_argument("--png", default=None, help="curves output (default benchmarks/train_curves.png; none if quick)")
    args = ap.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 3)
    epochs = args.epochs or (8 if args.quick else 10)
    datasets = args.datasets or (["mnist1d"] if args.quick else ["mnist1d", "digits"])
    out = args.out or (None if args.quick else os.path.join(HERE, "results_train.md"))
    png = args.png or (None if args.quick else os.path.join(HERE, "train_curves.png"))
    torch.set_num_threads(THREADS)
    started, host = time.perf_counter(), machine()
    methods = available_methods()
    results: dict = {}
    for name in datasets:
        results.update(run_dataset(name, epochs, seeds, methods))
    minutes = (time.perf_counter() - started) / 60
    text = table(results)
    print(text)
    print(f"\n{len(datasets)} dataset(s), {seeds} seed(s), E = {epochs} epochs: {minutes:.1f} min")
    if out:
        command = "benchmarks/bench_train.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
        with open(out, "w") as f:
            f.write(f"# Training-aware pruning quality (bench_train.py)\n\n`.venv/bin/python {command}` — "
                    f"{time.strftime('%Y-%m-%d %H:%M')}, {minutes:.1f} min in all\n\n{host}, at end "
                    f"{os.getloadavg()[0]:.2f} (other people's jobs share the machine: wall times vary)\n\n"
                    f"{seeds} seeds (mean ± std; they change init and data order), E = {epochs} epochs for every "
                    f"row; recipes {RECIPES} (SGD, momentum 0.9, Nesterov, weight decay 5e-4, cosine LR per "
                    f"phase). One-shot and tp-groupnorm: E/2 = {epochs // 2} epochs (dense / regularized, reg "
                    f"{TP_REG}) + {epochs - epochs // 2} fine-tune epochs; gp-hesso: warm-up {epochs // 4} epochs, "
                    f"{min(HESSO_PERIODS, epochs // 2)} pruning periods over {epochs // 2} epochs, the rest held. "
                    f"Methods not listed were unavailable (see the run's notes).\n\n{text}\n\n"
                    f"{NOTES}\n")
    if png:
        plot(results, png)


if __name__ == "__main__":
    main()
