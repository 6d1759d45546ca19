"""Model zoo: generalized linear models (no hidden layer), LeNet-300-100, LeNet-5
and a small VGG-style CNN."""

from __future__ import annotations

from enum import Enum
from numbers import Integral

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mustat._checks import check_option, check_scalar


class Family(str, Enum):
    """GLM families and their (summed) negative log-likelihoods."""

    LOGISTIC = "logistic"
    """Bernoulli with logit link; one output; targets 0/1."""
    SOFTMAX = "softmax"
    """Multinomial with the first class as reference (logit fixed at 0), as statsmodels' MNLogit."""
    LINEAR = "linear"
    """Gaussian with identity link; the loss is ``0.5 * sum (y - f)^2`` (unit scale: see hessian_se)."""


class GLM(nn.Module):
    """A network with no hidden layer: ``Linear(n_features, k)`` plus a link.

    For ``"softmax"`` with ``n_classes`` classes the layer has ``n_classes - 1``
    outputs and class 0's logit is fixed at 0, which makes the parameters
    identifiable (the same parametrisation as ``statsmodels.MNLogit``; with one
    free logit per class the Hessian would be singular).
    """

    def __init__(self, n_features: int, family: str | Family = "logistic", n_classes: int = 2):
        super().__init__()
        check_scalar(n_features, "n_features", kind=Integral, low=1)
        self.family = check_option(family, "family", Family)
        if self.family is Family.SOFTMAX:
            check_scalar(n_classes, "n_classes", kind=Integral, low=2)
            out = n_classes - 1
        else:
            out = 1
        self.n_classes = n_classes
        self.linear = nn.Linear(n_features, out)

    def forward(self, x: Tensor) -> Tensor:
        z = self.linear(x)
        if self.family is Family.SOFTMAX:
            return torch.cat([torch.zeros_like(z[:, :1]), z], dim=1)
        return z.squeeze(-1)

    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        """Summed negative log-likelihood of a batch (up to constants)."""
        return nll(self.family, output, target)


def nll(family: str | Family, output: Tensor, target: Tensor) -> Tensor:
    """Summed negative log-likelihood of ``family`` (see :class:`Family`)."""
    family = check_option(family, "family", Family)
    if family is Family.LOGISTIC:
        return F.binary_cross_entropy_with_logits(output, target.to(output.dtype), reduction="sum")
    if family is Family.SOFTMAX:
        return F.cross_entropy(output, target.long(), reduction="sum")
    return 0.5 * (output - target.to(output.dtype)).square().sum()
