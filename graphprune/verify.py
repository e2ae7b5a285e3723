"""Verification: does a pruned model reproduce the masked original?

`compare_outputs` is the one rule both paths use (the ONNX path hands it ONNX Runtime's arrays). For PyTorch
models, `apply_verified` (what `plan.apply(model)` and `prune()` run by default) applies a plan and proves it:
the slimmed module must reproduce the masked original (the user's model masked in place for one run and restored
bit-identically, so no masked copy of a large model is made), or the recorded graph is regenerated (with batch and
sequence sizes that follow the inputs, found by recording the model again at other sizes) and must, or
graphprune raises. With inplace=True the user's model itself is slimmed and checked, with no second copy of it,
and comes back bit-identical when the check fails (a plan that removes whole blocks is checked on a copy first).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .backends.torch import Undo, apply_plan, mask_plan, masked_in_place
from .errors import BackendError, GraphPruneError, TraceError, UsageError
from .ir.from_torch import eval_mode, normalize_inputs, trace
from .ir.inputs import random_inputs, resized, tensors_of
from .plan import PruningPlan, register_backend

log = logging.getLogger(__name__)
_TOLERANCE, _HALF_TOLERANCE = 1e-4, 2e-2  # relative; half precision rounds at about 1e-3 per op
_SLAB = 1 << 20  # elements compared at a time


def compare_outputs(got: Sequence, want: Sequence, lossy: bool = False, dtypes: Sequence[str] | None = None,
                    tolerance: float | None = None) -> str | None:
    """None if `got` matches `want` output by output, else what differs, in words.

    Outputs are arrays (or anything np.asarray takes). Shapes must always agree; values (relative to the
    largest expected value) unless `lossy`. A NaN or infinity where the reference has none, or the other
    way round, is a mismatch: a model full of NaN never verifies. `dtypes` names each output's original
    precision when the arrays were upcast (bfloat16 has no numpy type), to pick the tolerance;
    `tolerance` (relative) overrides that choice.
    """
    if len(got) != len(want):
        return f"{len(got)} outputs instead of {len(want)}"
    for k, (a, b) in enumerate(zip(got, want)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return f"output {k} has shape {list(a.shape)} instead of {list(b.shape)}"
        if not np.issubdtype(b.dtype, np.floating):  # ids, counts, shapes: exactly (an argmax only at a near-tie)
            if not lossy and not np.array_equal(a, b):
                return f"output {k} (integers) differs in {int((a != b).sum())} of {b.size} places"
            continue
        # a slab at a time: a large vocabulary's logits are compared without several float64 copies of them
        a, b = a.reshape(-1), b.reshape(-1)
        placed, all_nan, signs, largest, err, finite_any = True, True, True, 0.0, 0.0, False
        for lo in range(0, max(b.size, 1), _SLAB):
            x, y = a[lo:lo + _SLAB], b[lo:lo + _SLAB]
            nan_y = np.isnan(y)
            placed &= not ((np.isnan(x) != nan_y).any() or (np.isinf(x) != np.isinf(y)).any())
            all_nan &= bool(nan_y.all())
            finite = np.isfinite(y)
            signs &= not (x[~finite] != y[~finite]).any()
            if finite.any():
                x, y = x[finite].astype(np.float64), y[finite].astype(np.float64)
                finite_any = True
                largest = max(largest, float(np.abs(y).max()))
                err = max(err, float(np.abs(x - y).max()))
        if not placed:
            return f"output {k} is not finite in the same places (NaN or infinity in one of them)"
        if all_nan and b.size:
            return f"output {k} is NaN everywhere: nothing to compare"
        if lossy or not b.size:
            continue
        if not signs:
            return f"output {k} has infinities of the other sign"
        if not finite_any:
            continue
        precision = dtypes[k] if dtypes is not None else str(b.dtype)
        relative = tolerance if tolerance is not None else (
            _TOLERANCE if precision.removeprefix("torch.") in ("float32", "float64") else _HALF_TOLERANCE)
        scale = max(largest, 1e-6)
        if err > relative * scale:
            return f"output {k} differs by {err:.3g} (largest value {scale:.3g}, tolerance {relative:g} relative)"
    return None


# what forward code raises when a width it holds no longer fits; anything else (a bug, out of memory) propagates
_SHAPE_ERRORS = (RuntimeError, ValueError, IndexError, TypeError, AssertionError, KeyError)


def apply_verified(plan: PruningPlan, model: nn.Module, inplace: bool = False, verify: bool = True,
                   example_inputs: Any = None) -> nn.Module:
    """The slimmed model, checked against plan.mask(model) on the example inputs (see module docstring)."""
    if not verify:
        return apply_plan(plan, model, inplace=inplace)
    inputs = _inputs_for(plan, example_inputs)
    expected = masked_outputs(plan, model, inputs)
    if inplace and not plan.blocks:
        problem = _in_place_checked(plan, model, inputs, expected)
        if problem is None:
            return model
    else:
        try:
            slim = apply_plan(plan, model)  # a copy, also for inplace=True with blocks: the user's model changes once it passed
        except BackendError as exc:  # the module cannot be slimmed (an RMS norm without an eps attribute)
            slim, problem = None, str(exc)
        else:
            problem = _check_against(plan, model, slim, inputs, expected)
        if problem is None and not inplace:
            return slim
        del slim
        if problem is None:
            return apply_plan(plan, model, inplace=True)  # deterministic: the module that was just checked
    log.warning("the slimmed module does not match the plan (%s); regenerating the recorded graph", problem)
    return _regenerated(plan, model, inputs, expected, problem)


def _in_place_checked(plan: PruningPlan, model: nn.Module, inputs: Any, expected: list[torch.Tensor]) -> str | None:
    """Slim the user's model itself and check it, with no second copy of it: None if it passed, else what went
    wrong, the model restored bit-identically (backends/torch.py Undo). A model that misses the tolerance is
    checked again in a wider float type (_check_widened), which needs the original for the reference."""
    problem = _slim_and_check(plan, model, lambda: check(model, inputs, expected, plan.lossy))
    narrow = _narrow(model)
    if problem is None or narrow is None:
        return problem
    wide, expected = _wide_reference(plan, model, inputs, narrow)
    return _slim_and_check(plan, model, lambda: _check_wide(plan, model, wide, expected, narrow), problem)


def _slim_and_check(plan: PruningPlan, model: nn.Module, run_check, narrow_problem: str | None = None) -> str | None:
    """apply_plan in place, then run_check(); undone unless it passed."""
    undo = Undo(model)
    try:
        try:
            apply_plan(plan, model, inplace=True, undo=undo)
        except BackendError as exc:  # the module cannot be slimmed (an RMS norm without an eps attribute)
            problem = str(exc)
        else:
            problem = run_check()  # a BackendError from the slim model's forward propagates, as on the copy path
    except BaseException:
        undo.restore()
        raise
    if problem is not None:
        undo.restore()
    elif narrow_problem is not None:
        plan.notes.append(_WIDE_NOTE.format(narrow_problem))
    return problem


# each float type and the wider one that tells its rounding from a real mismatch
_WIDER = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float64}


def _narrow(model: nn.Module) -> torch.dtype | None:
    """The model's narrowest float type that a wider one can check (half precision first)."""
    dtypes = {t.dtype for t in model.parameters()}
    return next((d for d in _WIDER if d in dtypes), None)


