"""graphprune: automatic structured pruning for PyTorch models.

    slim = graphprune.prune(model, example_inputs, target_flops=0.5)
"""

from __future__ import annotations

from . import verify  # noqa: F401  (registers the verifying backend behind plan.apply)
from .api import count_flops, plan, prune, sparsify
from .errors import BackendError, BudgetError, GraphPruneError, TraceError, UnsupportedModelError, UsageError
from .plan import PruningPlan
from .serialization import load, save, save_pretrained
from .train import HESSO

__version__ = "0.1.0"

__all__ = [
           "BackendError",
           "BudgetError",
           "GraphPruneError",
           "HESSO",
           "PruningPlan",
           "TraceError",
           "UnsupportedModelError",
           "UsageError",
           "__version__",
           "count_flops",
           "load",
           "plan",
           "prune",
           "save",
           "save_pretrained",
           "sparsify",
]
