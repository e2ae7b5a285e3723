"""Hugging Face configs, read: which config field sizes which weight axis (uniform=True plans by it, and the
backend writes a slimmed model's config with it), so that save_pretrained / from_pretrained round-trip with no
graphprune code at load time.

No per-architecture table: each integer config field is probed by building the model on the meta device
with that field doubled, which shows the weight axes it sizes and by how much per unit. New values are
solved from the slimmed shapes, and a solution is accepted only if rebuilding from it reproduces every
shape exactly. Per-layer widths that differ (a non-uniform plan) have no solution, and say so.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

Shapes = dict[str, tuple[int, ...]]


@dataclass
class Probe:
    cls: type
    config: object  # the model's config, with a derived head_dim made explicit
    shapes: Shapes  # as built from `config`
    fields: dict[str, tuple[int, dict[tuple[str, int], float]]]  # field -> (value, {(tensor, axis): per unit})

    def valid(self, changes: dict[str, int]) -> bool:
        """Whether the config with `changes` passes its own validation (LLaMA: hidden_size a multiple of the
        head count) and builds the architecture: a linear solution alone is not enough."""
        config = copy.deepcopy(self.config)
        try:
            for key, value in changes.items():
                setattr(config, key, value)
            if hasattr(config, "validate"):
                config.validate()
        except Exception:  # noqa: BLE001 - the config refuses these values
            return False
        return _build(self.cls, config) is not None

    def controlled(self) -> dict[tuple[str, int], set[str]]:
        out: dict[tuple[str, int], set[str]] = {}
        for key, (_, axes) in self.fields.items():
            for where in axes:
                out.setdefault(where, set()).add(key)
        return out


def _shapes(model: nn.Module) -> Shapes:
    out = {n: tuple(t.shape) for n, t in model.named_parameters(remove_duplicate=False)}
    out.update((n, tuple(t.shape)) for n, t in model.named_buffers(remove_duplicate=False))
    return out


def _build(cls, config) -> Shapes | None:
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _shapes(cls(config))
    except Exception:  # noqa: BLE001 - a probe the architecture rejects tells nothing
        return None


def probe(model: nn.Module) -> Probe | None:
    """Map each integer config field of `model` (as it is now) to the weight axes it sizes; None for models
    without a config that rebuilds them."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    found = _probe(type(model), config, _head_dims(model))
    return found if found is not None and found.shapes == _shapes(model) else None


def _head_dims(model: nn.Module) -> set[int]:
    return {m.head_dim for m in model.modules() if isinstance(getattr(m, "head_dim", None), int)}


def _probe(cls, config, head_dims: set[int]) -> Probe | None:
    config = copy.deepcopy(config)
    if getattr(config, "head_dim", None) is None and len(head_dims) == 1:
        config.head_dim = next(iter(head_dims))  # so head counts and hidden size stop deriving it
    base = _build(cls, config)
    if base is None:
        return None
    _make_explicit(cls, config, base)
    fields = {}
    for key, value in config.to_dict().items():
        if type(value) is not int or value < 1 or key.endswith(("_id", "_ids")):
            continue
        trial = copy.deepcopy(config)
        try:
            setattr(trial, key, 2 * value)
        except Exception:  # noqa: BLE001 - the config validates the field and refuses the probe
            continue
        shapes = _build(cls, trial)
        if shapes is None or shapes.keys() != base.keys():
            continue  # the field adds or removes layers (depth), or the architecture refuses it
        axes = {}
        for name, old in base.items():
            for axis, (a, b) in enumerate(zip(old, shapes[name])):
                if a != b:
                    axes[(name, axis)] = (b - a) / value
        if axes:
            fields[key] = (value, axes)
    return Probe(cls, config, base, fields)


def solve_changes(found: Probe, target: Shapes) -> dict[str, int]:
    """Integer field changes that explain every changed axis: sizes are linear in each field (fused q/k/v
    rows are (heads + 2 kv_heads) x head_dim), so one least-squares solve, rounded, then checked."""
    keys = list(found.fields)
    # tensors the target lacks (biases a config flag adds, see _bias_flags) follow the fields that size them
    rows = sorted({where for _, axes in found.fields.values() for where in axes if where[0] in target})
    if not keys or not rows:
        return {}
    row_of = {where: i for i, where in enumerate(rows)}
    a = np.zeros((len(rows), len(keys)))
    for j, key in enumerate(keys):
        for where, per_unit in found.fields[key][1].items():
            if where in row_of:
                a[row_of[where], j] = per_unit
    b = np.array([target[name][axis] - found.shapes[name][axis] for name, axis in rows], dtype=np.float64)
    delta = np.rint(np.linalg.lstsq(a, b, rcond=None)[0])
    if not np.allclose(a @ delta, b):
        return {}
    return {key: found.fields[key][0] + int(d) for key, d in zip(keys, delta) if d}


def _make_explicit(cls, config, base: Shapes) -> None:
    """Fields left None that default to a width (GPT-2's n_inner = 4 x n_embd) get the one value among the
    model's sizes that rebuilds it unchanged, so they can be probed and changed."""
    sizes = sorted({d for shape in base.values() for d in shape if d > 1})
    for key, value in config.to_dict().items():
        if value is not None or key.startswith("_"):
            continue
        fits = []
        for size in sizes:
            trial = copy.deepcopy(config)
            try:
                setattr(trial, key, size)
            except Exception:  # noqa: BLE001 - a typed field that is not a width
                break
            if _build(cls, trial) == base:
                fits.append(size)
        if len(fits) == 1:
            setattr(config, key, fits[0])


def describes(model: nn.Module) -> bool:
    """Whether model.config builds exactly the model's tensor shapes, so save_pretrained / from_pretrained
    round-trip it."""
    config = getattr(model, "config", None)
    return hasattr(config, "to_dict") and _build(type(model), config) == _shapes(model)


@contextlib.contextmanager
def empty_weights():
    """Build modules with parameters on the meta device and buffers (rotary frequencies) real, on the CPU."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original
