"""Prune a torchvision CNN to half its FLOPs, fine-tune it, and save it without pickling code.

torchvision's resnet18 (random init, 10 classes) is trained on scikit-learn's bundled 8x8 digits, upsampled
to 32x32 and repeated over three channels so the stock architecture takes them. graphprune plans half the
FLOPs, cuts the model, a short fine-tune recovers the accuracy, and `graphprune.save` / `graphprune.load`
store the slim model as weights plus the plan, rebuilt from a fresh `resnet18(num_classes=10)`.

    python examples/prune_torchvision_cnn.py [--out DIR]

GRAPHPRUNE_EXAMPLE_SMALL=1 trains one epoch on 256 images of 16x16 (seconds; accuracy is then near chance);
GRAPHPRUNE_EXAMPLE_OUT sets the output directory (default ./example-output). Needs torchvision and
scikit-learn (the data ships with it). Writes DIR/resnet18-digits-slim.pt and DIR/resnet18-digits-plan.json.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits

import graphprune

SMALL = os.environ.get("GRAPHPRUNE_EXAMPLE_SMALL") == "1"
EPOCHS = 1 if SMALL else 5
FINETUNE_EPOCHS = 1 if SMALL else 3
SIZE = 16 if SMALL else 32
TRAIN_IMAGES = 256 if SMALL else None  # None: all 1437 training images


def load_data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Digits as [N, 3, SIZE, SIZE] tensors in [0, 1]; a fixed split, 360 test images."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, train = order[:360], order[360:]
    return (x[train][:TRAIN_IMAGES], y[train][:TRAIN_IMAGES]), (x[test], y[test])


def make_model() -> torch.nn.Module:
    """The architecture, as graphprune.load needs it: a fresh instance, weights do not matter."""
    return torchvision.models.resnet18(num_classes=10)


def train(model: torch.nn.Module, data, epochs: int, lr: float, batch_size: int = 64) -> None:
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, data) -> float:
    x, y = data
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("GRAPHPRUNE_EXAMPLE_OUT", "example-output"),
                        help="output directory (default: $GRAPHPRUNE_EXAMPLE_OUT or ./example-output)")
    parser.add_argument("--target-flops", type=float, default=0.5, help="fraction of the FLOPs to keep")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    train_data, test_data = load_data()
    model = make_model()
    t0 = time.perf_counter()
    train(model, train_data, EPOCHS, lr=2e-3)
    acc_dense = accuracy(model, test_data)
    seconds = time.perf_counter() - t0
    print(f"resnet18 trained on {len(train_data[0])} digits ({SIZE}x{SIZE}), {EPOCHS} epochs in {seconds:.0f} s: "
          f"test accuracy {acc_dense:.1%}")

    example = test_data[0][:1]
    plan = graphprune.plan(model, example, target_flops=args.target_flops)
    print(plan.summary())
    slim = plan.apply(model)  # `model` itself is untouched
    acc_pruned = accuracy(slim, test_data)
    train(slim, train_data, FINETUNE_EPOCHS, lr=5e-4)
    acc_tuned = accuracy(slim, test_data)

    flops_ratio = graphprune.count_flops(slim, example) / graphprune.count_flops(model, example)
    print(f"FLOPs ratio {flops_ratio:.3f} (target {args.target_flops}), params ratio {plan.params_ratio:.3f}")
    print(f"test accuracy: dense {acc_dense:.1%}, pruned {acc_pruned:.1%}, fine-tuned {acc_tuned:.1%}")

    path = out / "resnet18-digits-slim.pt"
    graphprune.save(slim, path, plan=plan)
    plan.save(out / "resnet18-digits-plan.json")
    loaded = graphprune.load(path, make_model).eval()  # fresh resnet18, plan replayed, weights loaded
    with torch.no_grad():
        if not torch.equal(loaded(test_data[0]), slim(test_data[0])):
            raise SystemExit("the reloaded model computes something else than the pruned one")
    print(f"saved to {path}; graphprune.load(path, make_model) gives the same outputs")


if __name__ == "__main__":
    main()
