"""prune() and plan(): trace -> channel analysis -> importance -> budgeted selection -> PruningPlan."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .analysis.channels import Analysis, analyze
from .analysis.cost import CostModel
from .errors import BackendError, BudgetError, GraphPruneError
from .ir.from_torch import normalize_inputs, trace
from .passes.calibration import CalibratedImportance, collect
from .passes.calibration import compensate as compensate_readers
from .passes.importance import get_importance
from .passes.select import select
from .plan import PruningPlan, indices_by_axis, named_tensors

log = logging.getLogger(__name__)

CALIBRATED = ("wanda", "flap", "taylor")


def count_flops(model: torch.nn.Module, example_inputs: Any) -> int:
    """FLOPs of one forward pass (2 x MACs of conv / linear / matmul / attention)."""
    graph, _ = trace(model, example_inputs)
    an = analyze(graph)
    return int(round(CostModel(an, an.flop_terms).total()))


def plan(model: torch.nn.Module, example_inputs: Any, target_flops: float | None = None, *,
         target_params: float | None = None, importance: Any = "l2", ignore: Iterable[Any] | None = None,
         round_to: int | None = None, max_ratio: float = 0.9, allow_lossy: bool = False,
         uniform: bool = False, calibration: Any = None, compensate: bool | str = False,
         loss_fn: Any = None, depth: int = 0, tracer: str = "dispatch") -> PruningPlan:
    """Decide what to remove so the model keeps `target_flops` (or `target_params`) of its cost.

    Args:
        model: the model; it is not modified.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        target_flops: fraction of the original FLOPs to keep, in (0, 1].
        target_params: fraction of the original parameter count to keep, instead of target_flops.
        importance: "l2" (default), "l1", "random"; "wanda" or "flap" (need `calibration`); "taylor" (needs
            `calibration` and `loss_fn`); or a callable (analysis, tensors) -> scores.
        ignore: modules or parameter names whose parameters are kept whole.
        round_to: keep each layer's width a multiple of this.
        max_ratio: the largest fraction of any one layer's channels that may go.
        allow_lossy: also prune axes normalized by LayerNorm (changes outputs; flagged in the summary).
        uniform: every layer keeps the same widths and head counts (layers are matched by parameter names
            up to the layer index), so a Hugging Face config can describe the result and save_pretrained /
            from_pretrained round-trip.
        calibration: a list of batches shaped like example_inputs; one no-grad pass over them gathers the
            input statistics of every layer that reads channels (passes/calibration.py).
        compensate: True or "ls" (least-squares reconstruction of each layer that lost inputs, folded into
            its kept weights and bias) or "bias" (FLAP's mean compensation); needs `calibration`. A layer
            without a bias gets one.
        loss_fn: for importance="taylor": loss_fn(model, batch) -> scalar loss to differentiate.
        depth: remove this many whole blocks of residual stacks first, the least influential on the
            `calibration` batches (passes/depth.py); widths then make up the rest of the budget.
        tracer: "dispatch" (default: records one eager forward at the ATen level, fast, follows any Python
            control flow) or "export" (torch.export, then core ATen; slower, needs an exportable model).
    """
    started = time.perf_counter()
    if not isinstance(model, torch.nn.Module):
        raise GraphPruneError(f"expected a torch.nn.Module, got {type(model).__name__}")
    kind, ratio = _budget(target_flops, target_params)
    if not 0 < max_ratio <= 1:
        raise ValueError(f"max_ratio must be in (0, 1], got {max_ratio}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    if compensate is True:
        compensate = "ls"
    if depth:
        return _plan_with_depth(model, example_inputs, kind, ratio, depth, dict(
            importance=importance, ignore=sorted(_resolve_ignore(model, ignore)), round_to=round_to,
            max_ratio=max_ratio, allow_lossy=allow_lossy, uniform=uniform, calibration=calibration,
            compensate=compensate, loss_fn=loss_fn, tracer=tracer))
    if (compensate or importance in CALIBRATED) and calibration is None:
        raise ValueError(f"importance={importance!r}, compensate={compensate!r} need calibration=[batch, ...]: "
                         "a few batches of real inputs shaped like example_inputs")
    if importance == "taylor":
        if not callable(loss_fn):
            raise ValueError("importance='taylor' needs loss_fn=lambda model, batch: <scalar loss>, e.g. "
                             "model(**batch, labels=batch['input_ids']).loss for a causal LM")
        from .passes.importance.taylor import TaylorImportance
        scorer = TaylorImportance(model, calibration, loss_fn)
    else:
        scorer = None if importance in CALIBRATED else get_importance(importance)
    ignored = _resolve_ignore(model, ignore)
    graph, _ = _tracer(tracer)(model, example_inputs)
    an = analyze(graph, allow_lossy=allow_lossy)
    flops_model = CostModel(an, an.flop_terms)
    params_model = CostModel(an, an.param_terms)
    keep = _ignored_components(an, ignored)
    lockstep = None
    if uniform:
        from .backends.hf_config import probe
        from .passes.uniform import lockstep_groups

        lockstep, whole = lockstep_groups(an, probe(model))
        keep = whole if keep is None else keep | whole
    tensors = named_tensors(model)
    needs_readers = calibration is not None and (compensate or importance in ("wanda", "flap"))
    readers = collect(model, an, calibration, tensors) if needs_readers else []
    if scorer is None:  # wanda / flap read the statistics just gathered
        scorer = CalibratedImportance(importance, readers, compensate)
    scores = np.asarray(scorer(an, tensors), dtype=np.float64)
    budget = flops_model if kind == "flops" else params_model
    try:
        removed = select(an, scores, budget, ratio, max_ratio=max_ratio, round_to=round_to, keep=keep,
                         budget_name="FLOPs" if kind == "flops" else "parameters",
                         mass=_weight_slices_per_component(an), lockstep=lockstep,
                         normalize=not getattr(scorer, "absolute", False))
    except BudgetError as err:
        if uniform:  # say what uniform=True held back
            raise BudgetError(f"{err}; with uniform=True, widths the model's config cannot describe are kept "
                              "whole: plan without uniform=True and save with graphprune.save",
                              reachable=err.reachable) from err
        raise
    result = _build_plan(an, removed, flops_model, params_model, tensors,
                         {"kind": kind, "ratio": ratio, "uniform": uniform, "importance": str(importance)})
    if compensate:
        result.set_compensation(*compensate_readers(readers, an, result._gone, tensors, compensate))
        result.notes.append(f"compensation ({compensate}) updated {len(result.updates)} tensors from "
                            f"{sum(r.n for r in readers[:1])} calibration tokens")
    result.notes.append(f"planned in {time.perf_counter() - started:.2f} s")
    return result


def _plan_with_depth(model, example_inputs, kind: str, ratio: float, depth: int, options: dict) -> PruningPlan:
    """Skip the least influential blocks, then plan widths on the shallower model for what is left."""
    from .backends.torch import _copy
    from .passes.depth import choose, skip_blocks

    if options["calibration"] is None:
        raise ValueError("depth=N needs calibration=[batch, ...] to measure which blocks matter least")
    if not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be a number of blocks (a non-negative integer), got {depth!r}")
    blocks = choose(model, options["calibration"], depth)
    shallow = skip_blocks(_copy(model), blocks)
    before, after = _totals(model, example_inputs, options["tracer"]), _totals(shallow, example_inputs,
                                                                               options["tracer"])
    left = min(1.0, ratio * before[kind] / after[kind])
    tensors = named_tensors(shallow)
    options["ignore"] = [n for n in options["ignore"] if n in tensors]
    result = plan(shallow, example_inputs, **{f"target_{kind}": left}, **options)
    result.blocks = blocks
    result.flops["before"], result.params["before"] = before["flops"], before["params"]
    result.target.update(kind=kind, ratio=ratio, depth=depth)
    result.lossy = True
    result.notes.append(f"removed {depth} blocks (least influence first): " +
                        ", ".join(f"{name} ({bi:.3f})" for name, _, bi in blocks))
    return result


def _totals(model, example_inputs, tracer: str) -> dict[str, float]:
    an = analyze(_tracer(tracer)(model, example_inputs)[0])
    return {"flops": CostModel(an, an.flop_terms).total(), "params": CostModel(an, an.param_terms).total()}


def prune(model: torch.nn.Module, example_inputs: Any, target_flops: float | None = None, *,
          inplace: bool = False, verify: bool = True, **options: Any) -> torch.nn.Module:
    """Plan and apply in one step; returns the slimmed model (a copy unless inplace=True).

    With verify=True the slim model is run on example_inputs and compared with plan.mask(model). If the
    module's own forward code cannot follow the new widths (a width held as a constant), the recorded
    graph is regenerated as a torch.fx GraphModule with rewritten shapes instead, and the plan's notes
    say so.
    """
    the_plan = plan(model, example_inputs, target_flops, **options)
    if not verify:
        return the_plan.apply(model, inplace=inplace)
    masked = the_plan.mask(model)  # original weights with removed rows zeroed: also the fallback's source
    expected = _outputs(masked, example_inputs)
    slim = the_plan.apply(model, inplace=inplace)
    problem = _compare(slim, example_inputs, expected, the_plan.lossy)
    if problem is None:
        return slim
    from .backends.graph_module import regenerate

    log.warning("the slimmed module does not match the plan (%s); regenerating the recorded graph", problem)
    try:
        graph_module = regenerate(the_plan, masked)
    except Exception as exc:  # any failure here is reported together with the first problem
        raise BackendError(f"the slimmed model is wrong ({problem}) and the recorded graph could not be "
                           f"regenerated ({exc}); keep the offending layers whole with ignore=[...]") from exc
    second = _compare(graph_module, example_inputs, expected, the_plan.lossy)
    if second is not None:
        raise BackendError(f"the slimmed model is wrong ({problem}), and so is the regenerated graph ({second}); "
                           "keep the offending layers whole with ignore=[...]")
    the_plan.notes.append(f"regenerated as a torch.fx GraphModule: the module's forward code could not follow the "
                          f"new widths ({problem}); it replays the recorded path for inputs shaped like the "
                          "example inputs")
    graph_module.graphprune_plan = the_plan
    return graph_module


def _outputs(model, example_inputs) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    from .ir.from_torch import eval_mode
    args, kwargs = normalize_inputs(example_inputs)
    with eval_mode(model), torch.no_grad():
        out = model(*args, **kwargs)
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _compare(model, example_inputs, expected: list[torch.Tensor], lossy: bool) -> str | None:
    """None if `model` reproduces `expected` (the masked model's outputs), else what went wrong."""
    try:
        got = _outputs(model, example_inputs)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    if [t.shape for t in got] != [t.shape for t in expected]:
        return f"output shapes {[tuple(t.shape) for t in got]} instead of {[tuple(t.shape) for t in expected]}"
    if lossy:
        return None
    for a, b in zip(got, expected):
        if not a.is_floating_point():
            continue
        tolerance = 1e-4 if a.dtype in (torch.float32, torch.float64) else 2e-2  # half precision rounds more
        if (a - b).abs().max() > tolerance * b.abs().max().clamp_min(1e-6):
            return f"outputs differ from the masked model by {float((a - b).abs().max()):.2e}"
    return None


def _tracer(name: str):
    if name == "dispatch":
        return trace
    if name == "export":
        from .ir.from_export import trace_export
        return trace_export
    raise ValueError(f"unknown tracer {name!r}; choose 'dispatch' (default) or 'export'")


def _budget(target_flops, target_params) -> tuple[str, float]:
    if (target_flops is None) == (target_params is None):
        raise ValueError("give exactly one budget: target_flops=R or target_params=R, with R in (0, 1] the "
                         "fraction of the original cost to keep")
    kind, ratio = ("flops", target_flops) if target_flops is not None else ("params", target_params)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"target_{kind} must be a number in (0, 1] (the fraction of {kind} to keep), got "
                         f"{ratio!r}")
    return kind, float(ratio)


def _resolve_ignore(model: torch.nn.Module, ignore) -> set[str]:
    """Parameter/buffer names to keep whole, from modules, module names or parameter names."""
    if ignore is None:
        return set()
    if isinstance(ignore, (str, torch.nn.Module)):
        ignore = [ignore]
    tensors = named_tensors(model)
    modules = dict(model.named_modules())
    by_id = {id(m): n for n, m in modules.items()}
    names: set[str] = set()
    for item in ignore:
        if isinstance(item, torch.nn.Module):
            if id(item) not in by_id:
                raise ValueError(f"ignore: module {type(item).__name__} is not part of this model")
            prefix = by_id[id(item)]
        elif isinstance(item, str):
            prefix = item
        else:
            raise ValueError(f"ignore entries must be modules or names, got {type(item).__name__}")
        hits = [n for n in tensors if n == prefix or n.startswith(prefix + ".") or not prefix]
        if not hits:
            raise ValueError(f"ignore: '{prefix}' names no module or parameter of this model; module names "
                             f"look like {list(modules)[1:4]}")
        names.update(hits)
    return names


def _ignored_components(an: Analysis, names: set[str]) -> np.ndarray | None:
    if not names:
        return None
    keep = np.zeros(int(an.component.max()) + 1, dtype=bool)
    for name in names:
        v = an.graph.params.get(name)
        if v is None:
            continue
        for axis in range(v.ndim):
            keep[an.component[an.elements(v, axis)]] = True
    return keep


def _weight_slices_per_component(an: Analysis) -> np.ndarray:
    """How much of the network one component is: the rows and columns it owns across weight matrices. An
    MLP channel is 3 (up, gate, down), a conv channel 2, a residual-stream channel every matrix it crosses,
    a whole attention head head_dim rows of q, k, v and columns of o. Spatial size does not count."""
    mass = np.zeros(len(an.prunable))
    for v in an.graph.params.values():
        if v.ndim >= 2:
            for axis in range(v.ndim):
                mass += np.bincount(an.component[an.elements(v, axis)], minlength=len(mass))
    return np.maximum(mass, 1)


def _rewrites(an: Analysis, gone: np.ndarray) -> list[dict[str, Any]]:
    """Width-holding module attributes the backend must update, one entry per module, kind and width."""
    out: list[dict[str, Any]] = []
    for r in an.records:
        lo = an.space_offset[r.space]
        before = int(an.space_size[r.space])
        after = before - int(gone[an.component[lo:lo + before]].sum())
        entry = {"kind": r.kind, "module": r.module, "before": before, "after": after, "head_dim": r.head_dim}
        if after != before and entry not in out:
            out.append(entry)
    return out


def removed_and_zeroed(an: Analysis, gone: np.ndarray) -> tuple[dict, dict]:
    """Per parameter name and axis: the indices removed, and those mask() zeroes (the producer rows)."""
    removed_idx: dict[str, dict[int, list[int]]] = {}
    zeroed_idx: dict[str, dict[int, list[int]]] = {}
    for name, v in an.graph.params.items():
        rem, zer = {}, {}
        for axis in range(v.ndim):
            ids = an.elements(v, axis)
            hit = gone[an.component[ids]]
            rem[axis] = hit
            zer[axis] = hit & an.zeroed[ids]
        if any(m.any() for m in rem.values()):
            removed_idx[name] = indices_by_axis(rem)
            z = indices_by_axis(zer)
            if z:
                zeroed_idx[name] = z
    return removed_idx, zeroed_idx


def _build_plan(an: Analysis, removed: np.ndarray, flops: CostModel, params: CostModel,
                tensors: dict[str, torch.Tensor], target: dict[str, Any]) -> PruningPlan:
    from .report import family_rows, layer_rows, pinned_rows

    gone = np.zeros(int(an.component.max()) + 1, dtype=bool)
    gone[removed] = True
    removed_idx, zeroed_idx = removed_and_zeroed(an, gone)
    result = PruningPlan(
        removed=removed_idx, zeroed=zeroed_idx,
        fingerprint={n: list(t.shape) for n, t in tensors.items()},
        target=target,
        flops={"before": flops.total(), "after": flops.total(removed)},
        params={"before": params.total(), "after": params.total(removed)},
        lossy=bool(an.lossy[removed].any()) if len(removed) else False,
        rewrites=_rewrites(an, gone),
    )
    result._analysis, result._gone = an, gone  # kept in memory only, for the regenerated-graph fallback
    result.layers = layer_rows(flops, params, removed)
    result.groups = family_rows(an, gone)
    result.pinned = pinned_rows(an)
    return result
