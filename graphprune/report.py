"""Human-readable reports of a plan: per-layer table, totals, and why channels were kept whole."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .analysis.channels import Analysis
    from .analysis.cost import CostModel
    from .plan import PruningPlan


def layer_rows(flops: CostModel, params: CostModel, removed: np.ndarray) -> list[dict[str, Any]]:
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
        r = row(module)
        r["params_before"] += before
        r["params_after"] += after
        if leaf == "weight":
            spaces = [s for s in params.factors[i] if s != params.sentinel]
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


def _num(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def summary(plan: PruningPlan) -> str:
    lines = [f"{'layer':<40} {'shape before':>22} {'shape after':>22} {'FLOPs':>17} {'params':>17}"]
    for r in plan.layers:
        if r["shape_before"] == r["shape_after"] and r["flops_before"] == r["flops_after"]:
            continue
        shape_b = "x".join(map(str, r["shape_before"] or [])) or "-"
        shape_a = "x".join(map(str, r["shape_after"] or [])) or "-"
        lines.append(f"{r['layer'][:40]:<40} {shape_b:>22} {shape_a:>22} "
                     f"{_num(r['flops_before']) + ' > ' + _num(r['flops_after']):>17} "
                     f"{_num(r['params_before']) + ' > ' + _num(r['params_after']):>17}")
    unchanged = sum(1 for r in plan.layers if r["shape_before"] == r["shape_after"]
                    and r["flops_before"] == r["flops_after"])
    lines.append(f"({unchanged} layers unchanged)")
    lines.append(f"FLOPs:  {_num(plan.flops['before'])} -> {_num(plan.flops['after'])} "
                 f"({plan.flops_ratio:.3f} of original; target {plan.target['kind']} {plan.target['ratio']})")
    lines.append(f"params: {_num(plan.params['before'])} -> {_num(plan.params['after'])} "
                 f"({plan.params_ratio:.3f} of original)")
    pruned = sum(1 for g in plan.groups if g["after"] < g["before"])
    lines.append(f"groups: {len(plan.groups)} prunable, {pruned} pruned; "
                 f"{sum(p['channels'] for p in plan.pinned)} weighted channels pinned (plan.explain() says why)")
    if plan.lossy:
        lines.append("LOSSY: some removed channels were normalized by LayerNorm; outputs change beyond the removed "
                     "channels' contribution")
    lines.extend(plan.notes)
    return "\n".join(lines)


def explain(plan: PruningPlan) -> str:
    return "\n".join(explain_rows(plan.pinned))


def explain_rows(pinned: list[dict[str, Any]]) -> list[str]:
    if not pinned:
        return ["no weighted channels were pinned"]
    lines = ["weighted channels kept whole, by reason:"]
    for row in pinned:
        lines.append(f"  {row['channels']:>6}  {row['reason']}")
        more = f" (+{row['sites'] - len(row['examples'])} more)" if row["sites"] > len(row["examples"]) else ""
        lines.append(f"          at {'; '.join(row['examples'])}{more}")
    return lines


def write_report(plan: PruningPlan, path) -> None:
    """An HTML page: a chart of every group's width before and after, the totals and the pinned reasons."""
    import html
    import os

    from .errors import UsageError
    from .plan import atomic_write

    if not os.fspath(path).lower().endswith((".html", ".htm")):
        raise UsageError(f"reports are HTML pages (with an SVG chart); name the report file .html, not {path}")
    groups = plan.groups
    bar, gap, left, right = 14, 6, 360, 420
    height = max(1, len(groups)) * (bar + gap) + 40
    widest = max((g["before"] for g in groups), default=1)
    rows = []
    for i, g in enumerate(groups):
        y = 30 + i * (bar + gap)
        w_before, w_after = right * g["before"] / widest, right * g["after"] / widest
        label = html.escape(g["group"][:60])
        rows.append(f'<text x="{left - 6}" y="{y + bar - 3}" text-anchor="end">{label}</text>'
                    f'<rect x="{left}" y="{y}" width="{w_before:.1f}" height="{bar}" fill="#cfd8e3"/>'
                    f'<rect x="{left}" y="{y}" width="{w_after:.1f}" height="{bar}" fill="#2b6cb0"/>'
                    f'<text x="{left + w_before + 4:.1f}" y="{y + bar - 3}">{g["after"]} / {g["before"]}</text>')
    chart = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + right + 90}" height="{height}" '
             f'font-family="sans-serif" font-size="11"><text x="{left}" y="16">width after (dark) of width before '
             f'(light), per prunable group</text>{"".join(rows)}</svg>')
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>graphprune report</title></head><body>"
            f"<h1>graphprune report</h1><p>FLOPs {_num(plan.flops['before'])} &rarr; {_num(plan.flops['after'])} "
            f"({plan.flops_ratio:.3f}), parameters {_num(plan.params['before'])} &rarr; "
            f"{_num(plan.params['after'])} ({plan.params_ratio:.3f})</p>{chart}"
            f"<h2>Summary</h2><pre>{html.escape(summary(plan))}</pre>"
            f"<h2>Channels kept whole</h2><pre>{html.escape(explain(plan))}</pre></body></html>")
    atomic_write(path, page.encode())
