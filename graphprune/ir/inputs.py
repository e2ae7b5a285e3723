"""Example inputs as data: what a plan records about them, so a plan loaded from JSON can still be checked on
inputs of the same shapes, and inputs resized along batch and sequence, so a regenerated graph can tell which
integers follow the input's shape."""

from __future__ import annotations

from typing import Any

import torch

from .from_torch import normalize_inputs

_LITERALS = (int, float, bool, str, type(None))


def input_specs(example_inputs: Any) -> list[dict[str, Any]] | None:
    """Shape, dtype and value range of every input (literals kept as they are); None if an input is neither a
    tensor nor a literal, so it cannot be recreated."""
    args, kwargs = normalize_inputs(example_inputs)
    specs = []
    for key, value in list(enumerate(args)) + list(kwargs.items()):
        spec: dict[str, Any] = {"key": key}
        if isinstance(value, torch.Tensor):
            data = value.detach()
            spec.update(shape=list(data.shape), dtype=str(data.dtype).removeprefix("torch."))
            if data.numel() and not data.is_complex():
                spec.update(low=float(data.min()), high=float(data.max()))
        elif isinstance(value, _LITERALS):
            spec["value"] = value
        else:
            return None
        specs.append(spec)
    return specs


def random_inputs(specs: list[dict[str, Any]], seed: int = 0) -> tuple[tuple, dict]:
    """(args, kwargs) shaped like the recorded inputs: floats uniform over the recorded range, integers (token
    ids, masks) drawn from the recorded range."""
    gen = torch.Generator().manual_seed(seed)
    args, kwargs = [], {}
    for spec in specs:
        if "shape" not in spec:
            value = spec.get("value")
        else:
            dtype = getattr(torch, spec["dtype"])
            low, high = spec.get("low", 0.0), spec.get("high", 1.0)
            if dtype.is_floating_point:
                value = (torch.rand(spec["shape"], generator=gen) * (high - low) + low).to(dtype)
            elif dtype == torch.bool:
                value = torch.randint(int(low), int(high) + 1, spec["shape"], generator=gen).bool()
            else:
                value = torch.randint(int(low), int(high) + 1, spec["shape"], generator=gen, dtype=dtype)
        if isinstance(spec["key"], int):
            args.append(value)
        else:
            kwargs[spec["key"]] = value
    return tuple(args), kwargs


def resized(example_inputs: Any, axis_sizes: dict[tuple[int, int], int]) -> tuple[tuple, dict]:
    """The example inputs with some axes resized, by repeating or cutting their own values (so masks, ids and
    control flow look like the example's). `axis_sizes` maps (flat input index, axis) to the new size."""
    args, kwargs = normalize_inputs(example_inputs)
    flat = list(args) + list(kwargs.values())
    tensor_index = 0
    out = []
    for value in flat:
        if isinstance(value, torch.Tensor):
            for axis in range(value.ndim):
                size = axis_sizes.get((tensor_index, axis))
                if size is not None and size != value.shape[axis]:
                    index = torch.arange(size, device=value.device) % value.shape[axis]
                    value = value.index_select(axis, index)
            tensor_index += 1
        out.append(value)
    return tuple(out[:len(args)]), dict(zip(kwargs, out[len(args):]))


def tensors_of(example_inputs: Any) -> list[torch.Tensor]:
    """The input tensors in the order the tracer records them."""
    args, kwargs = normalize_inputs(example_inputs)
    return [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)]
