"""PruningPlan: what to remove, as data. It names parameters and buffers and, per axis, the indices to
drop, so it replays onto any fresh instance of the same architecture and saves as plain JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import GraphPruneError
from .files import atomic_write

FORMAT = "graphprune-plan/1"

# "apply" and "mask" for PyTorch models, registered by graphprune.verify and graphprune.backends.torch: the
# plan is data and imports no backend
BACKENDS: dict[str, Callable] = {}


def register_backend(name: str, fn: Callable) -> Callable:
    BACKENDS[name] = fn
    return fn


@dataclass
class PruningPlan:
    removed: dict[str, dict[int, list[int]]]  # tensor name -> axis -> indices removed
    zeroed: dict[str, dict[int, list[int]]]  # parameter name -> axis -> indices mask() zeroes
    fingerprint: dict[str, list[int]]  # every parameter and buffer name -> original shape
    target: dict[str, Any]
    flops: dict[str, float]  # before / after
    params: dict[str, float]
    layers: list[dict[str, Any]] = field(default_factory=list)  # per-module summary rows
    groups: list[dict[str, Any]] = field(default_factory=list)  # per-family widths
    pinned: list[dict[str, Any]] = field(default_factory=list)  # why channels were kept whole
    # module attributes that hold widths: {"kind": "heads"|"rms", "module", "before", "after", "head_dim"}
    rewrites: list[dict[str, Any]] = field(default_factory=list)
    # biases compensation added to layers that had none: [bias name, weight name, weight's output axis]
    added: list[list] = field(default_factory=list)
    # whole blocks replaced by a pass-through, least influential first: [module name, output arity, influence]
    blocks: list[list] = field(default_factory=list)
    lossy: bool = False
    notes: list[str] = field(default_factory=list)
    # the example inputs' shapes, dtypes and value ranges (ir/inputs.py), to verify a loaded plan on
    inputs: list[dict[str, Any]] | None = None
    # target_latency plans: runtime, channel block, measured "before" and predicted "after" ms; once the pruned
    # model was timed, "measured_before" / "measured_after" (passes/latency.py)
    latency: dict[str, Any] | None = None
    # compensate="ls" with held-out calibration batches: per layer, the ridge chosen (None: bias-only), the tokens
    # fitted and held out, and the held-out output error relative to bias-only's (passes/calibration.choose_ridge)
    ridges: list[dict[str, Any]] = field(default_factory=list)

    # ----- results -------------------------------------------------------------------------------
    @property
    def flops_ratio(self) -> float:
        return self.flops["after"] / self.flops["before"] if self.flops["before"] else 1.0

    @property
    def params_ratio(self) -> float:
        return self.params["after"] / self.params["before"] if self.params["before"] else 1.0

    def kept(self, name: str, axis: int) -> list[int] | None:
        """Indices kept along `axis` of tensor `name`, or None if that axis is untouched."""
        gone = self.removed.get(name, {}).get(axis)
        if not gone:
            return None
        return sorted(set(range(self.fingerprint[name][axis])) - set(gone))

    @property
    def updates(self) -> dict[str, torch.Tensor]:
        """Compensated full-shape tensors (in memory only; graphprune.save keeps them with the weights)."""
        return getattr(self, "_updates", {})

    def set_compensation(self, updates: dict[str, torch.Tensor], added: list[tuple[str, str, int]]) -> None:
        """Attach compensation; an added bias follows its weight's removed and zeroed output rows."""
        self._updates = updates
        self.added = [list(a) for a in added]
        for bias, weight, axis in self.added:
            self.fingerprint[bias] = [self.fingerprint[weight][axis]]
            for table in (self.removed, self.zeroed):
                rows = table.get(weight, {}).get(axis)
                if rows:
                    table[bias] = {0: list(rows)}
            self.params["after"] += self.fingerprint[bias][0] - len(self.removed.get(bias, {}).get(0, []))

    # ----- backends --------------------------------------------------------------------------------
    def apply(self, model: torch.nn.Module, inplace: bool = False, verify: bool = True,
              example_inputs: Any = None) -> torch.nn.Module:
        """A physically slimmed model of the same classes; `model` is untouched unless inplace=True.

        With verify=True (default) the slim model must reproduce `self.mask(model)` on the example inputs (those
        given to plan(), or `example_inputs`, or random ones of the recorded shapes for a loaded plan); if the
        model's forward code cannot follow the new widths, the recorded graph is regenerated as a GraphModule
        and checked instead; if that fails too, BackendError. inplace=True changes `model` only once verified.
        """
        return BACKENDS["apply"](self, model, inplace=inplace, verify=verify, example_inputs=example_inputs)

    def mask(self, model: torch.nn.Module) -> torch.nn.Module:
        """A copy of `model` with the same shapes and every removed channel's producer parameters zeroed."""
        return BACKENDS["mask"](self, model)

    # ----- reports ---------------------------------------------------------------------------------
    def summary(self) -> str:
        from .render import summary

        return summary(self)

    def explain(self) -> str:
        from .render import explain

        return explain(self)

    def report(self, path: str | os.PathLike) -> None:
        """Write an HTML page (a chart of every group's width before and after, the summary, the pinned
        reasons) to `path`, a .html file: the page `graphprune prune --report` writes, for any plan."""
        from .render import write_report

        write_report(self, path)

    # ----- persistence -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruningPlan:
        if d.get("format") != FORMAT:
            raise GraphPruneError(f"not a graphprune plan (format {d.get('format')!r}, expected {FORMAT!r})")
        d = {k: v for k, v in d.items() if k != "format"}
        for key in ("removed", "zeroed"):
            d[key] = {name: {int(a): list(ix) for a, ix in axes.items()} for name, axes in d[key].items()}
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, json.dumps(self.to_dict(), indent=1).encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruningPlan:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError as exc:
            raise GraphPruneError(f"no plan file at {path}") from exc
        except json.JSONDecodeError as exc:
            raise GraphPruneError(f"{path} is not a JSON plan file: {exc}") from exc
        return cls.from_dict(data)

    def check_fits(self, model: torch.nn.Module) -> None:
        """Refuse a model whose parameters do not match the one the plan was made for."""
        have = {n: list(t.shape) for n, t in named_tensors(model).items()}
        new = {a[0] for a in self.added}
        missing = [n for n in self.fingerprint if n not in have and n not in new]
        extra = [n for n in have if n not in self.fingerprint]
        wrong = [n for n in self.fingerprint if n in have and have[n] != self.fingerprint[n] and n not in new]
        if missing or extra or wrong:
            detail = "; ".join(f"{what} {names[:3]}" for what, names in
                               (("missing", missing), ("unexpected", extra), ("shape differs for", wrong)) if names)
            raise GraphPruneError(f"this plan was made for a different model ({detail}); build the "
                                  "model with the same architecture and configuration the plan came from")


def named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, each tensor once (tied weights under their first name)."""
    out = dict(model.named_parameters(remove_duplicate=True))
    for n, b in model.named_buffers(remove_duplicate=True):
        out.setdefault(n, b)
    return out


def indices_by_axis(mask_by_axis: dict[int, np.ndarray]) -> dict[int, list[int]]:
    return {a: np.nonzero(m)[0].tolist() for a, m in mask_by_axis.items() if m.any()}
