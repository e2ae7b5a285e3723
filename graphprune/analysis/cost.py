"""Cost model: FLOPs (2 x MACs of conv / linear / matmul / attention, the definition of
torch.utils.flop_counter.FlopCounterMode) and parameter counts, as functions of the kept widths."""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix

from .channels import Analysis, CostTerm


class CostModel:
    """Evaluates sum_t coef_t * prod(kept width of t's factor spaces) for any set of removed components."""

    def __init__(self, an: Analysis, terms: list[CostTerm]):
        self.an = an
        width = max((len(t.spaces) for t in terms), default=0)
        self.sentinel = len(an.space_size)  # a space whose kept width is always 1
        self.factors = np.full((len(terms), width), self.sentinel, dtype=np.int64)
        for i, t in enumerate(terms):
            self.factors[i, :len(t.spaces)] = t.spaces
        self.coef = np.array([t.coef for t in terms], dtype=np.float64)
        self.labels = [t.label for t in terms]
        self.members = _members(an)

    def kept_widths(self, removed_components: np.ndarray | None) -> np.ndarray:
        sizes = self.an.space_size.astype(np.float64)
        if removed_components is None or len(removed_components) == 0:
            return np.append(sizes, 1.0)
        return np.append(sizes, 1.0) - self.lost_widths(removed_components)

    def per_term(self, removed_components=None, kept: np.ndarray | None = None) -> np.ndarray:
        if kept is None:
            kept = self.kept_widths(removed_components)
        if self.factors.size == 0:
            return np.zeros(0)
        return self.coef * np.prod(kept[self.factors], axis=1)

    def total(self, removed_components=None) -> float:
        return float(self.per_term(removed_components).sum())

    def lost_widths(self, components: np.ndarray) -> np.ndarray:
        """How much each space (and the sentinel, by 0) narrows when `components` go: kept_widths' step."""
        return np.append(np.asarray(self.members[np.asarray(components)].sum(axis=0)).ravel(), 0.0)

    def total_at(self, kept: np.ndarray) -> float:
        return float(self.per_term(kept=kept).sum())

    def first_order_saving(self) -> np.ndarray:
        """Cost removed by taking out each component alone, at full width (per component id)."""
        an = self.an
        n_comp = int(an.component.max()) + 1 if an.n_elements else 0
        full = self.per_term()
        sizes = an.space_size
        comp_parts, value_parts = [], []
        for t in range(len(self.coef)):
            for s in self.factors[t]:
                if s == self.sentinel or sizes[s] == 0:
                    continue
                comp_parts.append(an.component[an.space_offset[s]:an.space_offset[s] + sizes[s]])
                value_parts.append(np.full(sizes[s], full[t] / sizes[s]))
        if not comp_parts:
            return np.zeros(n_comp)
        return np.bincount(np.concatenate(comp_parts), weights=np.concatenate(value_parts), minlength=n_comp)


def _members(an: Analysis) -> csr_matrix:
    """How many elements of each space every component owns: removing components is one row sum.
    Built once per analysis and shared by its FLOPs and parameter models."""
    cached = getattr(an, "_members", None)
    if cached is None:
        n_comp = int(an.component.max()) + 1 if an.n_elements else 0
        space_of = np.repeat(np.arange(len(an.space_size)), an.space_size)
        cached = csr_matrix((np.ones(an.n_elements), (an.component, space_of)), shape=(n_comp, len(an.space_size)))
        an._members = cached
    return cached
