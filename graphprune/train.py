"""graphprune.HESSO: train a model into its slim form inside the user's own training loop.

A wrapper around any torch.optim optimizer (it never re-implements the update). After `start_step` warm-up
steps, `pruning_periods` decisions spread over `pruning_steps` each choose more units to remove, by the
budgeted selection of graphprune.plan (a FLOPs or parameter cost, round_to, max_ratio, ignore, uniform) from
saliency averaged over the steps since the previous decision (passes/hesso.py). The chosen units' parameter
slices (producer rows, batch norms, readers' columns) shrink linearly to exactly zero over their period, then
are held at zero after every step, with their gradients and the base optimizer's moments zeroed. Removing them
then changes nothing, so `slim()` applies the final plan and verifies it against the trained model.

Distributed: under DDP every rank holds the same parameters and gradients; the averaged scores are all-reduced
anyway and the ranks compare a hash of their decision, so every rank removes the same units.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_map

from .api import analyse
from .errors import BudgetError, UsageError
from .ir.inputs import input_specs
from .passes.hesso import NEEDS_UPDATE, Saliency, Schedule, Slices, term_weights
from .passes.pipeline import Build, CostModels, Job, Score, Select, check_options, parse_budget, run
from .plan import PruningPlan, named_tensors

log = logging.getLogger(__name__)

FORMAT = "graphprune-hesso/1"


class HESSO(torch.optim.Optimizer):
    """Structured-sparse training toward a FLOPs or parameter budget, around any torch.optim optimizer.

    Args:
        model: the model being trained (a DDP / DataParallel wrapper is unwrapped; FSDP is refused).
        example_inputs: inputs for one forward, as for graphprune.plan; also what slim() verifies on.
        optimizer: the base optimizer over the model's parameters (SGD, Adam, AdamW, ...): it does the update.
        target_flops / target_params: the fraction of the cost to keep, in (0, 1].
        start_step: warm-up steps before the first decision.
        pruning_steps: steps from the first decision until every chosen unit is zero.
        pruning_periods: decisions in that span; each removes an equal share of the cost.
        importance: "hesso" (the five-term mix, equal weights), "l2", "taylor", a {term: weight} dict over
            passes.hesso.TERMS, or a callable (analysis, tensors) -> one score per unit (higher = keep).
        ignore, round_to, max_ratio, uniform, tracer: as for graphprune.plan (allow_lossy is refused: a channel a
            LayerNorm normalizes never becomes exactly removable).
        process_group: the group the ranks agree in (default: the world, when torch.distributed is set up).
    """

    def __init__(self, model: torch.nn.Module, example_inputs: Any, optimizer: torch.optim.Optimizer,
                 target_flops: float | None = None, *, target_params: float | None = None, start_step: int = 0,
                 pruning_steps: int = 1000, pruning_periods: int = 10, importance: Any = "hesso",
                 ignore: Iterable[Any] | None = None, round_to: int | str | None = "auto", max_ratio: float = 0.9,
                 uniform: bool = False, allow_lossy: bool = False, tracer: str = "dispatch",
                 process_group: Any = None):
        if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, HESSO):
            raise UsageError(f"optimizer must be a torch.optim optimizer over the model's parameters (SGD, Adam, "
                             f"AdamW, ...), got {type(optimizer).__name__}")
        if allow_lossy:
            raise UsageError("HESSO drives units to zero so that removing them changes nothing, and a channel a "
                             "LayerNorm normalizes never gets there (the zeros still count in its mean and "
                             "variance): prune such axes one-shot with graphprune.prune(..., allow_lossy=True)")
        self.module = _unwrap(model)
        self.kind, self.ratio = parse_budget(target_flops, target_params)
        self.round_to = check_options(round_to, max_ratio)
        self.max_ratio = max_ratio
        self.schedule = Schedule(start_step, pruning_steps, pruning_periods)
        self.weights = term_weights(importance)
        self.importance = importance
        self.base = optimizer
        self.process_group = process_group
        self._init_optimizer_hooks()

        self.an, self.keep, self.lockstep, self.multiple = analyse(self.module, example_inputs, ignore, uniform,
                                                                   allow_lossy, tracer)
        an = self.an
        self.tensors = named_tensors(self.module)
        self.example_inputs = example_inputs
        self.target = {"importance": importance if isinstance(importance, (str, dict)) else "callable",
                       "uniform": uniform, "hesso": {"start_step": start_step, "pruning_steps": pruning_steps,
                                                     "pruning_periods": pruning_periods}}
        costs = Job(an, self.tensors, self.kind, self.ratio, None, self.target)
        CostModels()(costs)
        self.flops, self.params = costs.flops, costs.params
        self.params_by_name = {n: t for n, t in self.tensors.items() if isinstance(t, torch.nn.Parameter)}
        self.slices = Slices(an, self.params_by_name)
        self.candidates = an.prunable.copy() if self.keep is None else an.prunable & ~self.keep
        if not self.candidates.any():
            raise UsageError("the model has no prunable units outside `ignore` (plan.explain() on graphprune.plan "
                             "with the same arguments says why each was kept whole)")
        self._check_optimizer()
        sparse = [n for n, m in self.module.named_modules() if getattr(m, "sparse", False) is True]
        if sparse:
            raise UsageError(f"{sparse[0]} makes sparse gradients, which HESSO cannot hold at zero in place: build "
                             "the embedding with sparse=False")
        self.saliency = Saliency(self.slices)
        self.step_count = 0
        self.decisions = 0  # decisions taken so far
        self.gone = np.zeros(self.slices.n, dtype=bool)  # every unit chosen so far (ramping or zero)
        self.ramping = np.zeros(self.slices.n, dtype=bool)  # chosen at the last decision, not yet zero
        self.notes: list[str] = []  # the last selection's notes; final_notes: those of the end state
        self.final_notes: list[str] = []
        with _quiet():  # BudgetError now, not hours into training
            self._select(self.ratio, self.candidates.astype(np.float64), self.keep)
        self._masks()
        if self.schedule.decision(0) == 0:
            self._decide()

    def _check_optimizer(self) -> None:
        held = {id(p) for g in self.base.param_groups for p in g["params"]}
        if not any(id(p) in held for p in self.params_by_name.values()):
            raise UsageError("the optimizer holds none of this model's parameters: build it on model.parameters() "
                             "of the model given to HESSO (and after any .to(device) that replaces them)")

    # ----- the torch.optim.Optimizer surface: the base optimizer's groups and state ----------------------
    def _init_optimizer_hooks(self) -> None:
        self.defaults = self.base.defaults
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                     "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks"):
            setattr(self, name, OrderedDict())
        self._patch_step_function()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    @property
    def state(self):
        return self.base.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.base.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict[str, Any]:  # torch's keeps only defaults, state and param_groups
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"HESSO({type(self.base).__name__}, target_{self.kind}={self.ratio}, step {self.step_count})"

    # ----- one training step --------------------------------------------------------------------------
    def step(self, closure: Any = None) -> Any:
        """The base optimizer's step, then the HESSO schedule: score, ramp, hold, decide."""
        before = self.before_step()
        loss = self.base.step(closure)
        self.after_step(before)
        return loss

    @torch.no_grad()
    def before_step(self) -> dict[str, torch.Tensor] | None:
        """Zero the gradients of units already at zero; keep what the saliency's update direction needs."""
        name = next(iter(self.slices.axes))
        if self.module.get_parameter(name) is not self.params_by_name[name]:
            raise UsageError(f"the model's parameter {name} was replaced after HESSO was built (FSDP sharding, or "
                             "a reload that assigns new tensors): build HESSO on the model as it trains; FSDP is "
                             "not supported, use DistributedDataParallel")
        for name, mask in self.held.items():
            g = self.params_by_name[name].grad
            if g is not None:
                g.masked_fill_(mask, 0)
        if self.weights is not None and self.schedule.scoring(self.step_count + 1):
            if not any(term in NEEDS_UPDATE for term in self.weights):  # magnitudes only: no copy needed
                self.saliency.add({n: self.params_by_name[n].detach() for n in self.slices.axes}, None)
                return None
            return {n: self.params_by_name[n].detach().clone() for n in self.slices.axes}
        return None

    @torch.no_grad()
    def after_step(self, before: dict[str, torch.Tensor] | None) -> None:
        self.step_count += 1
        t = self.step_count
        if before is not None:
            self.saliency.add(before, {n: self.params_by_name[n] - x for n, x in before.items()})
        if self.ramping.any():
            end = self.schedule.decision(self.decisions)
            factor = (end - t) / (end - t + 1)  # x_t = x_decision * (end - t) / (end - decision) when lr is 0
            for name, mask in self.ramp.items():
                p = self.params_by_name[name]
                p.copy_(torch.where(mask, p * factor, p))
            if t >= end:
                self.ramping[:] = False
                self._masks()
                log.info("HESSO step %d: period %d of %d done, %s", t, self.decisions, self.schedule.periods,
                         self._progress())
        self._hold()
        if self.decisions < self.schedule.periods and t == self.schedule.decision(self.decisions):
            self._decide()

    def _hold(self) -> None:
        """Units at zero stay exactly zero, and so do the base optimizer's moments for them."""
        for name, mask in self.held.items():
            p = self.params_by_name[name]
            p.masked_fill_(mask, 0)
            for value in self.base.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.masked_fill_(mask, 0)

    # ----- decisions -----------------------------------------------------------------------------------
    def _scores(self) -> np.ndarray:
        if self.weights is None:
            scores = np.asarray(self.importance(self.an, self.tensors), dtype=np.float64)
            if scores.shape != (self.slices.n,):
                raise UsageError(f"the importance callable returned {scores.shape} scores, expected one per "
                                 f"unit ({self.slices.n})")
        else:
            weights = self.weights
            if self.saliency.count == 0:  # a decision at step 0, or magnitude terms only: read them now
                self.saliency.add({n: self.params_by_name[n].detach() for n in self.slices.axes}, None)
                if not any(t in weights for t in ("magnitude", "avg_magnitude")):
                    log.warning("HESSO: no update has been made yet (start_step=0), so %s cannot be scored; the "
                                "first decision ranks by magnitude", self.importance)
                    weights = {"magnitude": 1.0}
            scores = self.saliency.scores(weights, self.candidates)
        return np.maximum(_all_reduce_mean(scores, self.process_group), 0)

    def _decide(self) -> None:
        """Choose where the run ends with what is known now, then take this period's share of it, least
        important first: an early period never uses up the fine-grained units the final budget needs."""
        k = self.decisions
        scores = self._scores()
        chosen = self._select(self.ratio, scores, self.keep)
        self.final_notes = self.notes
        if k < self.schedule.periods - 1:
            outside = ~chosen if self.keep is None else ~chosen | self.keep
            try:
                with _quiet():
                    chosen = self._select(self.schedule.ratio(k, self.ratio), scores, outside)
            except BudgetError:  # rounded units of that end state cannot stop at this period's cost
                chosen = self._select(self.schedule.ratio(k, self.ratio), scores, self.keep)
        chosen = _agree(chosen, self.process_group)
        self.ramping = chosen & ~self.gone
        self.gone = chosen
        self.decisions += 1
        self.saliency.reset()
        self._masks()
        log.info("HESSO step %d: decision %d of %d chose %d units (%s)", self.step_count, self.decisions,
                 self.schedule.periods, int(self.ramping.sum()), self._progress())

    def _select(self, ratio: float, scores: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
        """The units to have removed at `ratio` of the cost (a bool per unit), those chosen before included."""
        job = self._job(ratio, scores)
        job.keep, job.force = keep, self.gone
        run([Score(), Select()], job)
        self.notes = job.notes
        chosen = self.gone.copy()
        chosen[job.removed] = True
        return chosen

    def _job(self, ratio: float, scores: np.ndarray | None) -> Job:
        job = Job(self.an, self.tensors, self.kind, ratio, lambda an, tensors: scores, target=self.target,
                  round_to=self.round_to, max_ratio=self.max_ratio, keep=self.keep, lockstep=self.lockstep,
                  multiple=self.multiple)
        job.flops, job.params = self.flops, self.params
        return job

    def _masks(self) -> None:
        self.ramp = self.slices.masks(self.ramping, self.params_by_name)
        self.held = self.slices.masks(self.gone & ~self.ramping, self.params_by_name)

    # ----- results -----------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        """True once every decision is taken and every chosen unit is exactly zero."""
        return self.decisions == self.schedule.periods and not self.ramping.any()

    @property
    def plan(self) -> PruningPlan:
        """The final plan (available after the last decision)."""
        if self.decisions < self.schedule.periods:
            raise UsageError(f"the plan is known after the last decision, at step "
                             f"{self.schedule.decision(self.schedule.periods - 1)}; now at step {self.step_count}")
        job = self._job(self.ratio, None)
        job.removed = np.nonzero(self.gone)[0]
        job.notes = list(self.final_notes) + [
            f"trained into this form by HESSO over {self.schedule.end} steps ({self.schedule.periods} periods)"]
        Build()(job)
        job.plan.inputs = input_specs(self.example_inputs)
        job.plan._example_inputs = self.example_inputs
        return job.plan

    @torch.no_grad()
    def slim(self, verify: bool = True, example_inputs: Any = None) -> torch.nn.Module:
        """A physically slimmed copy of the trained model (same classes), verified on `example_inputs` (default:
        those HESSO was built with, moved to the model's device and floating dtype) to compute what it computes."""
        if not self.finished:
            raise UsageError(f"the model is not in its slim form yet: every chosen unit is zero after step "
                             f"{self.schedule.end}; now at step {self.step_count} (see status())")
        self._hold()
        if example_inputs is None:
            like = next(iter(self.params_by_name.values()))
            example_inputs = tree_map(lambda t: t.to(like.device, like.dtype if t.is_floating_point() else t.dtype)
                                      if isinstance(t, torch.Tensor) else t, self.example_inputs)
        return self.plan.apply(self.module, verify=verify, example_inputs=example_inputs)

    def status(self) -> dict[str, Any]:
        """Where training stands: step, phase, the cost of what is chosen, sparsity, the norm being driven down."""
        s = self.schedule
        phase = ("warm-up" if self.decisions == 0 else "done" if self.finished else
                 f"period {self.decisions} of {s.periods}")
        removed = np.nonzero(self.gone)[0]
        driven = sum(float((p.detach()[self.ramp[n]].double() ** 2).sum()) for n, p in self.params_by_name.items()
                     if n in self.ramp)
        return {
            "step": self.step_count, "phase": phase, "target": self.ratio, "kind": self.kind,
            "flops_ratio": self.flops.total(removed) / max(self.flops.total(), 1e-300),
            "params_ratio": self.params.total(removed) / max(self.params.total(), 1e-300),
            "group_sparsity": float(self.gone.sum() / self.candidates.sum()),
            "zero_units": int((self.gone & ~self.ramping).sum()), "driven_units": int(self.ramping.sum()),
            "driven_norm": driven ** 0.5,
        }

    def _progress(self) -> str:
        st = self.status()
        return (f"FLOPs ratio {st['flops_ratio']:.3f}, params ratio {st['params_ratio']:.3f} (target {self.kind} "
                f"{self.ratio}), group sparsity {st['group_sparsity']:.3f}, driven norm {st['driven_norm']:.3g}")

    # ----- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base.state_dict(), "hesso": {
            "format": FORMAT, "fingerprint": self._fingerprint(), "step": self.step_count,
            "decisions": self.decisions, "gone": torch.from_numpy(self.gone.copy()),
            "ramping": torch.from_numpy(self.ramping.copy()), "saliency": self.saliency.state()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        own = state_dict.get("hesso") if isinstance(state_dict, dict) else None
        if not isinstance(own, dict) or own.get("format") != FORMAT:
            raise UsageError("not a HESSO state_dict (expected {'base': ..., 'hesso': ...} from HESSO.state_dict(); "
                             "a base optimizer's own state_dict goes to that optimizer)")
        if own["fingerprint"] != self._fingerprint():
            raise UsageError("this HESSO state comes from another model, budget or schedule: build HESSO with the "
                             "same model, example input shapes and arguments as the run that saved it")
        self.base.load_state_dict(state_dict["base"])
        self.step_count, self.decisions = int(own["step"]), int(own["decisions"])
        self.gone = own["gone"].numpy().astype(bool).copy()
        self.ramping = own["ramping"].numpy().astype(bool).copy()
        self.saliency.load(own["saliency"])
        self._masks()

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.an.component).tobytes())
        h.update(np.ascontiguousarray(self.candidates).tobytes())
        h.update(repr(self.lockstep).encode())
        h.update(repr((self.kind, self.ratio, self.schedule, self.target, self.round_to, self.max_ratio)).encode())
        return h.hexdigest()[:16]


