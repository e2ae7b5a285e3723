"""Backends that turn a PruningPlan into a model: the slimmed torch module and the regenerated-graph fallback."""
