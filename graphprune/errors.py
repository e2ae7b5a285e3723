"""Error types. Every error says what went wrong and how to get past it."""

from __future__ import annotations


class GraphPruneError(Exception):
    """Base class of every error graphprune raises on purpose."""


class TraceError(GraphPruneError):
    """The model could not be run or recorded on the example inputs."""


class UnsupportedModelError(GraphPruneError):
    """The model uses a construct graphprune cannot prune or rebuild."""


class BudgetError(GraphPruneError):
    """The requested budget cannot be met; `reachable` holds the smallest reachable ratio."""

    def __init__(self, message: str, reachable: float | None = None):
        super().__init__(message)
        self.reachable = reachable


class BackendError(GraphPruneError):
    """A backend could not emit the pruned model."""


class UsageError(GraphPruneError, ValueError):
    """What was asked cannot be done as asked: a missing file, an argument out of range (exit code 2). A
    ValueError too, so code that catches bad arguments the usual way catches these."""
