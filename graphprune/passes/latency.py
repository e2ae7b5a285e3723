"""Latency budgets (the HALP idea): the selection spends measured milliseconds instead of FLOPs.

Every node that carries FLOPs (a convolution, a Gemm, a MatMul) is timed once on the target runtime over a grid
of the widths it can keep (`Layer`: its input and output channel spaces, the ones pruning can change); between
grid points its time is interpolated bilinearly (a layer's time is close to a + b*c_in + c*c_out + d*c_in*c_out).
Grid widths are multiples of the channel block the runtime was measured to run fastest, which the plan then
keeps. What the layers alone miss comes from a profile of the whole model: a scale on the layers (fusions,
caches), the other kernels (elementwise ops, normalization, pooling, concatenation, layout changes) as a cost
per activation element kept, and the rest of the measured latency as a constant. A backend measures the table
(backends/onnx_latency.py); this module only reads it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from ..analysis.channels import Analysis
from ..analysis.cost import CostModel
from ..analysis.context import CostTerm
from ..files import atomic_write
from .select import auto_multiple

GRID = (0.1, 0.3, 0.55, 0.8, 1.0)  # fractions of a width measured (max_ratio 0.9 keeps at least 0.1)
MAX_COORDINATES = 2  # a layer with more changing widths is timed at full width and scaled by its FLOPs


@dataclass
class Layer:
    """One FLOP-bearing node's measured times: ms[i][j] at widths grid[0][i], grid[1][j] of `spaces`
    ((value id, axis) keys of the analysis); with one space ms[i], with none ms[0] (scaled by FLOPs)."""

    node: int
    label: str
    spaces: list[list[int]]
    grid: list[list[int]]
    ms: list


@dataclass
class LatencyTable:
    """What planning needs from a runtime; JSON on disk, keyed by `fingerprint` (structure, runtime, machine).
    A plan's latency is rest_ms + scale * (its layers' times) + activation_ms * (its activations' share): from
    the whole model's profile, scale brings the layers timed alone to their kernels' time in the model,
    activation_ms is all other kernels, rest_ms what is left of the measured latency (the session)."""

    runtime: str
    fingerprint: str
    threads: int
    block: int  # the channel multiple the runtime was measured to run fastest
    whole_ms: float  # the whole model's measured latency
    rest_ms: float
    scale: float
    activation_ms: float  # what all activations' elementwise work costs at full width (activation_terms)
    layers: list[Layer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, an: Analysis) -> None:
        """Raise ValueError unless every layer's spaces are the analysis' and its times fill its grid."""
        for layer in self.layers:
            missing = [k for k in layer.spaces if tuple(k) not in an.space_index]
            shape = np.shape(layer.ms)
            if missing or shape != (tuple(len(g) for g in layer.grid) or (1,)):
                raise ValueError(f"layer {layer.label}: spaces {missing} unknown or times {shape} do not fill "
                                 f"its grid")

    def save(self, path: str) -> None:
        atomic_write(path, json.dumps(asdict(self)).encode())

    @classmethod
    def load(cls, path: str) -> LatencyTable:
        with open(path) as f:
            data = json.load(f)
        data["layers"] = [Layer(**layer) for layer in data["layers"]]
        return cls(**data)


def layer_spaces(an: Analysis, terms: list[CostTerm]) -> list[int]:
    """The spaces whose kept width changes one node's time: its FLOP factors that hold prunable channels, one
    per set of tied channels; none when more than MAX_COORDINATES (then its FLOPs scale its time)."""
    found: list[int] = []
    seen: list[np.ndarray] = []
    for t in terms:
        for s in t.spaces:
            comps = an.component[an.space_offset[s]:an.space_offset[s] + an.space_size[s]]
            if s in found or an.space_size[s] < 2 or not an.prunable[comps].any():
                continue
            if any(len(c) == len(comps) and (c == comps).all() for c in seen):
                continue
            found.append(int(s))
            seen.append(comps)
    return found if len(found) <= MAX_COORDINATES else []


def grid_widths(an: Analysis, space: int, block: int) -> list[int]:
    """Widths measured for a space: GRID's fractions, rounded to the multiple the plan keeps there (select.py's
    auto_multiple with the measured block), as whole components leave them (a head goes whole), and the full
    width."""
    size = int(an.space_size[space])
    step = auto_multiple(size, block) or 1
    comps = an.component[an.space_offset[space]:an.space_offset[space] + size]
    widths = {int(np.isin(comps, removal_for(an, {space: max(step, int(f * size) // step * step)}),
                          invert=True).sum()) for f in GRID[:-1]}
    return sorted(w for w in widths if 0 < w < size) + [size]


def activation_terms(an: Analysis) -> list[CostTerm]:
    """One term per output of a node that carries no FLOPs (elementwise, normalization, pooling, copies), its
    element count as a function of its prunable channel widths: work the layers' tables do not see."""
    flop = {t.node for t in an.flop_terms}
    terms = []
    for node in an.graph.nodes:
        if node.id in flop:
            continue
        for v in node.outputs:
            spaces = [an.space_index[(v.id, a)] for a in range(v.ndim) if (v.id, a) in an.space_index]
            spaces = [s for s in spaces if an.prunable[an.component[an.space_offset[s]:an.space_offset[s]
                                                                      + an.space_size[s]]].any()]
            if spaces:
                size = float(np.prod([an.space_size[s] for s in spaces]))
                terms.append(CostTerm(float(np.prod(v.shape)) / size, spaces, node.scope or node.op, node.id))
    return terms


