"""Standard-error estimators: one protocol (:class:`Estimator`), one registry
(:data:`ESTIMATORS`). Each gives, for every tracked tensor name, a tensor of
standard errors with the weight's shape, the estimate it belongs with, and
diagnostics.

Built in: ``pseudo`` (the paper's pseudo bootstrap), ``calibrated``
(stationary-SGD theory), ``batch-means`` (long-run variance of the iterates),
``curvature`` (diagonal Gauss-Newton / expected Fisher), ``wald`` (full
Hessian or sandwich) and ``bootstrap`` (B warm-started refits).
"""

# ruff: noqa: I001  (the pseudo bootstrap registers before the estimators built on it)
from mustat.uncertainty.base import (
    ESTIMATORS,
    Estimator,
    FitContext,
    NotFittedError,
    WindowWarning,
    get_estimator,
    make_estimator,
    register_estimator,
)
from mustat.uncertainty.pseudo import Center, PseudoBootstrap, Window  # isort: skip  (registers first)
from mustat.uncertainty.batch_means import BatchMeans
from mustat.uncertainty.bootstrap import Bootstrap, Replicates, bootstrap_replicates, bootstrap_se
from mustat.uncertainty.calibrated import Calibrated, StationarityReport, calibrated_se, stationarity
from mustat.uncertainty.curvature import Curvature, ggn_diagonal
from mustat.uncertainty.hessian import Information, Kind, fit_glm, hessian_se, information
from mustat.uncertainty.wald import Wald

__all__ = [
    "ESTIMATORS", "BatchMeans", "Bootstrap", "Calibrated", "Center", "Curvature", "Estimator", "FitContext",
    "Information", "Kind", "NotFittedError", "PseudoBootstrap", "Replicates", "StationarityReport", "Wald",
    "Window", "WindowWarning", "bootstrap_replicates", "bootstrap_se", "calibrated_se", "fit_glm",
    "get_estimator", "ggn_diagonal", "hessian_se", "information", "make_estimator", "register_estimator",
    "stationarity",
]
