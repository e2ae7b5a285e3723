"""Uniform widths: which channel families must lose channels in lockstep so that every layer keeps the
same widths, and, for Hugging Face models, so that the config can still describe the result.

Families first match by role (their parameter names with layer indices blanked). With a config, roles
that share a config field are merged (T5's encoder and decoder heads both follow num_heads), and a merged
group is kept whole unless removing one unit from each member has an exact config solution (BERT's head
size is hidden_size / num_heads, so its heads cannot change alone).
"""

from __future__ import annotations

import re

import numpy as np

from ..analysis.channels import Analysis
from ..ir.hf_config import Probe, solve_changes


MAX_MULTIPLE = 64  # the largest unit count a config may require a group to lose at a time


def lockstep_groups(an: Analysis, probe: Probe | None) -> tuple[list[list[int]], np.ndarray, dict[int, int]]:
    """Groups of family indices that move together, a per-component mask of what must stay whole, and per
    family the number of units it must lose at a time for the config to stay valid (LLaMA's hidden size is a
    multiple of its head count)."""
    keep = np.zeros(int(an.component.max()) + 1, dtype=bool)
    multiple: dict[int, int] = {}
    by_role: dict[str, list[int]] = {}
    for f in range(len(an.families)):
        by_role.setdefault(re.sub(r"\.\d+\.", ".#.", an.family_role[f]), []).append(f)
    groups = list(by_role.values())
    if probe is None:
        return groups, keep, multiple
    axes = _family_axes(an)
    controlled = probe.controlled()
    fields_of = [set().union(*[controlled.get(w, set()) for f in g for w in axes[f]]) for g in groups]
    merged = _merge_sharing(groups, fields_of)
    out = []
    for g in merged:
        sizes = {len(an.families[f]) for f in g}
        step = next((k for k in range(1, min(MAX_MULTIPLE, min(sizes) - 1) + 1)
                     if _describable(probe, [axes[f] for f in g], k)), None) if len(sizes) == 1 else None
        if step is None:
            for f in g:
                keep[an.families[f]] = True
            continue
        out.append(g)
        if step > 1:
            multiple.update(dict.fromkeys(g, step))
    return out, keep, multiple


def _family_axes(an: Analysis) -> list[dict[tuple[str, int], int]]:
    """Per family: (parameter name, axis) -> elements one of its components holds there."""
    fam_of = np.full(len(an.prunable), -1, dtype=np.int64)
    first = np.full(len(an.prunable), False)
    for f, fam in enumerate(an.families):
        fam_of[fam] = f
        first[fam[0]] = True
    out: list[dict[tuple[str, int], int]] = [{} for _ in an.families]
    for name, v in an.graph.params.items():
        for axis in range(v.ndim):
            comps = an.component[an.elements(v, axis)]
            comps = comps[first[comps]]
            if len(comps):
                ids, counts = np.unique(comps, return_counts=True)
                for c, n in zip(ids, counts):
                    out[fam_of[c]][(name, axis)] = int(n)
    return out


def _merge_sharing(groups: list[list[int]], fields: list[set[str]]) -> list[list[int]]:
    parent = list(range(len(groups)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, fs in enumerate(fields):
        for field in fs:
            if field in owner:
                parent[root(i)] = root(owner[field])
            else:
                owner[field] = i
    merged: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        merged.setdefault(root(i), []).extend(g)
    return list(merged.values())


def _describable(probe: Probe, member_axes: list[dict[tuple[str, int], int]], units: int) -> bool:
    """Would `units` fewer in every member family still be a valid config the architecture builds from?"""
    target = dict(probe.shapes)
    for axes in member_axes:
        for (name, axis), n in axes.items():
            shape = list(target[name])
            shape[axis] -= n * units
            target[name] = tuple(shape)
    changes = solve_changes(probe, target)
    return bool(changes) and probe.valid(changes)
