"""save / load a pruned model as plan + weights, with no pickled code: load() replays the plan onto a fresh
instance from the user's factory and loads the weights into it."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable

import torch

from .errors import GraphPruneError
from .files import atomic_write
from .plan import PruningPlan


def save(model: torch.nn.Module, path: str | os.PathLike, plan: PruningPlan | None = None) -> None:
    """Write `model`'s weights and its plan (taken from the model if prune() made it) to one file."""
    plan = plan or getattr(model, "graphprune_plan", None)
    if plan is None:
        raise GraphPruneError("no plan to save with this model: pass plan=... (the PruningPlan that made it)")
    buffer = io.BytesIO()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"graphprune_plan": json.dumps(plan.to_dict()), "state_dict": state}, buffer)
    atomic_write(path, buffer.getvalue())


def load(path: str | os.PathLike, model_factory: Callable[[], torch.nn.Module] | None = None) -> torch.nn.Module:
    """Rebuild the pruned model: fresh instance from model_factory, plan replayed, weights loaded. A directory
    written by `graphprune prune-hf` needs no factory: its config.json builds the architecture."""
    if os.path.isdir(path):
        from .hf_prune import load_pretrained

        return load_pretrained(path)
    if model_factory is None:
        raise GraphPruneError("graphprune.load(path, model_factory): a save file needs the factory that builds the "
                              "original architecture (only prune-hf directories rebuild from their config.json)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise GraphPruneError(f"no saved model at {path}") from exc
    except Exception as exc:
        raise GraphPruneError(f"{path} is not a graphprune save file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or "graphprune_plan" not in data:
        raise GraphPruneError(f"{path} is not a graphprune save file (no plan inside)")
    plan = PruningPlan.from_dict(json.loads(data["graphprune_plan"]))
    fresh = model_factory()
    slim = plan.apply(fresh, inplace=True, verify=bool(plan.inputs))  # plans saved before inputs were recorded
    slim.load_state_dict(data["state_dict"])
    slim.graphprune_plan = plan
    return slim
