"""Standard-error estimators. Each gives, for every tracked tensor name, a tensor
of standard errors with the weight's shape."""

from mustat.uncertainty.calibrated import StationarityReport, calibrated_se, stationarity
from mustat.uncertainty.hessian import Kind, fit_glm, hessian_se, information
from mustat.uncertainty.pseudo import PseudoBootstrap, Window

__all__ = [
    "Kind", "PseudoBootstrap", "StationarityReport", "Window", "calibrated_se", "fit_glm",
    "hessian_se", "information", "stationarity",
]
