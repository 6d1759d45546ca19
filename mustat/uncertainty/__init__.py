"""Standard-error estimators: one protocol (:class:`Estimator`), one registry
(:data:`ESTIMATORS`). Each gives, for every tracked tensor name, a tensor of
standard errors with the weight's shape, the estimate it belongs with, and
diagnostics; each declares what it needs, so callers check a combination
before any training.

Built in (the registry's order is the default comparison's): ``pseudo`` (the
paper's pseudo bootstrap), ``calibrated`` (stationary-SGD theory),
``batch-means`` (long-run variance of the iterates), ``curvature`` (diagonal
Gauss-Newton / expected Fisher), ``wald`` (full Hessian or sandwich) and
``bootstrap`` (B warm-started refits); the marginal second-order family
(:mod:`~mustat.uncertainty.marginal`: ``sqrt([H^-1]_qq)``, Optimal Brain Surgeon's statistic)
``fisher`` (the whole model's penalised Gauss-Newton), ``block`` (WoodFisher blocks of
per-sample gradients), ``kfac`` (Kronecker factors), ``ekfac`` (K-FAC with corrected
eigenvalues) and ``woodfisher`` (blocks of the
minibatch gradients training already computes). Estimators from outside the package
register through :func:`load_plugins`.
"""

# ruff: noqa: I001  (registration order is the default comparison's order)
from mustat.uncertainty.base import (
    ESTIMATORS,
    DegenerateSEWarning,
    Estimator,
    FitContext,
    NotFittedError,
    TrainingSetup,
    WindowWarning,
    decoupled_decay,
    default_estimators,
    get_estimator,
    load_plugins,
    make_estimator,
    register_estimator,
    variant,
)
from mustat.uncertainty.pseudo import Center, PseudoBootstrap, Window  # isort: skip
from mustat.uncertainty.calibrated import Calibrated, StationarityReport, calibrated_se, stationarity  # isort: skip
from mustat.uncertainty.batch_means import BatchMeans  # isort: skip
from mustat.uncertainty.curvature import Curvature, ggn_diagonal  # isort: skip
from mustat.uncertainty.bootstrap import Bootstrap, Replicates, bootstrap_replicates, bootstrap_se
from mustat.uncertainty.hessian import Information, Kind, hessian_se, information, newton_recentre
from mustat.uncertainty.wald import Wald
from mustat.uncertainty.marginal import Marginal  # isort: skip
from mustat.uncertainty.fisher import Fisher  # isort: skip
from mustat.uncertainty.block import Block  # isort: skip
from mustat.uncertainty.kfac import KFAC  # isort: skip
from mustat.uncertainty.ekfac import EKFAC  # isort: skip
from mustat.uncertainty.woodfisher import WoodFisher  # isort: skip

__all__ = [
    "EKFAC", "ESTIMATORS", "KFAC", "BatchMeans", "Block", "Bootstrap", "Calibrated", "Center", "Curvature", "Estimator", "Fisher",
    "DegenerateSEWarning", "FitContext", "Marginal", "WoodFisher",
    "Information", "Kind", "NotFittedError", "PseudoBootstrap", "Replicates", "StationarityReport", "TrainingSetup",
    "Wald", "Window", "WindowWarning", "bootstrap_replicates", "bootstrap_se", "calibrated_se", "decoupled_decay",
    "default_estimators", "get_estimator", "ggn_diagonal", "hessian_se", "information", "newton_recentre", "load_plugins",
    "make_estimator", "register_estimator", "stationarity", "variant",
]

load_plugins()
