"""mustat: magnitude-and-uncertainty (M&U) pruning with calibrated statistics."""

from mustat._functional import FunctionalModel
from mustat._version import __version__
from mustat.criteria import CRITERIA, Criterion, loss_gradient, register_criterion, score
from mustat.layerwise import OneShotReport, oneshot
from mustat.patterns import check_pattern
from mustat.pruning import (
    LayerCollapseWarning,
    PruningReport,
    Scope,
    ScoreScaleWarning,
    finalize,
    from_torch_prune,
    load_pruned_state_dict,
    prune,
    sparsity,
    to_torch_prune,
)
from mustat.sparse import load_sparse, save_sparse, sparse_inference
from mustat.stats import WaldResults, prune_fdr, pvalues, wald, zvalues
from mustat.structured import prune_channels, prune_channels_fdr, unit_statistics
from mustat.uncertainty import (
    ESTIMATORS,
    DegenerateSEWarning,
    Estimator,
    FitContext,
    Marginal,
    PseudoBootstrap,
    TrainingSetup,
    Window,
    WindowWarning,
    hessian_se,
    make_estimator,
    register_estimator,
)

__all__ = [
    "__version__",
    "CRITERIA",
    "ESTIMATORS",
    "Criterion",
    "DegenerateSEWarning",
    "Estimator",
    "FitContext",
    "FunctionalModel",
    "LayerCollapseWarning",
    "Marginal",
    "OneShotReport",
    "PruningReport",
    "PseudoBootstrap",
    "Scope",
    "ScoreScaleWarning",
    "WaldResults",
    "Window",
    "WindowWarning",
    "TrainingSetup",
    "check_pattern",
    "finalize",
    "from_torch_prune",
    "hessian_se",
    "load_pruned_state_dict",
    "load_sparse",
    "loss_gradient",
    "make_estimator",
    "oneshot",
    "prune",
    "prune_channels",
    "prune_channels_fdr",
    "prune_fdr",
    "pvalues",
    "register_criterion",
    "register_estimator",
    "save_sparse",
    "score",
    "sparse_inference",
    "sparsity",
    "to_torch_prune",
    "unit_statistics",
    "wald",
    "zvalues",
]