@contextlib.contextmanager
def _widened(module: nn.Module, narrow: torch.dtype):
    """The module's parameters and buffers of `narrow`'s width (both half types for half) in the wider type for a
    while; they come back bit-identical (every narrow value is a wider one), as the same objects."""
    wide = _WIDER[narrow]
    changed = [(t, t.dtype) for t in itertools.chain(module.parameters(), module.buffers())
               if _WIDER.get(t.dtype) == wide]
    for t, _ in changed:
        t.data = t.data.to(wide)
    try:
        yield
    finally:
        for t, dtype in changed:
            t.data = t.data.to(dtype)


def _check_against(plan: PruningPlan, model: nn.Module, slim: nn.Module, inputs: Any,
                   expected: list[torch.Tensor]) -> str | None:
    """check(), and for a model that misses the tolerance, the wider run below."""
    problem = check(slim, inputs, expected, plan.lossy)
    if problem is not None and _narrow(model) is not None:
        problem = _check_widened(plan, model, slim, inputs, problem)
    return problem


def _check_widened(plan: PruningPlan, model: nn.Module, slim: nn.Module, inputs: Any, problem: str) -> str | None:
    """Every op rounds, and through many layers (or the outlier activations of LLMs, SmolLM2's reach thousands) the
    slim and the masked model drift apart by more than a fixed tolerance although they compute the same function:
    the same weights run in the wider type (half in float32, float32 in float64) tell a real mismatch from rounding
    (for the run, the model takes twice its memory). What is left is the one rounding of the weights the slim model
    rewrote (compensation, rescaled RMS norms): the tolerance is the narrow type's epsilon (bfloat16: 0.0078 of the
    largest output; float32: 1.2e-7)."""
    narrow = _narrow(model)
    wide, expected = _wide_reference(plan, model, inputs, narrow)
    again = _check_wide(plan, slim, wide, expected, narrow)
    if again is None:
        plan.notes.append(_WIDE_NOTE.format(problem))
    return again


