"""mustat: magnitude-and-uncertainty (M&U) pruning with calibrated statistics."""

from mustat.criteria import CRITERIA, Criterion, register_criterion, score
from mustat.pruning import (
    LayerCollapseWarning,
    PruningReport,
    Scope,
    finalize,
    load_pruned_state_dict,
    prune,
    sparsity,
)
from mustat.sparse import load_sparse, save_sparse, sparse_inference
from mustat.stats import WaldResults, prune_fdr, pvalues, wald, zvalues
from mustat.uncertainty import (
    ESTIMATORS,
    Estimator,
    FitContext,
    PseudoBootstrap,
    Window,
    WindowWarning,
    fit_glm,
    hessian_se,
    make_estimator,
    register_estimator,
)

__version__ = "0.2.0"

__all__ = [
    "CRITERIA",
    "ESTIMATORS",
    "Criterion",
    "Estimator",
    "FitContext",
    "LayerCollapseWarning",
    "PruningReport",
    "PseudoBootstrap",
    "Scope",
    "WaldResults",
    "Window",
    "WindowWarning",
    "finalize",
    "fit_glm",
    "hessian_se",
    "load_pruned_state_dict",
    "load_sparse",
    "make_estimator",
    "prune",
    "prune_fdr",
    "pvalues",
    "register_criterion",
    "register_estimator",
    "save_sparse",
    "score",
    "sparse_inference",
    "sparsity",
    "wald",
    "zvalues",
]
