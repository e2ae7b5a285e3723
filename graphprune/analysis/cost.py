"""Cost model: FLOPs (2 x MACs of conv / linear / matmul / attention, the definition of
torch.utils.flop_counter.FlopCounterMode) and parameter counts, as functions of the kept widths."""

from __future__ import annotations

import numpy as np

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

    def kept_widths(self, removed_components: np.ndarray | None) -> np.ndarray:
        an = self.an
        sizes = an.space_size.astype(np.float64)
        if removed_components is None or len(removed_components) == 0:
            return np.append(sizes, 1.0)
        gone = np.zeros(an.component.max() + 1, dtype=bool)
        gone[removed_components] = True
        removed = gone[an.component].astype(np.int64)
        csum = np.concatenate([[0], np.cumsum(removed)])
        lost = csum[an.space_offset + an.space_size] - csum[an.space_offset]
        return np.append(sizes - lost, 1.0)

    def per_term(self, removed_components=None) -> np.ndarray:
        kept = self.kept_widths(removed_components)
        if self.factors.size == 0:
            return np.zeros(0)
        return self.coef * np.prod(kept[self.factors], axis=1)

    def total(self, removed_components=None) -> float:
        return float(self.per_term(removed_components).sum())

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
