"""save / load a pruned model as plan + weights, with no pickled code: load() replays the plan onto a fresh
instance from the user's factory and loads the weights into it. save_pretrained writes a Hugging Face directory
that runtimes load (per-layer widths in the DeciLM layout)."""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Callable

import torch

from .backends import deci
from .backends.deci import Saved
from .errors import GraphPruneError, UsageError
from .files import atomic_directory, atomic_write
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


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike) -> Saved:
    """Write a pruned Hugging Face model to a new `directory` as config.json + safetensors. Where the model's own
    config describes its widths (uniform plans), transformers' save_pretrained writes it and from_pretrained loads
    it. Where layers differ (LLaMA architecture), config.json takes the DeciLM / Nemotron-NAS `block_configs` layout
    (vLLM, SGLang, TensorRT-LLM, mlx-lm and llama.cpp's converter read it; transformers only with NVIDIA's remote
    code); widths that layout cannot hold are padded with zeros, exactly, and counted in the result, and
    graphprune.load(directory) reloads it. The tokenizer is not written: copy it from the original."""
    from .ir.hf_config import describes

    directory = os.fspath(directory)
    if not hasattr(getattr(model, "config", None), "to_dict"):
        raise UsageError(f"{type(model).__name__} has no Hugging Face config: save it with graphprune.save")
    if describes(model):
        with atomic_directory(directory) as tmp:
            type(model).save_pretrained(model, tmp)  # the class's: a non-uniform model's own one refuses
        return Saved(directory, "transformers")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    saved = deci.write(model.config, {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__, directory)
    if saved.padded_params:
        warnings.warn(f"the DeciLM layout keeps every query head and MLP widths in multiples of {deci.FFN_MULTIPLE}: "
                      f"{saved.padded_params:,} zero parameters were added to hold these widths (outputs are "
                      f"unchanged); plan with round_to={deci.FFN_MULTIPLE} and the heads kept whole to avoid it",
                      stacklevel=2)
    return saved


def load(path: str | os.PathLike, model_factory: Callable[[], torch.nn.Module] | None = None) -> torch.nn.Module:
    """Rebuild the pruned model: fresh instance from model_factory, plan replayed, weights loaded. A directory
    written by `graphprune prune-hf` needs no factory: its config.json builds the architecture."""
    if os.path.isdir(path):
        from .hf_prune import load_pretrained

        if deci.is_deci(_json(os.path.join(path, "config.json"))):
            return deci.load(os.fspath(path))
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


def _json(path: str):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None  # load_pretrained says what is missing