@contextlib.contextmanager
def _quiet():
    """Selection's own progress lines, muted for the selections the user does not need to read about."""
    logger = logging.getLogger("graphprune.passes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP / DataParallel; FSDP's sharded parameters are refused."""
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"expected a torch.nn.Module, got {type(model).__name__}")
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DataParallel, DistributedDataParallel)):
        model = model.module
    sharded = any(type(m).__name__ in ("FullyShardedDataParallel", "FSDPModule") or type(m).__name__.startswith("FSDP")
                  for m in model.modules())
    sharded = sharded or any(type(p).__name__ in ("DTensor", "FlatParameter") for p in model.parameters())
    if sharded:
        raise UsageError("HESSO needs each rank to hold whole parameters, and this model is sharded by FSDP: "
                         "train with DistributedDataParallel instead (HESSO works before or after DDP wrapping), "
                         "or prune one-shot with graphprune.prune on the gathered model")
    return model


def _distributed(group: Any) -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size(group) > 1)


def _device(group: Any) -> torch.device:
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_mean(scores: np.ndarray, group: Any) -> np.ndarray:
    """The ranks' scores averaged, so every rank ranks the same numbers."""
    if not _distributed(group):
        return scores
    t = torch.from_numpy(scores).to(_device(group))
    torch.distributed.all_reduce(t, group=group)
    return (t / torch.distributed.get_world_size(group)).cpu().numpy()


def _agree(chosen: np.ndarray, group: Any) -> np.ndarray:
    """Check that every rank chose the same units (a hash per rank); if not, all take the first rank's choice."""
    if not _distributed(group):
        return chosen
    dist = torch.distributed
    device = _device(group)
    digest = int.from_bytes(hashlib.sha256(chosen.tobytes()).digest()[:7], "little")
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    hashes = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(hashes, mine, group=group)
    if len({int(h) for h in hashes}) == 1:
        return chosen
    log.warning("HESSO: the ranks chose different units (their parameters or gradients differ: is the model "
                "wrapped in DistributedDataParallel?); every rank takes the first rank's choice")
    t = torch.from_numpy(chosen.astype(np.uint8)).to(device)
    first = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast(t, src=first, group=group)
    return t.cpu().numpy().astype(bool)


__all__ = ["HESSO"]
