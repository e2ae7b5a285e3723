"""propagate="pruned": compensation refitted layer by layer on the inputs each layer sees in the pruned model
(SparseGPT's order), so a layer also absorbs what the pruned, compensated layers before it changed.

The readers that lost inputs are taken in the order the forward pass reaches them; each is observed on every
calibration batch with the readers before it already cut (removed input columns zeroed) and compensated, then
compensated itself (calibration.compensate on the new statistics) and cut. Where every such reader sits in the
blocks of one stack (an nn.ModuleList whose block i+1 takes block i's output, as an LLM's decoder layers), the
first block's inputs are captured once per batch and the stack is run block by block on them: about three
forward passes over the calibration in all. Elsewhere each reader gets a pass of its own through the whole
model, stopped at that reader: about half as many forward passes as there are readers. Where removed channels
also reach layers that are not readers (a residual stream's additions), those still see them while the
statistics are gathered: the statistics are then an approximation (the plan stays exact either way).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..analysis.channels import Analysis
from ..ir.from_torch import eval_mode, normalize_inputs
from .calibration import Cut, Reader, TokenScale, _readers_per_component, compensate, fixed_ridge_note, hold_out
from .pipeline import Pass

log = logging.getLogger(__name__)

CACHES = ("past_key_values", "past_key_value", "layer_past", "cache")  # what a re-run block must not append to


class _Reached(BaseException):
    """Raised where the forward pass has gone far enough (a BaseException: model code that catches Exception
    must not swallow it)."""


class Refit(Pass):
    """The Compensate pass with propagate="pruned": the plan's compensation from refit_in_order."""

    requires = ("an", "tensors", "plan")
    ensures = ("plan",)

    def __init__(self, model: nn.Module, readers: list[Reader], method: str, batches: list):
        self.model, self.readers, self.method, self.batches = model, readers, method, batches

    def __call__(self, job) -> None:
        plan, started = job.plan, time.perf_counter()
        tokens = self.readers[0].n if self.readers else 0
        plan.set_compensation(*refit_in_order(self.model, self.readers, job.an, plan._gone, job.tensors, self.batches,
                                              self.method, plan.ridges))
        plan.notes.append(f"compensation ({self.method}) refitted {len(plan.updates)} tensors layer by layer on the "
                          f"pruned model's inputs (propagate='pruned', {tokens} calibration tokens, "
                          f"{time.perf_counter() - started:.0f} s)")
        fixed_ridge_note(plan, self.method)


def refit_in_order(model: nn.Module, readers: list[Reader], an: Analysis, gone: np.ndarray,
                   tensors: dict[str, torch.Tensor], batches: list, method: str, report: list
                   ) -> tuple[dict[str, torch.Tensor], list[tuple[str, str, int]]]:
    """compensate()'s updates and added biases, each reader fitted on its inputs in the pruned model; the model is
    restored afterwards."""
    readers_of = _readers_per_component(readers, len(an.prunable))
    updates: dict[str, torch.Tensor] = {}
    added: list[tuple[str, str, int]] = []
    started = time.perf_counter()
    with Cut(model) as cut, eval_mode(model), torch.no_grad(), TokenScale().watching(model.modules()) as scale:
        calls = _calls(model, readers, batches[0])
        # in the order they first run; readers batch 0 did not reach (an expert no token chose) after the rest
        losing = sorted((r for r in readers if gone[r.columns].any()),
                        key=lambda r: list(calls).index(r.module) if r.module in calls else len(calls))
        stack = _Stack.find(model, losing, batches)
        runs = stack.runs if stack else lambda _block: [_whole(model, b) for b in batches]
        last = max(stack.owner.values()) if stack else 0
        for block in range(last + 1):
            for r in (stack.readers(block) if stack else losing):
                removed = gone[r.columns]
                if (readers_of[r.columns[removed]] == 1).all():  # compensable: observed on the pruned inputs
                    fresh = _observe(model.get_submodule(r.module), r, runs(block), scale,
                                     stop=calls.get(r.module) == 1)
                    if fresh.n:  # it ran in the pruned model too
                        more, new = compensate([fresh], an, gone, tensors, method, release=True, report=report)
                        updates.update(more)
                        added += new
                cut(r, gone, updates)
            if stack and block < last:
                stack.advance(block)
            log.info("propagate='pruned': block %d refitted (%.0f s)", block, time.perf_counter() - started)
    return updates, added


def _calls(model: nn.Module, readers: list[Reader], batch: Any) -> dict[str, int]:
    """How often each reader's module runs in one forward pass, in the order they first run."""
    calls: dict[str, int] = {}

    def count(name: str) -> None:
        calls[name] = calls.get(name, 0) + 1

    hooks = [model.get_submodule(r.module).register_forward_pre_hook(lambda _m, _a, name=r.module: count(name))
             for r in readers]
    try:
        _whole(model, batch)()
    finally:
        for h in hooks:
            h.remove()
    return calls


def _whole(model: nn.Module, batch: Any) -> Callable[[], Any]:
    args, kwargs = normalize_inputs(batch)
    return lambda: model(*args, **kwargs)


