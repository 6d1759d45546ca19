"""Layer-wise one-shot pruning of trained models from calibration data: magnitude, Wanda, SparseGPT and
layer-wise M&U, unstructured or N:M (:func:`oneshot`)."""

from mustat.layerwise.run import OneShotReport, oneshot
from mustat.layerwise.solve import METHODS, SCOPES

__all__ = ["METHODS", "SCOPES", "OneShotReport", "oneshot"]