def flop_nodes(an: Analysis) -> dict[int, list[CostTerm]]:
    """FLOP terms by the node that carries them, in graph order."""
    by_node: dict[int, list[CostTerm]] = {}
    for t in an.flop_terms:
        by_node.setdefault(t.node, []).append(t)
    return by_node


def removal_for(an: Analysis, widths: dict[int, int]) -> np.ndarray:
    """Components to remove so that each space in `widths` keeps at most that many channels (the last ones
    go): the shapes a node is timed at."""
    removed: list[int] = []
    for s, w in widths.items():
        comps = an.component[an.space_offset[s]:an.space_offset[s] + an.space_size[s]]
        order = list(dict.fromkeys(comps[::-1].tolist()))
        kept = len(comps)
        for c in order:
            if kept <= w:
                break
            kept -= int((comps == c).sum())
            removed.append(c)
    return np.array(sorted(set(removed)), dtype=np.int64)


class LatencyModel(CostModel):
    """The budget in milliseconds: the table's rest, its scale times the interpolated layer times, and its
    activation cost times the share of activation elements kept."""

    def __init__(self, an: Analysis, table: LatencyTable):
        self.table = table
        self.flops = CostModel(an, an.flop_terms)
        index = an.space_index
        layers = table.layers
        coords = [[index[tuple(k)] for k in layer.spaces] for layer in layers]
        by_node = flop_nodes(an)
        terms = [CostTerm(1.0, c if c else sorted({s for t in by_node.get(layer.node, []) for s in t.spaces}),
                          layer.label, layer.node) for layer, c in zip(layers, coords)]
        super().__init__(an, terms)
        self.rest, self.scale = table.rest_ms, table.scale
        self.activations = CostModel(an, activation_terms(an))
        full = self.activations.total()
        self.per_element = table.activation_ms / full if full > 0 else 0.0
        n = max((len(g) for layer in layers for g in layer.grid), default=1)
        self.gx, self.gy = np.ones((len(layers), n)), np.ones((len(layers), n))
        self.nx, self.ny = np.ones(len(layers), dtype=np.int64), np.ones(len(layers), dtype=np.int64)
        self.ms = np.zeros((len(layers), n, n))
        self.x_space = np.full(len(layers), self.sentinel)
        self.y_space = np.full(len(layers), self.sentinel)
        for i, (layer, c) in enumerate(zip(layers, coords)):
            ms = np.atleast_2d(np.asarray(layer.ms, dtype=np.float64))
            if len(c) == 1:
                ms = ms.T
            self.ms[i] = np.pad(ms, ((0, n - ms.shape[0]), (0, n - ms.shape[1])), mode="edge")
            for axis, (g_arr, counts, spaces) in enumerate(((self.gx, self.nx, self.x_space),
                                                            (self.gy, self.ny, self.y_space))):
                if axis < len(c):
                    g = layer.grid[axis]
                    g_arr[i] = np.pad(np.asarray(g, dtype=np.float64), (0, n - len(g)), mode="edge")
                    counts[i], spaces[i] = len(g), c[axis]
        # layers timed at full width only: their time follows their FLOPs
        self.by_flops = np.array([not c for c in coords])
        node_row = {layer.node: i for i, layer in enumerate(layers)}
        self.term_row = np.array([node_row.get(t.node, -1) for t in an.flop_terms])
        self.full_flops = self._layer_flops(self.flops.kept_widths(None))

    def _layer_flops(self, kept: np.ndarray) -> np.ndarray:
        per_term = self.flops.per_term(kept=kept)
        ok = self.term_row >= 0
        return np.bincount(self.term_row[ok], weights=per_term[ok], minlength=len(self.table.layers))

    def per_term(self, removed_components=None, kept: np.ndarray | None = None) -> np.ndarray:
        """Each layer's predicted time in ms, as it runs inside the model."""
        if kept is None:
            kept = self.kept_widths(removed_components)
        rows = np.arange(len(self.ms))
        i0, i1, tx = _cell(self.gx, self.nx, kept[self.x_space])
        j0, j1, ty = _cell(self.gy, self.ny, kept[self.y_space])
        ms = self.ms
        value = ((1 - tx) * (1 - ty) * ms[rows, i0, j0] + tx * (1 - ty) * ms[rows, i1, j0]
                 + (1 - tx) * ty * ms[rows, i0, j1] + tx * ty * ms[rows, i1, j1])
        if self.by_flops.any():
            ratio = self._layer_flops(kept) / np.maximum(self.full_flops, 1e-300)
            value = np.where(self.by_flops, ms[:, 0, 0] * ratio, value)
        return self.scale * np.maximum(value, 0.0)

    def total(self, removed_components=None) -> float:
        return self.total_at(self.kept_widths(removed_components))

    def total_at(self, kept: np.ndarray) -> float:
        return (self.rest + float(self.per_term(kept=kept).sum())
                + self.per_element * self.activations.total_at(kept))

    def first_order_saving(self) -> np.ndarray:
        return super().first_order_saving() + self.per_element * self.activations.first_order_saving()


def _cell(grid: np.ndarray, count: np.ndarray, x: np.ndarray):
    """Per row: the grid cell around x (the first or last one beyond the grid) and x's place in it."""
    last = np.maximum(count - 1, 0)
    i0 = np.clip((grid <= x[:, None]).sum(axis=1) - 1, 0, np.maximum(last - 1, 0))
    i1 = np.minimum(i0 + 1, last)
    rows = np.arange(len(grid))
    width = grid[rows, i1] - grid[rows, i0]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(width > 0, (x - grid[rows, i0]) / width, 0.0)
    return i0, i1, t