def _observe(module: nn.Module, r: Reader, runs: list[Callable[[], Any]], scale: TokenScale, stop: bool) -> Reader:
    """A new Reader like `r`, fed what `module` sees in each run, its tokens weighted by `scale` (a run stopped
    there when `stop`)."""
    fresh = Reader(r.module, r.weight, r.in_axis, r.kind, want_gram=r.want_gram, columns=r.columns)

    def grab(_m, args):
        fresh.add(args[0], scale.of(args[0]))
        if stop:
            raise _Reached

    hook = module.register_forward_pre_hook(grab)
    try:
        for index, run in enumerate(runs):
            hold_out([fresh], index)
            try:
                run()
            except _Reached:
                pass
    finally:
        hook.remove()
    return fresh.cpu()


def find_stack(model: nn.Module, names: list[str]) -> tuple[str, nn.ModuleList, dict[str, int]] | None:
    """The nn.ModuleList (of two or more blocks) inside whose blocks every module in `names` sits: its name, itself,
    and the block index of each name; None where there is none."""
    if not names:
        return None
    for name, module in model.named_modules():
        if not name or not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        index = [n[len(name) + 1:].split(".", 1)[0] for n in names if n.startswith(name + ".")]
        if len(index) == len(names) and all(i.isdigit() and int(i) < len(module) for i in index):
            return name, module, {n: int(i) for n, i in zip(names, index)}
    return None


class _Stack:
    """The blocks of the nn.ModuleList holding every reader, run one at a time on the pruned model's hidden
    states: block i's first input (positional, or `hidden_states`) is block i-1's output, its other arguments
    those it got in a dense pass (caches dropped)."""

    def __init__(self, name: str, blocks: nn.ModuleList, owner: dict[str, int], order: list[Reader]):
        self.name, self.blocks, self.owner, self.order = name, blocks, owner, order
        self.hidden: list[torch.Tensor] = []
        self.rest: list[list[tuple[tuple, dict]]] = []  # per batch, per block: the other arguments

    @classmethod
    def find(cls, model: nn.Module, losing: list[Reader], batches: list) -> _Stack | None:
        """The stack, its first block's inputs and every block's other arguments captured, or None where the
        readers are not all inside one stack whose blocks chain (the model is then run whole per reader)."""
        found = find_stack(model, [r.module for r in losing])
        if found is None:
            return None
        stack = cls(*found, losing)
        return stack if stack._capture(model, batches) else None

    def _capture(self, model: nn.Module, batches: list) -> bool:
        """One dense pass per batch, stopped after the last block: block 0's hidden states and every block's other
        arguments; False where a block's first input is not the previous block's output."""
        for batch in batches:
            outputs: list[Any] = []
            rest: list[tuple[tuple, dict]] = []

            def before(index, args, kwargs):
                hidden, args, kwargs = _split(args, kwargs)
                if index == 0 and hidden is not None:
                    self.hidden.append(hidden)
                elif hidden is None or not outputs or _first(outputs[-1]) is not hidden:
                    raise _Reached  # not a chain: rest stays short
                args = tuple(None if _cache("", a) else a for a in args)
                kwargs = {k: v for k, v in kwargs.items() if not _cache(k, v)}
                if index and _passes_on(outputs[-1], (*args, *kwargs.values())):
                    raise _Reached  # the previous block hands on more than hidden states (a residual): no chain
                rest.append((args, kwargs))

            def after(index, output):
                outputs.append(output)
                if index == len(self.blocks) - 1:
                    raise _Reached

            hooks = []
            for i, block in enumerate(self.blocks):
                hooks.append(block.register_forward_pre_hook(lambda _m, a, k, i=i: before(i, a, k), with_kwargs=True))
                hooks.append(block.register_forward_hook(lambda _m, _a, out, i=i: after(i, out)))
            try:
                _whole(model, batch)()
            except _Reached:
                pass
            finally:
                for h in hooks:
                    h.remove()
            if len(rest) != len(self.blocks) or len(outputs) != len(self.blocks):
                return False
            self.rest.append(rest)
        return True

    def readers(self, block: int) -> list[Reader]:
        return [r for r in self.order if self.owner[r.module] == block]

    def runs(self, block: int) -> list[Callable[[], Any]]:
        """Block `block` on each batch's current hidden states."""
        return [lambda h=h, rest=rest[block]: self.blocks[block](h, *rest[0], **rest[1])
                for h, rest in zip(self.hidden, self.rest)]

    def advance(self, block: int) -> None:
        """The hidden states become block `block`'s outputs, as the pruned model computes them."""
        self.hidden = [_first(run()) for run in self.runs(block)]


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, tuple, dict]:
    """A block's hidden states (its first positional input, or `hidden_states`), its other arguments."""
    if args:
        return args[0], args[1:], dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states", None), (), kwargs


def _passes_on(output: Any, arguments: tuple) -> bool:
    """Whether any of `arguments` is one of a block output's other items."""
    others = {id(o) for o in output[1:]} if isinstance(output, (tuple, list)) else set()
    return any(id(a) in others for a in arguments if a is not None)


def _cache(name: str, value: Any) -> bool:
    """A key/value cache argument (by name, or a transformers Cache object): a block run again would append to it."""
    return name in CACHES or type(value).__name__.endswith("Cache")


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, (tuple, list)) else output
