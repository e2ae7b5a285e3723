"""Torch backend: slice parameters and buffers in place of a copy and update module attributes, so the
result is an ordinary module of the same classes that trains, scripts and exports like the original."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import BackendError
from ..plan import PruningPlan


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), leaf


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        raise BackendError(f"could not copy the model ({type(exc).__name__}: {exc}); pass inplace=True to "
                           "prune the model object itself") from exc


def apply_plan(plan: PruningPlan, model: nn.Module, inplace: bool = False) -> nn.Module:
    plan.check_fits(model)
    slim = model if inplace else _copy(model)
    old_shapes: dict[nn.Module, dict[str, tuple[int, ...]]] = {}
    with torch.no_grad():
        for name in plan.removed:
            module, leaf = _owner(slim, name)
            tensor = getattr(module, leaf)
            old_shapes.setdefault(module, {})[leaf] = tuple(tensor.shape)
            new = sliced(plan, name, tensor)
            if isinstance(tensor, nn.Parameter):
                module._parameters[leaf] = nn.Parameter(new, requires_grad=tensor.requires_grad)
            else:
                module._buffers[leaf] = new
    for module, shapes in old_shapes.items():
        _update_attributes(module, shapes)
    slim.graphprune_plan = plan  # lets graphprune.save() store the plan beside the weights
    return slim


def sliced(plan: PruningPlan, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (parameter or buffer `name`) with the plan's removed indices dropped along every axis."""
    new = tensor
    for axis in sorted(plan.removed.get(name, {})):
        keep = torch.tensor(plan.kept(name, axis), dtype=torch.long, device=new.device)
        new = new.index_select(axis, keep)
    return new.detach().contiguous()


def mask_plan(plan: PruningPlan, model: nn.Module) -> nn.Module:
    plan.check_fits(model)
    masked = _copy(model)
    with torch.no_grad():
        for name, axes in plan.zeroed.items():
            module, leaf = _owner(masked, name)
            tensor = getattr(module, leaf)
            for axis, idx in axes.items():
                index = torch.tensor(idx, dtype=torch.long, device=tensor.device)
                tensor.index_fill_(axis, index, 0)
    return masked


def _update_attributes(module: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    """Keep module attributes (in/out_channels, groups, num_features, ...) in step with the new shapes."""
    w = getattr(module, "weight", None)
    if isinstance(module, nn.modules.conv._ConvNd) and w is not None:
        old_w = old.get("weight", tuple(w.shape))
        if module.transposed:  # weight [in, out/groups, ...]
            if module.groups > 1:
                module.groups = module.groups * w.shape[0] // old_w[0]
            module.in_channels = w.shape[0]
            module.out_channels = w.shape[1] * module.groups
        else:  # weight [out, in/groups, ...]
            if module.groups > 1:
                module.groups = module.groups * w.shape[0] // old_w[0]
            module.out_channels = w.shape[0]
            module.in_channels = w.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif isinstance(module, (nn.modules.batchnorm._NormBase,)):
        ref = w if w is not None else getattr(module, "running_mean", None)
        if ref is not None:
            module.num_features = ref.shape[0]
    elif isinstance(module, nn.GroupNorm) and w is not None:
        module.num_channels = w.shape[0]
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and w is not None:
        module.normalized_shape = tuple(w.shape)
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = w.shape
    elif isinstance(module, nn.PReLU):
        module.num_parameters = w.shape[0]
    elif w is not None and w.ndim == 2 and hasattr(module, "nf") and hasattr(module, "nx"):
        module.nx, module.nf = w.shape  # transformers' Conv1D (GPT-2): a linear layer with weight [in, out]
    elif isinstance(module, nn.MultiheadAttention):
        raise BackendError("MultiheadAttention widths cannot change (its heads are pinned); this is a bug")
