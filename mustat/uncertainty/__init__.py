"""Standard-error estimators. Each gives, for every tracked tensor name, a tensor
of standard errors with the weight's shape."""

from mustat.uncertainty.pseudo import PseudoBootstrap, Window

__all__ = ["PseudoBootstrap", "Window"]
