"""prune() and plan(): trace -> channel analysis -> importance -> budgeted selection -> PruningPlan."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .analysis.channels import Analysis, analyze
from .analysis.cost import CostModel
from .errors import BudgetError, UsageError
from .ir.from_torch import trace
from .ir.inputs import input_specs
from .passes.calibration import CalibratedImportance, Compensate, collect
from .passes.importance import get_importance
from .passes.pipeline import PLAN, Job, check_options, parse_budget, run
from .passes.select import AUTO_ROUND, LLM_ROUND
from .plan import PruningPlan, named_tensors

log = logging.getLogger(__name__)

CALIBRATED = ("wanda", "flap", "obs", "taylor")


def count_flops(model: torch.nn.Module, example_inputs: Any) -> int:
    """FLOPs of one forward pass (2 x MACs of conv / linear / matmul / attention)."""
    graph, _ = trace(model, example_inputs)
    an = analyze(graph)
    return int(round(CostModel(an, an.flop_terms).total()))


def plan(model: torch.nn.Module, example_inputs: Any, target_flops: float | None = None, *,
         target_params: float | None = None, importance: Any = "l2", ignore: Iterable[Any] | None = None,
         round_to: int | str | None = "auto", max_ratio: float = 0.9, allow_lossy: bool = False,
         uniform: bool = False, calibration: Any = None, compensate: bool | str = False,
         loss_fn: Any = None, depth: int = 0, tracer: str = "dispatch", target_latency: float | None = None,
         runtime: str = "onnxruntime", threads: int = 1, allocation: str = "global", propagate: str = "dense"
         ) -> PruningPlan:
    """Decide what to remove so the model keeps `target_flops` (or `target_params`, `target_latency`) of its cost.

    Args:
        model: the model; it is not modified.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        target_flops: fraction of the original FLOPs to keep, in (0, 1].
        target_params: fraction of the original parameter count to keep, instead of target_flops.
        target_latency: fraction of the latency measured on `runtime` ("onnxruntime": the CPU, `threads`
            intra-op threads) to keep, instead of target_flops: the model is exported to ONNX (torch.onnx,
            dynamo; needs onnxscript) and planned there with per-layer latency tables measured once and cached
            (passes/latency.py); importance "l1", "l2" or "random"; plan.latency holds the prediction.
        importance: "l2" (default), "l1", "random"; "wanda" or "flap" (need `calibration`); "obs" (needs
            `calibration`: structured Optimal Brain Surgeon, the output error each component leaves once the
            layers reading it are least-squares compensated, as compensate=True then does; X^T X per reading
            layer, C_in^2 floats each); "taylor" (needs `calibration` and `loss_fn`); or a callable
            (analysis, tensors) -> scores.
        ignore: modules or parameter names whose parameters are kept whole.
        round_to: keep each layer's width a multiple of this; "auto" (default): multiples of 8 for layers of 32
            channels or more (kernels run such widths fastest: resnet50 at half the FLOPs runs 1.7x faster in
            ONNX Runtime instead of 1.5x), exact below, so narrow layers stay prunable; in causal LMs (models
            that generate) multiples of 64 for layers of 256 or more; None or 1: exact widths.
        max_ratio: the largest fraction of any one layer's channels that may go.
        allow_lossy: also prune axes normalized by LayerNorm (changes outputs; flagged in the summary).
        uniform: every layer keeps the same widths and head counts (layers are matched by parameter names
            up to the layer index), so a Hugging Face config can describe the result and save_pretrained /
            from_pretrained round-trip.
        calibration: a list of batches shaped like example_inputs; one no-grad pass over them gathers the
            input statistics of every layer that reads channels (passes/calibration.py).
        compensate: True or "ls" (least-squares reconstruction of each layer that lost inputs, folded into
            its kept weights and bias), "obs" (least squares, with the components each MLP and each layer's
            heads lose re-chosen one at a time by structured OBS, ZipLM's greedy order: the same widths, other
            channels; passes/reselect.py) or "bias" (FLAP's mean compensation); needs `calibration`. A layer
            without a bias gets one. Least squares holds out every 4th calibration batch to choose each
            layer's ridge (plan.ridges); give it 4 or more batches.
        allocation: how many channels each layer loses. "global" (default: one ranking of every component's
            score across layers); "uniform" (the same as uniform=True); "flap" (needs `calibration`: FLAP's
            adaptive structure, its fluctuation metric of down_proj's and o_proj's input columns standardized
            within each layer, one threshold over all, at no extra cost); "search" (needs `calibration`, 4+
            batches: each such width is chosen from the output distance, KL for logits, measured on held-out
            calibration batches with that layer alone cut to a few widths: the best quality for LLMs, minutes to
            hours). With "flap" and "search" the residual stream stays whole (passes/allocation.py).
        propagate: with compensate: "dense" (default: every layer is fitted on the original model's inputs, one
            pass over the calibration) or "pruned" (SparseGPT's order: layer by layer, each fitted on the inputs it
            sees once the layers before it are pruned and compensated, so it also absorbs what they changed; an
            LLM's decoder stack is run block by block on captured hidden states, about three passes over the
            calibration; other models get one pass per rewritten layer, stopped there; passes/propagate.py).
        loss_fn: for importance="taylor": loss_fn(model, batch) -> scalar loss to differentiate.
        depth: remove this many whole blocks of residual stacks first, the least influential on the
            `calibration` batches (passes/depth.py); widths then make up the rest of the budget.
        tracer: "dispatch" (default: records one eager forward at the ATen level, fast, follows any Python
            control flow) or "export" (torch.export, then core ATen; slower, needs an exportable model).
    """
    started = time.perf_counter()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"expected a torch.nn.Module, got {type(model).__name__} (an .onnx file goes through "
                         "graphprune.onnx.plan)")
    kind, ratio = parse_budget(target_flops, target_params, target_latency)
    round_to = check_options(round_to, max_ratio)
    if propagate not in ("dense", "pruned"):
        raise UsageError(f"propagate must be 'dense' or 'pruned', got {propagate!r}")
    if propagate == "pruned" and not compensate:
        raise UsageError("propagate='pruned' refits compensation layer by layer: give compensate=True (or 'bias') "
                         "and calibration=[batch, ...]")
    if kind != "latency" and (runtime != "onnxruntime" or threads != 1):
        raise UsageError("runtime= and threads= say where a latency budget is measured: give target_latency=R")
    if kind == "latency":
        refused = {name: value for name, value in (("ignore", ignore), ("uniform", uniform), ("calibration", calibration),
                                                   ("compensate", compensate), ("depth", depth),
                                                   ("allocation", allocation != "global")) if value}
        if refused or importance not in ("l1", "l2", "random"):
            options = ", ".join(sorted(refused)) or "ignore, uniform, calibration, compensate, depth, allocation"
            raise UsageError(f"target_latency plans on the model's ONNX export, with importance 'l1', 'l2' or "
                             f"'random' and none of {options} (got importance={importance!r}); use target_flops or "
                             "target_params for those")
        return _plan_by_latency(model, example_inputs, ratio, runtime, threads, importance, round_to, max_ratio,
                                allow_lossy, tracer, started)
    if allocation not in ("global", "uniform", "flap", "search"):
        raise UsageError(f"allocation must be 'global', 'uniform', 'flap' or 'search', got {allocation!r}")
    if allocation == "uniform":
        allocation, uniform = "global", True
    if allocation in ("flap", "search") and (uniform or calibration is None):
        raise UsageError(f"allocation={allocation!r} chooses per-layer widths from calibration=[batch, ...] (4 or "
                         "more batches for 'search') and gives layers different widths: not with uniform=True")
    if compensate is True:
        compensate = "ls"
    if compensate not in (False, None, "ls", "bias", "obs"):
        raise UsageError(f"compensate must be True, 'ls', 'obs', 'bias' or False, got {compensate!r}")
    if depth:
        return _plan_with_depth(model, example_inputs, kind, ratio, depth, dict(
            importance=importance, ignore=sorted(_resolve_ignore(model, ignore)), round_to=round_to,
            max_ratio=max_ratio, allow_lossy=allow_lossy, uniform=uniform, calibration=calibration,
            compensate=compensate, loss_fn=loss_fn, tracer=tracer, allocation=allocation, propagate=propagate))
    if (compensate or importance in CALIBRATED) and calibration is None:
        raise UsageError(f"importance={importance!r}, compensate={compensate!r} need calibration=[batch, ...]: "
                         "a few batches of real inputs shaped like example_inputs")
    if importance == "taylor":
        if not callable(loss_fn):
            raise UsageError("importance='taylor' needs loss_fn=lambda model, batch: <scalar loss>, e.g. "
                             "model(**batch, labels=batch['input_ids']).loss for a causal LM")
        from .passes.importance.taylor import TaylorImportance
        scorer = TaylorImportance(model, calibration, loss_fn)
    else:
        scorer = None if importance in CALIBRATED else get_importance(importance)
    if allocation == "search" or propagate == "pruned":
        calibration = list(calibration)  # read again (candidates, refits): a generator would be spent
    an, keep, lockstep, multiple = analyse(model, example_inputs, ignore, uniform, allow_lossy, tracer)
    tensors = named_tensors(model)
    needs_readers = calibration is not None and (compensate or importance in ("wanda", "flap", "obs")
                                                 or allocation in ("flap", "search"))
    readers = collect(model, an, calibration, tensors, grams=importance == "obs") if needs_readers else []
    method = "ls" if compensate == "obs" else compensate  # "obs": least squares after the greedy re-choice
    if scorer is None:  # wanda / flap / obs read the statistics just gathered
        scorer = CalibratedImportance(importance, readers, method)
    job = Job(an, tensors, kind, ratio, scorer, round_to=round_to, max_ratio=max_ratio, keep=keep, lockstep=lockstep,
              multiple=multiple, auto_round=LLM_ROUND if _generates(model) else AUTO_ROUND,
              target={"uniform": uniform, "importance": str(importance), "compensate": compensate or False})
    search, reselect = [], []
    if allocation in ("flap", "search"):  # between Score and Select: it turns the scores into per-family widths
        from .passes.allocation import Allocate

        search = [Allocate(model, readers, calibration, method, how=allocation, greedy=compensate == "obs")]
    if compensate == "obs":  # between Select and Build: the same counts, other members
        from .passes.reselect import Reselect

        reselect = [Reselect(readers)]
    compensation = [Compensate(readers, method)] if method else []
    if propagate == "pruned":
        from .passes.propagate import Refit

        compensation = [Refit(model, readers, method, calibration)]
    passes = PLAN[:2] + search + PLAN[2:3] + reselect + PLAN[3:] + compensation
    try:
        result = run(passes, job).plan
    except BudgetError as err:
        if uniform:  # say what uniform=True held back
            raise BudgetError(f"{err}; with uniform=True, widths the model's config cannot describe are kept "
                              "whole: plan without uniform=True and save with graphprune.save",
                              reachable=err.reachable) from err
        raise
    result.inputs, result._example_inputs = input_specs(example_inputs), example_inputs
    result.notes.append(f"planned in {time.perf_counter() - started:.2f} s")
    return result


def analyse(model: torch.nn.Module, example_inputs: Any, ignore: Any, uniform: bool, allow_lossy: bool,
            tracer: str) -> tuple[Analysis, np.ndarray | None, list[list[int]] | None, dict[int, int]]:
    """The channel analysis, the components kept whole (ignore=, uniform's inexpressible widths), the
    families that move in lockstep (uniform=True) and the unit counts a config makes some families lose at a
    time: what plan() and HESSO select from."""
    ignored = _resolve_ignore(model, ignore)
    graph, _ = _tracer(tracer)(model, example_inputs)
    an = analyze(graph, allow_lossy=allow_lossy)
    keep = _ignored_components(an, ignored)
    lockstep, multiple = None, {}
    if uniform:
        from .ir.hf_config import probe
        from .passes.uniform import lockstep_groups

        lockstep, whole, multiple = lockstep_groups(an, probe(model))
        keep = whole if keep is None else keep | whole
    return an, keep, lockstep, multiple


def _plan_with_depth(model, example_inputs, kind: str, ratio: float, depth: int, options: dict) -> PruningPlan:
    """Skip the least influential blocks, then plan widths on the shallower model for what is left."""
    from .backends.torch import _copy
    from .passes.depth import choose, skip_blocks

    if options["calibration"] is None:
        raise UsageError("depth=N needs calibration=[batch, ...] to measure which blocks matter least")
    if not isinstance(depth, int) or depth < 0:
        raise UsageError(f"depth must be a number of blocks (a non-negative integer), got {depth!r}")
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


def _plan_by_latency(model, example_inputs, ratio: float, runtime: str, threads: int, importance: str, round_to,
                     max_ratio: float, allow_lossy: bool, tracer: str, started: float) -> PruningPlan:
    """Plan on the ONNX export, where the runtime's latency is measured, and carry the removed channels back
    by parameter name (the dynamo exporter keeps them); the plan says if the two analyses group differently."""
    import tempfile

    from . import onnx as gonnx
    from .passes.pipeline import Build, CostModels, gone_from_removed

    gonnx.latency_model(runtime, threads)  # bad arguments raise before the export
    with tempfile.TemporaryDirectory(prefix="graphprune-latency-") as tmp:
        path, feeds = export_onnx(model, example_inputs, os.path.join(tmp, "model.onnx"))
        loaded = gonnx.read(path, allow_lossy=allow_lossy, feeds=feeds)
        exported = gonnx.plan(path, target_latency=ratio, runtime=runtime, threads=threads, importance=importance,
                              round_to=round_to, max_ratio=max_ratio, loaded=loaded)
    an = analyse(model, example_inputs, None, False, allow_lossy, tracer)[0]
    tensors = named_tensors(model)
    shared = set(exported.removed) & set(tensors)  # the exporter may add tensors (a folded batch norm's bias)
    if exported.removed and not shared:
        raise UsageError(f"the ONNX export names its weights differently from the model "
                         f"({sorted(exported.removed)[:3]}): target_latency cannot carry its plan back; use target_flops")
    job = Job(an, tensors, "latency", ratio, None, target={"importance": importance, "runtime": runtime})
    job.removed = np.nonzero(gone_from_removed(an, exported.removed))[0]
    result = run([CostModels(), Build()], job).plan
    result.latency = exported.latency
    if any(result.removed.get(n) != exported.removed[n] for n in shared):
        result.notes.append("the PyTorch analysis groups some channels more coarsely than the ONNX export's: it "
                            "removes more than the latency prediction counted")
    result.inputs, result._example_inputs = input_specs(example_inputs), example_inputs
    result.notes.append(f"planned on the ONNX export in {time.perf_counter() - started:.2f} s")
    return result


def export_onnx(model: torch.nn.Module, example_inputs: Any, path: str) -> tuple[str, dict[str, np.ndarray]]:
    """`model` as an ONNX file (dynamo exporter, static shapes) and its example inputs as ONNX Runtime feeds."""
    import contextlib
    import io
    import warnings

    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise UsageError("target_latency needs example_inputs as a tensor or a tuple of tensors (the ONNX export's "
                         "inputs)")
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as exc:
        raise UsageError("target_latency on a PyTorch model exports it to ONNX, which needs onnxscript: "
                         "pip install onnxscript") from exc
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args, path, dynamo=True, verbose=False)
    except Exception as exc:
        raise UsageError(f"target_latency exports the model to ONNX, and torch.onnx.export failed: "
                         f"{str(exc).splitlines()[0][:300]}; use target_flops") from exc
    import onnx

    names = [i.name for i in onnx.load(path, load_external_data=False).graph.input]
    return path, {n: a.detach().cpu().numpy() for n, a in zip(names, args)}


def _totals(model, example_inputs, tracer: str) -> dict[str, float]:
    an = analyze(_tracer(tracer)(model, example_inputs)[0])
    return {"flops": CostModel(an, an.flop_terms).total(), "params": CostModel(an, an.param_terms).total()}


def prune(model: torch.nn.Module, example_inputs: Any, target_flops: float | None = None, *,
          inplace: bool = False, verify: bool = True, **options: Any) -> torch.nn.Module:
    """Plan and apply in one step; returns the slimmed model (a copy unless inplace=True).

    With verify=True the slim model is run on example_inputs and compared with plan.mask(model). If the
    module's own forward code cannot follow the new widths (a width held as a constant), the recorded
    graph is regenerated as a torch.fx GraphModule with rewritten shapes instead, and the plan's notes
    say so (see PruningPlan.apply). With target_latency the plan is `slim.graphprune_plan`, and its `latency`
    also holds the original and the slim model's latency measured side by side (their ONNX exports).
    """
    the_plan = plan(model, example_inputs, target_flops, **options)
    slim = the_plan.apply(model, inplace=inplace, verify=verify)
    if the_plan.latency is not None:
        if not inplace:
            _measure_latency(the_plan, model, slim, example_inputs)
        slim.graphprune_plan = the_plan  # graphprune.save(slim, path) stores it
        from .render import latency_line
        log.info(latency_line(the_plan.latency))
    return slim


def _measure_latency(the_plan: PruningPlan, model, slim, example_inputs) -> None:
    """Time the original and the slim model's ONNX exports side by side: plan.latency's measured values."""
    import tempfile

    from .onnx import time_side_by_side

    with tempfile.TemporaryDirectory(prefix="graphprune-latency-") as tmp:
        before, feeds = export_onnx(model, example_inputs, os.path.join(tmp, "model.onnx"))
        after, _ = export_onnx(slim, example_inputs, os.path.join(tmp, "slim.onnx"))
        time_side_by_side(the_plan.latency, before, after, feeds)


def sparsify(model: torch.nn.Module, example_inputs: Any, pattern: str = "2:4", *, method: str = "magnitude",
             calibration: Any = None, ignore: Iterable[Any] | None = None, inplace: bool = False,
             permute: bool = False, semi_structured: bool = False) -> torch.nn.Module:
    """N:M semi-structured sparsity (passes/nm.py): in every M consecutive input channels of each eligible Linear /
    convolution weight, only N weights stay non-zero (2:4: what NVIDIA sparse tensor cores run).

    Args:
        model: the model; masked in place only with inplace=True, else a masked copy is returned.
        example_inputs: inputs the masked model is run on before it is handed back (its outputs must stay finite).
        pattern: "N:M", default "2:4".
        method: "magnitude" (default, no data), "wanda" (|W| x input norm) or "sparsegpt" (masks chosen and kept
            weights updated through the inverse Hessian of each layer's inputs); the last two need `calibration`.
        calibration: a list of batches shaped like example_inputs.
        ignore: modules or parameter names kept dense.
        permute: reorder each prunable channel group first (passes/permute.py) so the masks keep more magnitude;
            the reordered model is checked to compute exactly what the original did (else the order is undone).
        semi_structured: on a CUDA GPU with sparse tensor cores, masked float16 / bfloat16 Linear weights become
            torch semi-structured sparse tensors (backends/sparse_kernels.py); elsewhere they stay masked dense,
            and each layer's `kernel` in the report says which and why.
    The returned model's ``graphprune_sparsity`` is a SparsityReport: every weighted layer, masked or skipped
    with the reason, and the share of |W| each mask keeps.
    """
    import copy

    from .errors import GraphPruneError
    from .passes.calibration import reader_kind
    from .passes.nm import holds_pattern, parse_pattern, sparsify_layers
    from .verify import outputs

    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"expected a torch.nn.Module, got {type(model).__name__}")
    n, m = parse_pattern(pattern)
    if semi_structured and (n, m) != (2, 4):
        raise UsageError(f"semi_structured=True runs 2:4 kernels; pattern {pattern!r} has none")
    ignored = _resolve_ignore(model, ignore)
    target = model if inplace else copy.deepcopy(model)

    def reorder(layers, report):
        _permute_channels(target, example_inputs, layers, n, m, report)

    report = sparsify_layers(target, n, m, method, calibration, ignored, reorder if permute else None)
    modules = dict(target.named_modules())
    for layer in report.masked:
        kind, in_axis = reader_kind(modules[layer.name])
        if not holds_pattern(modules[layer.name].weight, kind, in_axis, n, m):
            raise GraphPruneError(f"{layer.name}: the mask does not hold {n}:{m} (a graphprune bug; please report)")
    if semi_structured:
        from .backends.sparse_kernels import to_kernels

        to_kernels(target, report)
    if any(t.is_floating_point() and not torch.isfinite(t).all() for t in outputs(target, example_inputs)):
        raise GraphPruneError(f"the {n}:{m}-masked model gives non-finite outputs on example_inputs; try "
                              "method='sparsegpt' or ignore= the layers that break it"
                              + ("" if inplace else " (your model is unchanged)"))
    target.graphprune_sparsity = report
    log.info("%s", report)
    return target


def _permute_channels(model: torch.nn.Module, example_inputs: Any, layers, n: int, m: int, report) -> None:
    """Channel permutation before masking; kept only if the reordered model reproduces the original outputs."""
    from .passes.permute import apply_permutations, plan_permutations
    from .verify import check, outputs

    an = analyze(trace(model, example_inputs)[0])
    found = plan_permutations(model, an, layers, n, m)
    if not found:
        report.notes.append("channel permutation: no group gained")
        return
    expected = outputs(model, example_inputs)
    apply_permutations(model, found)
    problem = check(model, example_inputs, expected, lossy=False)
    if problem is not None:
        apply_permutations(model, found, inverse=True)
        report.notes.append(f"channel permutation undone: the reordered model differs ({problem})")
        return
    before, after = sum(p.kept_before for p in found), sum(p.kept_after for p in found)
    report.notes.append(f"channel permutation: {len(found)} groups reordered, |W| kept by the masks on their "
                        f"readers {before:.6g} -> {after:.6g} (+{after / before - 1:.2%})")


def _tracer(name: str):
    if name == "dispatch":
        return trace
    if name == "export":
        from .ir.from_export import trace_export
        return trace_export
    raise UsageError(f"unknown tracer {name!r}; choose 'dispatch' (default) or 'export'")


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
                raise UsageError(f"ignore: module {type(item).__name__} is not part of this model")
            prefix = by_id[id(item)]
        elif isinstance(item, str):
            prefix = item
        else:
            raise UsageError(f"ignore entries must be modules or names, got {type(item).__name__}")
        hits = [n for n in tensors if n == prefix or n.startswith(prefix + ".") or not prefix]
        if not hits:
            raise UsageError(f"ignore: '{prefix}' names no module or parameter of this model; module names "
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


def _generates(model: torch.nn.Module) -> bool:
    """A causal LM (transformers' can_generate): its widths round to LLM_ROUND under round_to="auto"."""
    can_generate = getattr(model, "can_generate", None)
    return callable(can_generate) and bool(can_generate())
