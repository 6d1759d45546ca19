"""mustat: magnitude-and-uncertainty (M&U) pruning with calibrated statistics."""

from mustat.criteria import CRITERIA, Criterion, register_criterion, score
from mustat.pruning import (
    PruningReport,
    Scope,
    finalize,
    load_pruned_state_dict,
    prune,
    sparsity,
)
from mustat.uncertainty import PseudoBootstrap, Window

__version__ = "0.1.0"

__all__ = [
    "CRITERIA",
    "Criterion",
    "PruningReport",
    "PseudoBootstrap",
    "Scope",
    "Window",
    "finalize",
    "load_pruned_state_dict",
    "prune",
    "register_criterion",
    "score",
    "sparsity",
]
