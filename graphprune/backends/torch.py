"""Torch backend: slice parameters and buffers in place of a copy and update module attributes, so the
result is an ordinary module of the same classes that trains, scripts and exports like the original."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings

import torch
from torch import nn

from ..errors import BackendError, UnsupportedModelError
from ..ir.from_torch import saved_buffers
from ..plan import PruningPlan, register_backend

log = logging.getLogger(__name__)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), leaf


def _copy(model: nn.Module, memo: dict | None = None) -> nn.Module:
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:
        raise BackendError(f"could not copy the model ({type(exc).__name__}: {exc}); pass inplace=True to "
                           "prune the model object itself") from exc


def apply_plan(plan: PruningPlan, model: nn.Module, inplace: bool = False, undo: Undo | None = None) -> nn.Module:
    """The slimmed model: `model` itself with inplace=True (each full-size tensor replaced as it is sliced),
    else a copy built without a full-size intermediate (the sliced tensors go straight into the copy). With an
    `undo` (inplace only), what changes is recorded there so that undo.restore() can take it back."""
    if undo is not None and (not inplace or plan.blocks):
        raise BackendError("only an in-place apply that removes no blocks can be undone")
    if inplace or plan.blocks:
        slim = model if inplace else _copy(model)
        _skip_blocks(plan, slim)
        plan.check_fits(slim)
        _compensated(plan, slim, undo)
        fresh = None
    else:
        plan.check_fits(model)
        slim, fresh = _sliced_copy(plan, model)
    old_shapes: dict[nn.Module, dict[str, tuple[int, ...]]] = {}
    holders: dict[int, list[tuple[nn.Module, str]]] = {}  # tied weights: every module holding the tensor
    for module in slim.modules():
        for leaf, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None:
                holders.setdefault(id(tensor), []).append((module, leaf))
    with torch.no_grad():
        if fresh is not None:  # already sliced: only the attributes are left to update
            for new, old_shape in fresh:
                for holder, holder_leaf in holders.get(id(new), []):
                    old_shapes.setdefault(holder, {})[holder_leaf] = old_shape
        else:
            for name in plan.removed:
                module, leaf = _owner(slim, name)
                tensor = getattr(module, leaf)
                shape = tuple(tensor.shape)
                new = sliced(plan, name, tensor) if undo is None else undo.sliced(plan, name, tensor)
                if isinstance(tensor, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=tensor.requires_grad)
                for holder, holder_leaf in holders.get(id(tensor), [(module, leaf)]):
                    old_shapes.setdefault(holder, {})[holder_leaf] = shape
                    (holder._parameters if isinstance(tensor, nn.Parameter) else holder._buffers)[holder_leaf] = new
                if undo is not None:
                    undo.free(tensor, new)
                del tensor, new  # the full-size tensor goes as soon as no module holds it
    for module, shapes in old_shapes.items():
        _update_attributes(module, shapes)
    _rewrite_widths(slim, plan.rewrites, undo)
    if plan.removed and hasattr(getattr(slim, "config", None), "to_dict"):
        from .hf_config import sync_config

        reason = sync_config(slim, plan.rewrites)
        if reason is not None:
            _refuse_save_pretrained(slim, reason)
    slim.graphprune_plan = plan  # lets graphprune.save() store the plan beside the weights
    return slim


def _sliced_copy(plan: PruningPlan, model: nn.Module) -> tuple[nn.Module, list[tuple[torch.Tensor, tuple]]]:
    """A deep copy of `model` in which every tensor the plan slices is born sliced (compensation applied): the
    copy's memo maps each such original tensor to its sliced version, so no full-size duplicate of it is ever
    made. Returns the copy and (new tensor, original shape) for each sliced one."""
    memo: dict[int, object] = {}
    fresh: list[tuple[torch.Tensor, tuple]] = []
    added = {a[0] for a in plan.added}
    with torch.no_grad():
        for name in plan.removed:
            if name in added:
                continue
            module, leaf = _owner(model, name)
            tensor = getattr(module, leaf)
            source = plan.updates.get(name)
            source = tensor if source is None else source.to(device=tensor.device, dtype=tensor.dtype)
            new = _own(sliced(plan, name, source), tensor, source)
            if isinstance(tensor, nn.Parameter):
                new = nn.Parameter(new, requires_grad=tensor.requires_grad)
            memo[id(tensor)] = new
            fresh.append((new, tuple(tensor.shape)))
            del source
    slim = _copy(model, memo)
    with torch.no_grad():
        for name, value in plan.updates.items():  # compensated tensors that keep their shape
            if name not in plan.removed and name not in added:
                module, leaf = _owner(slim, name)
                getattr(module, leaf).copy_(value)
        for bias, weight, _axis in plan.added:
            module, leaf = _owner(slim, bias)
            if getattr(module, leaf, None) is not None:
                continue
            like = dict(slim.named_parameters())[weight]
            value = plan.updates.get(bias)
            if value is None:  # zeros until loaded or updated
                value = torch.zeros(plan.fingerprint[bias], dtype=like.dtype, device=like.device)
            value = value.to(device=like.device, dtype=like.dtype)
            new = _own(sliced(plan, bias, value) if bias in plan.removed else value.contiguous(), None, value)
            module.bias = nn.Parameter(new)
            fresh.append((module.bias, tuple(plan.fingerprint[bias])))
    return slim, fresh


def _own(new: torch.Tensor, *others: torch.Tensor | None) -> torch.Tensor:
    """`new`, or a copy of it where it still shares memory with the user's model or the plan's updates."""
    ptrs = {o.untyped_storage().data_ptr() for o in others if o is not None and o.numel()}
    return new.clone() if new.numel() and new.untyped_storage().data_ptr() in ptrs else new


def _refuse_save_pretrained(model: nn.Module, reason: str) -> None:
    """The config still describes the old widths: say so now, and make save_pretrained refuse rather than write
    a checkpoint that from_pretrained cannot load."""
    message = f"the pruned model's Hugging Face config no longer matches its weights ({reason})"
    warnings.warn(f"{message}; save it with graphprune.save_pretrained (a per-layer config runtimes read) or "
                  "graphprune.save, not its own save_pretrained", stacklevel=4)

    def save_pretrained(*_args, **_kwargs):
        raise UnsupportedModelError(f"{message}: save_pretrained would write a checkpoint from_pretrained cannot "
                                    "load. Save with graphprune.save_pretrained(model, directory) (LLaMA family: a "
                                    "per-layer config) or graphprune.save(model, path), load with graphprune.load, or "
                                    "plan with uniform=True so the config can describe the widths")

    model.save_pretrained = save_pretrained


def sliced(plan: PruningPlan, name: str, tensor: torch.Tensor, lost: list | None = None) -> torch.Tensor:
    """`tensor` (parameter or buffer `name`) with the plan's removed indices dropped along every axis; with a
    `lost` list, (axis, kept indices, removed indices, removed slices) for each axis are appended to it."""
    new = tensor
    for axis in sorted(plan.removed.get(name, {})):
        keep = torch.tensor(plan.kept(name, axis), dtype=torch.long, device=new.device)
        if lost is not None:
            gone = torch.tensor(plan.removed[name][axis], dtype=torch.long, device=new.device)
            lost.append((axis, keep, gone, new.index_select(axis, gone).detach()))
        new = new.index_select(axis, keep)
    return new.detach().contiguous()


def _unsliced(new: torch.Tensor, lost: list) -> torch.Tensor:
    """The full-size tensor back from its sliced version and what sliced(..., lost) set aside."""
    for axis, keep, gone, part in reversed(lost):
        shape = list(new.shape)
        shape[axis] = len(keep) + len(gone)
        whole = new.new_empty(shape)
        whole.index_copy_(axis, keep, new)
        whole.index_copy_(axis, gone, part)
        new = whole
    return new


class Undo:
    """What apply_plan(model, inplace=True, undo=...) changes, kept so that restore() takes it back bit-identically
    without a second copy of the model (verification slims the user's model itself and undoes a failure): the module
    tree (attributes and parameter, buffer and submodule entries, shallow), the Hugging Face configs' fields, every
    buffer's values (forward code may update buffers), the original values of tensors written in place
    (compensation, RMS rescaling), and of each sliced parameter only the slices it lost, its full-size storage
    freed. The same tensor and config objects come back."""

    def __init__(self, model: nn.Module):
        self._tree = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
                      for m in model.modules()]
        configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "to_dict")}
        self._configs = [(c, dict(vars(c))) for c in configs.values()]  # fields are set, not changed in place
        self._buffers = saved_buffers(model)
        self._kept: set[int] = set()  # ids of tensors whose original values a step puts back
        self._lost: dict[int, tuple] = {}  # id -> (stride, what sliced(..., lost) set aside), until free()
        self._steps: list = []  # callables that take one change back, run last to first

    def keep(self, tensor: torch.Tensor) -> None:
        """`tensor`'s values are about to be written in place."""
        if id(tensor) not in self._kept:
            self._kept.add(id(tensor))
            saved = tensor.detach().clone()
            self._steps.append(lambda: setattr(tensor, "data", saved))

    def sliced(self, plan: PruningPlan, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """sliced(plan, name, tensor), setting aside the slices a parameter loses (buffers come back whole, and so
        do tensors kept already)."""
        if id(tensor) in self._kept or not isinstance(tensor, nn.Parameter):
            return sliced(plan, name, tensor)
        lost: list = []
        self._lost[id(tensor)] = (tensor.stride(), lost)
        return sliced(plan, name, tensor, lost)

    def free(self, tensor: torch.Tensor, new: torch.Tensor) -> None:
        """`new` replaced `tensor` in every module that held it: the full-size storage goes."""
        set_aside = self._lost.pop(id(tensor), None)
        if set_aside is not None:
            stride, lost = set_aside

            def back():
                whole = _unsliced(new.detach(), lost)
                if whole.stride() != stride:  # channels_last stays channels_last
                    whole = whole.new_empty_strided(whole.shape, stride).copy_(whole)
                tensor.data = whole

            self._steps.append(back)
        tensor.data = tensor.data.new_empty(0)

    def restore(self) -> None:
        """The model as it was when this Undo was made."""
        with torch.no_grad():
            for step in reversed(self._steps):
                step()
            for module, attributes, parameters, buffers, modules in self._tree:
                for entries, saved in ((module._parameters, parameters), (module._buffers, buffers),
                                       (module._modules, modules)):
                    entries.clear()
                    entries.update(saved)
                module.__dict__.clear()
                module.__dict__.update(attributes)
            for config, fields in self._configs:  # sub-configs stay the objects submodules hold
                vars(config).clear()
                vars(config).update(fields)
            for buffer, saved in self._buffers:
                if buffer.shape == saved.shape:
                    buffer.copy_(saved)
                else:
                    buffer.data = saved
        self._steps.clear()


def mask_plan(plan: PruningPlan, model: nn.Module) -> nn.Module:
    masked = _copy(model)
    _skip_blocks(plan, masked)
    plan.check_fits(masked)
    _compensated(plan, masked)
    with torch.no_grad():
        for name, axes in plan.zeroed.items():
            module, leaf = _owner(masked, name)
            tensor = getattr(module, leaf)
            for axis, idx in axes.items():
                index = torch.tensor(idx, dtype=torch.long, device=tensor.device)
                tensor.index_fill_(axis, index, 0)
    return masked


register_backend("mask", mask_plan)

_ABSENT = object()


@contextlib.contextmanager
def masked_in_place(plan: PruningPlan, model: nn.Module):
    """`model` itself as plan.mask(model) would return it, for the duration of the block: the compensated
    tensors are swapped in (the originals are set aside, not copied), the biases compensation added are
    attached, the zeroed slices are saved and zeroed, and every buffer is saved whole (forward code may
    update buffers). Whatever happens in the block, `model` comes back bit-identical: same tensor objects,
    same values, same attributes. Plans that remove whole blocks need a copy (mask_plan)."""
    if plan.blocks:
        raise BackendError("a plan that removes blocks is masked on a copy: use mask_plan")
    plan.check_fits(model)
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []  # (model tensor, its original data)
    attached: list[tuple[nn.Module, str, object, object]] = []  # (module, leaf, _parameters entry, __dict__ entry)
    zeroed: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []  # (tensor, axis, index, saved slice)
    buffers = saved_buffers(model)
    try:
        with torch.no_grad():
            for bias, weight, _axis in plan.added:
                module, leaf = _owner(model, bias)
                if getattr(module, leaf, None) is not None:
                    continue
                like = dict(model.named_parameters())[weight]
                attached.append((module, leaf, module._parameters.get(leaf, _ABSENT), module.__dict__.get(leaf, _ABSENT)))
                module.__dict__.pop(leaf, None)
                module._parameters[leaf] = nn.Parameter(
                    torch.zeros(plan.fingerprint[bias], dtype=like.dtype, device=like.device), requires_grad=False)
            for name, value in plan.updates.items():
                module, leaf = _owner(model, name)
                tensor = getattr(module, leaf)
                if any(a[0] is module and a[1] == leaf for a in attached):
                    tensor.copy_(value)  # a bias of our own
                    continue
                if (value.dtype == tensor.dtype and value.device == tensor.device and value.shape == tensor.shape
                        and value.stride() == tensor.stride() and name not in plan.zeroed):
                    new = value  # used as it is: nothing writes to it
                else:
                    new = torch.empty_like(tensor).copy_(value)
                swapped.append((tensor, tensor.data))
                tensor.data = new
            for name, axes in plan.zeroed.items():
                module, leaf = _owner(model, name)
                tensor = getattr(module, leaf)
                for axis, idx in axes.items():
                    index = torch.tensor(idx, dtype=torch.long, device=tensor.device)
                    zeroed.append((tensor, axis, index, tensor.index_select(axis, index)))
                    tensor.index_fill_(axis, index, 0)
        yield model
    finally:
        with torch.no_grad():
            for tensor, axis, index, saved in reversed(zeroed):
                tensor.index_copy_(axis, index, saved)
            for tensor, data in reversed(swapped):
                tensor.data = data
            for module, leaf, entry, attr in reversed(attached):
                del module._parameters[leaf]
                if entry is not _ABSENT:
                    module._parameters[leaf] = entry
                if attr is not _ABSENT:
                    module.__dict__[leaf] = attr
            for buffer, value in buffers:
                buffer.copy_(value)


def _skip_blocks(plan: PruningPlan, model: nn.Module) -> None:
    if plan.blocks:
        from ..passes.depth import skip_blocks

        try:
            skip_blocks(model, plan.blocks)
        except (AttributeError, IndexError, ValueError) as exc:
            raise BackendError(f"this plan removes blocks the model does not have ({exc}); build the model "
                               "with the architecture the plan came from") from exc


def _compensated(plan: PruningPlan, model: nn.Module, undo: Undo | None = None) -> None:
    """Create the biases compensation added (zeros until loaded or updated) and write the updated tensors."""
    with torch.no_grad():
        for bias, weight, _axis in plan.added:
            module, leaf = _owner(model, bias)
            if getattr(module, leaf, None) is None:
                like = dict(model.named_parameters())[weight]
                module.bias = nn.Parameter(torch.zeros(plan.fingerprint[bias], dtype=like.dtype, device=like.device))
        for name, value in plan.updates.items():
            tensor = getattr(*_owner(model, name))
            if undo is not None:
                undo.keep(tensor)
            tensor.copy_(value)


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
        if module.num_groups == module.num_channels:  # one channel per group: the only prunable kind
            module.num_groups = w.shape[0]
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
        raise BackendError("nn.MultiheadAttention cannot change its width (its forward derives head_dim from "
                           "embed_dim and packs q/k/v in one weight)")


# attributes forward code reads head counts and head-derived widths from (HF, timm, torchvision names)
_HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads", "num_key_value_heads", "num_kv_heads",
                "n_kv_heads", "encoder_attention_heads", "decoder_attention_heads")
_HEAD_WIDTHS = ("all_head_size", "split_size", "inner_dim", "attn_dim", "q_size", "kv_size")
_EPS = ("variance_epsilon", "eps", "epsilon")


def _rewrite_widths(model: nn.Module, rewrites: list[dict], undo: Undo | None = None) -> None:
    """Update attributes that hold head counts (and the module's config, if it reads one), and fold the
    C/C' change of an RMS norm's mean into its weight and epsilon."""
    by_module: dict[str, list[dict]] = {}
    for r in rewrites:
        by_module.setdefault(r["module"], []).append(r)
    for name, entries in by_module.items():
        module = model.get_submodule(name)
        heads = [r for r in entries if r["kind"] == "heads"]
        if heads:
            _rewrite_heads(module, heads)
        for r in entries:
            if r["kind"] == "rms":
                _rescale_rms(module, name, r["before"], r["after"], r.get("offset", 0.0), undo)


def _rewrite_heads(module: nn.Module, entries: list[dict]) -> None:
    def new_value(value):
        for r in entries:  # matched against the original values, so q and kv head counts never mix
            if value == r["before"]:
                return r["after"]
        return None

    def new_width(value):
        for r in entries:
            if value == r["before"] * r["head_dim"]:
                return r["after"] * r["head_dim"]
        return None

    updates = {}
    for attr in _HEAD_COUNTS + _HEAD_WIDTHS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            new = new_value(value) if attr in _HEAD_COUNTS else new_width(value)
            if new is not None:
                updates[attr] = new
    for attr, new in updates.items():
        setattr(module, attr, new)
    config = getattr(module, "config", None)
    if config is not None and not isinstance(config, (int, float, str, nn.Module)):
        changes = {a: new_value(getattr(config, a)) for a in _HEAD_COUNTS if isinstance(getattr(config, a, None), int)}
        changes = {a: v for a, v in changes.items() if v is not None}
        if changes:  # a shared config would change every layer: this module gets its own copy
            module.config = copy.copy(config)
            for attr, new in changes.items():
                setattr(module.config, attr, new)


def _rescale_rms(module: nn.Module, name: str, before: int, after: int, offset: float = 0.0,
                undo: Undo | None = None) -> None:
    """mean over C' instead of C: (offset + w') = (offset + w) * sqrt(C/C') and eps' = eps * C/C' give the same
    output (offset 0 for x_hat * w, 1 for Gemma's x_hat * (1 + w))."""
    weight = getattr(module, "weight", None)
    attr = next((a for a in _EPS if hasattr(module, a)), None)
    if not isinstance(weight, torch.Tensor) or attr is None:
        raise BackendError(f"module '{name}' computes an RMS norm but has no weight or eps attribute to rescale; "
                           "keep it whole with ignore=['" + name + "']")
    eps = getattr(module, attr)
    if eps is None:  # torch's RMSNorm default
        eps = torch.finfo(weight.dtype).eps
    if undo is not None:
        undo.keep(weight)
    with torch.no_grad():
        weight.add_(offset).mul_(math.sqrt(before / after)).sub_(offset)
    setattr(module, attr, float(eps) * before / after)
