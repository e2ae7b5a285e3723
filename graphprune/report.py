"""The data behind a plan's reports: per-layer costs, group widths and pinned channels, computed from an Analysis
and its cost models. Rendering them as text or HTML lives in render.py."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .analysis.channels import Analysis
    from .analysis.cost import CostModel


def layer_rows(flops: CostModel, params: CostModel, removed: np.ndarray,
               readers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per layer: FLOPs by the op's scope, parameters by the module that owns them, or, for a tensor whose
    name names no layer (an ONNX initializer), by the scope of the op that reads it (`readers`)."""
    rows: dict[str, dict[str, Any]] = {}

    def row(label: str) -> dict[str, Any]:
        return rows.setdefault(label, {"layer": label, "flops_before": 0.0, "flops_after": 0.0,
                                       "params_before": 0.0, "params_after": 0.0, "shape_before": None,
                                       "shape_after": None})

    kept_full, kept_now = params.kept_widths(None), params.kept_widths(removed)  # same spaces for both models
    for label, before, after in zip(flops.labels, flops.per_term(kept=kept_full), flops.per_term(kept=kept_now)):
        row(label)["flops_before"] += before
        row(label)["flops_after"] += after
    pairs = zip(params.labels, params.per_term(kept=kept_full), params.per_term(kept=kept_now))
    for i, (label, before, after) in enumerate(pairs):
        module, _, leaf = label.rpartition(".")
        spaces = [s for s in params.factors[i] if s != params.sentinel]
        if module not in rows and (readers or {}).get(label, module) != module:
            module, leaf = readers[label], "weight" if len(spaces) >= 2 else "bias"
        r = row(module)
        r["params_before"] += before
        r["params_after"] += after
        if leaf == "weight":
            r["shape_before"] = [int(kept_full[s]) for s in spaces]
            r["shape_after"] = [int(kept_now[s]) for s in spaces]
    return [r for r in rows.values() if r["params_before"] or r["flops_before"]]


def family_rows(an: Analysis, gone: np.ndarray) -> list[dict[str, Any]]:
    return [{"group": label, "before": len(fam), "after": int((~gone[fam]).sum())}
            for fam, label in zip(an.families, an.family_label)]


def pinned_rows(an: Analysis) -> list[dict[str, Any]]:
    """Channels that own weights but must stay, grouped by reason, with a few places where it happened."""
    counts: dict[str, int] = defaultdict(int)
    where: dict[str, list[str]] = defaultdict(list)
    for comp, (reason, place) in an.pin_reasons.items():
        if an.has_producer[comp]:
            counts[reason] += 1
            if place not in where[reason]:
                where[reason].append(place)
    return [{"reason": r, "channels": n, "sites": len(where[r]), "examples": where[r][:3]}
            for r, n in sorted(counts.items(), key=lambda kv: -kv[1])]
