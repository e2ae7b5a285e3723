"""Rendering a plan for people: the text summary, the explanation of pinned channels, and the HTML page with an
SVG chart of widths. The rows they show are computed in report.py; nothing here reads a model or a graph."""

from __future__ import annotations

import html
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import UsageError
from .files import atomic_write

if TYPE_CHECKING:
    from .plan import PruningPlan


def fmt_num(x: float) -> str:
    """A count with a K / M / G suffix, as cost tables show FLOPs and parameters."""
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
                     f"{fmt_num(r['flops_before']) + ' > ' + fmt_num(r['flops_after']):>17} "
                     f"{fmt_num(r['params_before']) + ' > ' + fmt_num(r['params_after']):>17}")
    unchanged = sum(1 for r in plan.layers if r["shape_before"] == r["shape_after"]
                    and r["flops_before"] == r["flops_after"])
    lines.append(f"({unchanged} layers unchanged)")
    lines.append(f"FLOPs:  {fmt_num(plan.flops['before'])} -> {fmt_num(plan.flops['after'])} "
                 f"({plan.flops_ratio:.3f} of original; target {plan.target['kind']} {plan.target['ratio']})")
    lines.append(f"params: {fmt_num(plan.params['before'])} -> {fmt_num(plan.params['after'])} "
                 f"({plan.params_ratio:.3f} of original)")
    if plan.latency:
        lines.append(latency_line(plan.latency))
    if plan.ridges:
        lines.append(ridges_line(plan.ridges))
    pruned = sum(1 for g in plan.groups if g["after"] < g["before"])
    lines.append(f"groups: {len(plan.groups)} prunable, {pruned} pruned; "
                 f"{sum(p['channels'] for p in plan.pinned)} weighted channels pinned (plan.explain() says why)")
    if plan.lossy:
        lines.append("LOSSY: some removed channels were normalized by LayerNorm; outputs change beyond the removed "
                     "channels' contribution")
    lines.extend(plan.notes)
    return "\n".join(lines)


def ridges_line(ridges: list[dict[str, Any]]) -> str:
    """How least squares chose its ridges on the held-out calibration batches (plan.ridges)."""
    chosen = [r["ridge"] for r in ridges if r["ridge"] is not None]
    errors = [r["error_vs_bias"] for r in ridges if r["error_vs_bias"] is not None]
    line = (f"least squares: ridge chosen per layer on {ridges[0]['held_out_tokens']} held-out calibration tokens "
            f"(fitted on {ridges[0]['fitted_tokens']}): {len(ridges) - len(chosen)} of {len(ridges)} layers "
            "bias-only")
    if chosen:
        line += f", ridge {min(chosen):g}..{max(chosen):g} (median {float(np.median(chosen)):g}) elsewhere"
    if errors:
        line += f"; held-out error {float(np.median(errors)):.2f} of bias-only's (median)"
    return line


def latency_line(lat: dict[str, Any]) -> str:
    """Predicted latency, and measured once the pruned model was timed. Speed-ups are compared, not
    milliseconds: the table was measured earlier, under another machine load."""
    predicted = lat["before"] / lat["after"]
    line = (f"latency: {lat['before']:.2f} ms -> {lat['after']:.2f} ms predicted ({predicted:.2f}x; {lat['runtime']}, "
            f"{lat['threads']} thread(s), widths multiples of {lat['block']})")
    if "measured_after" in lat:
        measured = lat["measured_before"] / lat["measured_after"]
        line += (f"; measured {lat['measured_before']:.2f} -> {lat['measured_after']:.2f} ms ({measured:.2f}x, "
                 f"{100 * (predicted / measured - 1):+.1f}% from the predicted speed-up)")
    return line


def explain(plan: PruningPlan) -> str:
    return "\n".join(explain_rows(plan.pinned))


def explain_rows(pinned: list[dict[str, Any]]) -> list[str]:
    """Text lines for pinned_rows(): each reason, its channel count and a few places where it happened."""
    if not pinned:
        return ["no weighted channels were pinned"]
    lines = ["weighted channels kept whole, by reason:"]
    for row in pinned:
        lines.append(f"  {row['channels']:>6}  {row['reason']}")
        more = f" (+{row['sites'] - len(row['examples'])} more)" if row["sites"] > len(row["examples"]) else ""
        lines.append(f"          at {'; '.join(row['examples'])}{more}")
    return lines


def width_chart(groups: list[dict[str, Any]]) -> str:
    """An SVG bar per prunable group: width after (dark) over width before (light)."""
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
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + right + 90}" height="{height}" '
            f'font-family="sans-serif" font-size="11"><text x="{left}" y="16">width after (dark) of width before '
            f'(light), per prunable group</text>{"".join(rows)}</svg>')


def html_page(plan: PruningPlan) -> str:
    """The report as one self-contained HTML page: totals, the width chart, the summary and the pinned reasons."""
    return ("<!doctype html><html><head><meta charset='utf-8'><title>graphprune report</title></head><body>"
            f"<h1>graphprune report</h1><p>FLOPs {fmt_num(plan.flops['before'])} &rarr; "
            f"{fmt_num(plan.flops['after'])} ({plan.flops_ratio:.3f}), parameters {fmt_num(plan.params['before'])} "
            f"&rarr; {fmt_num(plan.params['after'])} ({plan.params_ratio:.3f})</p>{width_chart(plan.groups)}"
            f"<h2>Summary</h2><pre>{html.escape(summary(plan))}</pre>"
            f"<h2>Channels kept whole</h2><pre>{html.escape(explain(plan))}</pre></body></html>")


def write_report(plan: PruningPlan, path: str | os.PathLike) -> None:
    """Write html_page(plan) to `path` atomically; the name must end in .html so browsers open it as a page."""
    if not os.fspath(path).lower().endswith((".html", ".htm")):
        raise UsageError(f"reports are HTML pages (with an SVG chart); name the report file .html, not {path}")
    atomic_write(path, html_page(plan).encode())
