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
from mustat.stats import WaldResults, prune_fdr, wald
from mustat.uncertainty import PseudoBootstrap, Window, fit_glm, hessian_se

__version__ = "0.1.0"

__all__ = [
    "CRITERIA",
    "Criterion",
    "PruningReport",
    "PseudoBootstrap",
    "Scope",
    "WaldResults",
    "Window",
    "finalize",
    "fit_glm",
    "hessian_se",
    "load_pruned_state_dict",
    "prune",
    "prune_fdr",
    "register_criterion",
    "score",
    "sparsity",
    "wald",
]