_WIDE_NOTE = "verified with the same weights in a wider float type: the outputs differ by rounding ({})"


def _wide_reference(plan: PruningPlan, model: nn.Module, inputs: Any, narrow: torch.dtype
                    ) -> tuple[Any, list[torch.Tensor]]:
    """The inputs widened, and the masked model's outputs on them with its weights widened."""
    wide = _WIDER[narrow]
    widen = lambda t: t.to(wide) if isinstance(t, torch.Tensor) and _WIDER.get(t.dtype) == wide else t  # noqa: E731
    inputs = tree_map(widen, inputs)
    with _widened(model, narrow):
        return inputs, masked_outputs(plan, model, inputs)


def _check_wide(plan: PruningPlan, slim: nn.Module, inputs: Any, expected: list[torch.Tensor],
                narrow: torch.dtype) -> str | None:
    """check() with the slim model's weights widened, within the narrow type's epsilon (see above)."""
    with _widened(slim, narrow):
        return check(slim, inputs, expected, plan.lossy, torch.finfo(narrow).eps)


def masked_outputs(plan: PruningPlan, model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    """outputs(plan.mask(model), inputs) without a masked copy of the model: the user's model is masked in
    place for the one run and comes back bit-identical (backends/torch.py masked_in_place). A plan that
    removes whole blocks is masked on a copy."""
    if plan.blocks:
        return outputs(mask_plan(plan, model), inputs)
    with masked_in_place(plan, model):
        got = outputs(model, inputs)
        shared = {t.untyped_storage().data_ptr() for t in model.parameters()}
        shared |= {t.untyped_storage().data_ptr() for t in model.buffers()}
        # an output that is a model tensor (or a view of one) is copied before the model is restored
        return [t.clone() if t.numel() and t.untyped_storage().data_ptr() in shared else t for t in got]


def outputs(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    """Every tensor the model returns, in order, from one no-grad eval-mode run."""
    args, kwargs = normalize_inputs(inputs)
    with eval_mode(model), torch.no_grad():
        out = model(*args, **kwargs)
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def check(model: nn.Module, inputs: Any, expected: list[torch.Tensor], lossy: bool, tolerance: float | None = None
          ) -> str | None:
    """None if `model` reproduces `expected` (compare_outputs' rule), else what went wrong. An exception that
    forward code raises on a width it cannot follow is a mismatch; any other is a BackendError."""
    try:
        got = outputs(model, inputs)
    except (torch.OutOfMemoryError, MemoryError, GraphPruneError):
        raise
    except _SHAPE_ERRORS as exc:
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    except Exception as exc:
        raise BackendError(f"the pruned model raised {type(exc).__name__} ({exc}), not a shape mismatch that a "
                           "regenerated graph could fix; keep the layers it involves whole with ignore=[...]") from exc
    return compare_outputs([_array(t) for t in got], [_array(t) for t in expected], lossy,
                           dtypes=[str(t.dtype) for t in expected], tolerance=tolerance)


def _array(t: torch.Tensor) -> np.ndarray:
    """As numpy, in a precision numpy has that holds every value exactly (bfloat16 and half go to float32;
    compare_outputs takes float64 a slab at a time)."""
    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t.numpy()


def _inputs_for(plan: PruningPlan, example_inputs: Any) -> Any:
    if example_inputs is not None:
        return example_inputs
    kept = getattr(plan, "_example_inputs", None)
    if kept is not None:
        return kept
    if plan.inputs:
        return random_inputs(plan.inputs)
    raise UsageError("this plan records no example inputs to verify with (a plan file from an older version, or "
                     "inputs that are not tensors): pass example_inputs=... or verify=False")


def _regenerated(plan: PruningPlan, model: nn.Module, inputs: Any, expected: list[torch.Tensor],
                 problem: str) -> nn.Module:
    masked = mask_plan(plan, model)  # the source of the sliced weights (compensation applied)
    an, gone = getattr(plan, "_analysis", None), getattr(plan, "_gone", None)
    if an is None or plan.added:  # a plan loaded from JSON, or biases compensation added: record the graph again
        an, gone = _analysis_of(plan, masked, inputs)
    module, follows, why = _dynamic_graph(plan, masked, an, gone, inputs)
    batch = _batch_axes(inputs)
    if module is None and batch and next(iter(batch.values())) == 1:
        # some ops decompose otherwise at batch 1 (a linear layer on a transposed input): record at batch 2
        at_two = resized(inputs, dict.fromkeys(batch, 2))
        again, follows_two, why_two = _dynamic_graph(plan, masked, *_analysis_of(plan, masked, at_two), at_two)
        if again is not None and check(again, inputs, expected, plan.lossy) is None:
            module, follows = again, follows_two
            why = why_two + ["recorded again at batch 2: at batch 1 other ops run"]
    if module is None:
        module = _regenerate(plan, masked, an, gone, {}, inputs, problem)
    second = _check_against(plan, model, module, inputs, expected)
    if second is not None:
        raise BackendError(f"the slimmed model is wrong ({problem}), and so is the regenerated graph ({second}); "
                           "keep the offending layers whole with ignore=[...]")
    note = (f"regenerated as a torch.fx GraphModule: the module's forward code could not follow the new widths "
            f"({problem}); ")
    if follows:
        note += f"it runs at any {' and '.join(follows)} (checked at other sizes)"
    else:
        note += "it replays the recorded shapes: give it inputs shaped like the example inputs"
    if why:
        note += f" ({'; '.join(why)})"
    plan.notes.append(note)
    module.graphprune_plan = plan
    return module


def _dynamic_graph(plan: PruningPlan, masked: nn.Module, an, gone, inputs: Any):
    """(GraphModule whose batch / sequence sizes follow its inputs, which sizes, why not others), or (None, [],
    why) when no size could be made to follow: the model is recorded again at other sizes and compared."""
    from .backends.graph_module import dynamic_ints

    variants, why = [], []
    for symbol, label, axis_sizes in _variable_axes(inputs):
        other = resized(inputs, axis_sizes)
        try:
            graph = trace(masked, other)[0]
        except TraceError as exc:
            why.append(f"the model does not run with another {label} ({str(exc)[:120]})")
            continue
        variants.append((symbol, label, axis_sizes[symbol[:2]], graph, other))
    dynamic, reason = dynamic_ints(an.graph, [(s, n, g) for s, _, n, g, _ in variants])
    if reason or not variants:
        return None, [], why + ([reason] if reason else [])
    try:
        module = _regenerate(plan, masked, an, gone, dynamic, inputs, "sizes that follow the inputs")
    except BackendError as exc:
        return None, [], why + [str(exc)]
    follows = []
    for _symbol, label, size, _graph, other in variants:
        wrong = check(module, other, outputs(masked, other), plan.lossy)
        if wrong is not None:
            return None, [], why + [f"at {label} {size}: {wrong}"]
        follows.append(label)
    return module, follows, why


def _regenerate(plan: PruningPlan, masked: nn.Module, an, gone, dynamic: dict, inputs: Any, problem: str):
    from .backends.graph_module import regenerate

    try:
        kwargs = normalize_inputs(inputs)[1]
        options = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        return regenerate(plan, masked, an, gone, dynamic, _input_names(inputs), options)
    except GraphPruneError as exc:
        raise BackendError(f"the slimmed model is wrong ({problem}) and the recorded graph could not be "
                           f"regenerated ({exc}); keep the offending layers whole with ignore=[...]") from exc


def _batch_axes(inputs: Any) -> dict[tuple[int, int], int]:
    """(input, 0) -> batch size, for every input tensor whose first axis has the first input's size."""
    tensors = tensors_of(inputs)
    if not tensors or not tensors[0].ndim:
        return {}
    batch = tensors[0].shape[0]
    return {(i, 0): batch for i, t in enumerate(tensors) if t.ndim and t.shape[0] == batch}


def _variable_axes(inputs: Any):
    """(symbol, label, {(input, axis): other size}) for the batch axis and, when token ids are among the inputs,
    the sequence axis. A symbol is (input index, axis, size in the example)."""
    tensors = tensors_of(inputs)
    batch = _batch_axes(inputs)
    if batch:
        size = next(iter(batch.values()))
        yield (0, 0, size), "batch size", {key: size + 1 for key in batch}
    ids = [i for i, t in enumerate(tensors) if not t.is_floating_point() and t.ndim >= 2]
    if ids:
        first = tensors[ids[0]]
        seq = first.shape[-1]
        other = seq - 1 if seq > 2 else seq + 1
        axes = {(i, a): other for i, t in enumerate(tensors) if not t.is_floating_point()
                for a in range(1, t.ndim) if t.shape[a] == seq}
        yield (ids[0], first.ndim - 1, seq), "sequence length", axes


def _input_names(inputs: Any) -> list[str]:
    args, kwargs = normalize_inputs(inputs)
    names = [f"input_{i}" for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    return names + [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]


def _analysis_of(plan: PruningPlan, model: nn.Module, inputs: Any):
    """The graph and removed components of a plan that has none in memory, from a new recording of `model`."""
    from .analysis.channels import analyze
    from .passes.pipeline import gone_from_removed

    an = analyze(trace(model, inputs)[0], allow_lossy=True)
    return an, gone_from_removed(an, plan.removed)


register_backend("apply", apply_verified)
