"""Depth: remove whole blocks of a residual stack.

A candidate block is an entry of an nn.ModuleList / nn.Sequential, other than the first, whose output has
its input's shape. Its influence is 1 - cos(x_in, x_out) per token, averaged over the calibration batches
(ShortGPT's block influence): a block that barely turns the residual stream contributes little. The first
block of a stack is never a candidate (it turns the embeddings the most, and Hugging Face caches count
tokens in layer 0). A removed block becomes a Skip that passes its input through.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..errors import GraphPruneError
from ..ir.from_torch import eval_mode, normalize_inputs

log = logging.getLogger(__name__)


class Skip(nn.Module):
    """Stands in for a removed block: returns its input, as a tensor or as the block's tuple shape."""

    def __init__(self, outputs: int = 0):
        super().__init__()
        self.outputs = outputs  # 0: the block returned a tensor; n: a tuple of n items

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
        return x if self.outputs == 0 else (x,) + (None,) * (self.outputs - 1)


def candidates(model: nn.Module) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            found.extend(names[id(child)] for child in list(module)[1:])
    return found


def influence(model: nn.Module, batches: Any) -> dict[str, tuple[float, int]]:
    """Block influence and output arity of every candidate whose output keeps its input's shape."""
    modules = dict(model.named_modules())
    stats: dict[str, list] = {}
    hooks = []

    def hook(name):
        def run(_module, args, kwargs, output):
            x = args[0] if args else kwargs.get("hidden_states")
            y, arity = (output[0], len(output)) if isinstance(output, tuple) else (output, 0)
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or x.shape != y.shape:
                stats[name] = None
                return
            if name in stats and stats[name] is None:
                return
            cos = nn.functional.cosine_similarity(x.flatten(0, -2).double(), y.flatten(0, -2).double(), dim=-1)
            total, count, _ = stats.get(name, [0.0, 0, arity])
            stats[name] = [total + float((1 - cos).sum()), count + cos.numel(), arity]
        return run

    for name in candidates(model):
        hooks.append(modules[name].register_forward_hook(hook(name), with_kwargs=True))
    try:
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                args, kwargs = normalize_inputs(batch)
                model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return {n: (s[0] / s[1], s[2]) for n, s in stats.items() if s is not None and s[1]}


def choose(model: nn.Module, batches: Any, count: int) -> list[list]:
    """The `count` least influential blocks, as [name, output arity, influence]."""
    scores = influence(model, batches)
    if count > len(scores):
        raise GraphPruneError(f"depth={count} asks for more blocks than the {len(scores)} removable ones "
                              "(entries of a ModuleList/Sequential, after the first, that keep their input's shape)")
    ranked = sorted(scores.items(), key=lambda item: item[1][0])[:count]
    for name, (bi, _) in ranked:
        log.info("removing block %s (influence %.4f)", name, bi)
    return [[name, arity, bi] for name, (bi, arity) in ranked]


def skip_blocks(model: nn.Module, blocks: list[list]) -> nn.Module:
    """Replace each named block of `model` (in place) with a Skip."""
    for name, arity, *_ in blocks:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, (nn.ModuleList, nn.Sequential)):
            parent[int(leaf)] = Skip(arity)
        else:
            setattr(parent, leaf, Skip(arity))
    return model
