"""Hugging Face configs, written: update a slimmed model's config to values that rebuild its shapes (found with
the probe in ir/hf_config.py); a non-uniform plan has no such values, and says so."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ..ir.hf_config import Probe, Shapes, _build, _head_dims, _probe, _shapes, solve_changes

log = logging.getLogger(__name__)

def _bias_flags(found: Probe, target: Shapes) -> dict[str, bool] | None:
    """Boolean fields (LLaMA's mlp_bias, attention_bias, ...) that, switched on, build the biases that
    compensation added; the other biases they bring are created as zeros. None if no such fields exist."""
    missing = target.keys() - found.shapes.keys()
    if found.shapes.keys() - target.keys() or not all(n.endswith(".bias") for n in missing):
        return None
    flags = {}
    for key, value in found.config.to_dict().items():
        if not missing:
            break
        if value is not False:
            continue
        trial = copy.deepcopy(found.config)
        try:
            setattr(trial, key, True)
        except Exception:  # noqa: BLE001 - the config validates the field and refuses it
            continue
        shapes = _build(found.cls, trial)
        new = set() if shapes is None else shapes.keys() - found.shapes.keys()
        if new & missing and all(n.endswith(".bias") for n in new) and shapes.keys() >= found.shapes.keys():
            flags[key] = True
            missing = missing - new
    return flags if not missing else None


def _add_zero_biases(model: nn.Module, shapes: Shapes) -> None:
    """Give layers the (zero, so exact) biases a config flag builds for them."""
    for name, shape in shapes.items():
        module = model.get_submodule(name.rpartition(".")[0])
        like = module.weight
        module.bias = nn.Parameter(torch.zeros(shape, dtype=like.dtype, device=like.device))


def sync_config(model: nn.Module, rewrites: list[dict]) -> str | None:
    """Update model.config (still the original's) in place to values that rebuild the slimmed shapes;
    None on success, else the reason."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return "the model has no Hugging Face config"
    found = _probe(type(model), config, _head_dims(model))
    if found is None:
        return f"{type(model).__name__} cannot be rebuilt from its config"
    target = _shapes(model)
    flags = {}
    if found.shapes.keys() != target.keys():
        flags = _bias_flags(found, target)
        if flags is None:
            return "the slimmed model has other tensors than its config builds"
        for key in flags:
            setattr(found.config, key, True)
        found = _probe(found.cls, found.config, _head_dims(model))
    changes = solve_changes(found, target)
    candidate = copy.deepcopy(found.config)
    for key, value in changes.items():
        setattr(candidate, key, value)
    built = _build(found.cls, candidate)
    if flags and built is not None and built.keys() >= target.keys() and all(built[n] == target[n] for n in target):
        _add_zero_biases(model, {n: built[n] for n in built.keys() - target.keys()})  # only once all else fits
        target = _shapes(model)
    if built != target:
        return ("the config cannot describe these widths (layers differ, or a width such as the head size is "
                "derived from another field); plan with uniform=True, or save with graphprune.save")
    changes.update(flags)
    for key, value in found.config.to_dict().items():  # fields made explicit while probing
        if getattr(config, key, None) is None and value is not None:
            changes.setdefault(key, getattr(candidate, key))
    ratios = {r["before"] / r["after"] for r in rewrites if r["kind"] == "rms"}
    if len(ratios) == 1:  # RMS norms' epsilon grew with C/C' (backends.torch._rescale_rms)
        ratio = ratios.pop()
        changes.update({key: value * ratio for key, value in config.to_dict().items()
                        if "eps" in key and isinstance(value, float)})
    for key, value in changes.items():  # in place: submodules that share the config object see it too
        setattr(config, key, value)
    log.info("config updated: %s", changes)
    return None
