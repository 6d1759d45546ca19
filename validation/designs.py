"""Designs of a calibration study: data, the model to fit, and what is known.

GLM designs (no hidden layer) have an exact reference, the Wald SE at the MLE,
and, when simulated, known coefficients (zeros are null weights), so coverage,
type-I error and power are defined. Hidden-layer designs are compared with the
warm-started bootstrap; their weights are not identified, so no truth metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from mustat._checks import check_option
from mustat.data import glm_design
from mustat.models import GLM

#: a logistic/linear design: nulls, features of very different scales, correlation 0.3 (or 0.7)
COEF = (1.0, -0.5, 0.25, 0.0, 0.0, 0.0, 0.5, 0.0)
SCALES = (0.2, 0.5, 1.0, 1.0, 2.0, 4.0, 4.0, 0.5)


@dataclass(frozen=True)
class Design:
    """``sample(replication)`` gives ``(X, y, truth)`` (float64 numpy; truth is None
    when unknown); ``model(seed)`` the network to fit; ``loss(model)`` its mean loss."""

    name: str
    glm: bool
    simulated: bool
    sample: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    model: Callable[[int], nn.Module]
    multiclass: bool = False

    def loss(self, model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
        """The mean training loss (the NLL per sample)."""
        if self.glm:
            return lambda out, y: model.nll(out, y) / len(y)
        if self.multiclass:
            return lambda out, y: nn.functional.cross_entropy(out, y.long())
        return lambda out, y: nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), y.to(out.dtype))


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _glm_design(family: str, n: int = 2000, corr: float = 0.3, name: str | None = None) -> Design:
    def sample(rep):
        X, y, truth = glm_design(family, n=n, coef=COEF, scales=SCALES, corr=corr, intercept=0.2, seed=1000 + rep)
        return X, y.astype(float), np.asarray(truth["coef"], dtype=float)

    return Design(name or family, True, True, sample, lambda seed: _seeded(lambda: GLM(len(COEF), family), seed))


def _teacher_mlp(n: int = 2000, d: int = 6, hidden: int = 8) -> Design:
    teacher = _seeded(lambda: nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 1)), 123).double()
    with torch.no_grad():
        teacher[2].weight.mul_(3.0)

    def sample(rep):
        rng = np.random.default_rng(2000 + rep)
        X = rng.standard_normal((n, d))
        with torch.no_grad():
            p = torch.sigmoid(teacher(torch.tensor(X))).squeeze(-1).numpy()
        return X, rng.binomial(1, p).astype(float), None

    def model(seed):
        return _seeded(lambda: nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 1)), seed)

    return Design("teacher-mlp", False, True, sample, model)


def _breast_cancer() -> Design:
    from sklearn.datasets import load_breast_cancer

    def sample(rep):
        X, y = load_breast_cancer(return_X_y=True)
        X = X[:, [0, 1, 4, 8, 9, 11, 14, 18]]  # eight weakly collinear features; all 30 separate the classes
        return (X - X.mean(0)) / X.std(0), y.astype(float), None

    return Design("breast_cancer", True, False, sample, lambda seed: _seeded(lambda: GLM(8, "logistic"), seed))


def _digits(hidden: int = 16) -> Design:
    from sklearn.datasets import load_digits

    def sample(rep):
        X, y = load_digits(return_X_y=True)
        std = X.std(0)
        return (X - X.mean(0)) / np.where(std > 0, std, 1.0), y.astype(float), None

    def model(seed):
        return _seeded(lambda: nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)), seed)

    return Design("digits", False, False, sample, model, multiclass=True)


DESIGNS: dict[str, Callable[[], Design]] = {
    "logistic": lambda: _glm_design("logistic"),
    "linear": lambda: _glm_design("linear"),
    # strongly correlated features: the diagonal approximations' VIF gap is large (1/sqrt(VIF) ~ 0.6)
    "logistic-r7": lambda: _glm_design("logistic", corr=0.7, name="logistic-r7"),
    "linear-r7": lambda: _glm_design("linear", corr=0.7, name="linear-r7"),
    "teacher-mlp": _teacher_mlp,
    "breast_cancer": _breast_cancer,
    "digits": _digits,
}


def get_design(name: str) -> Design:
    return DESIGNS[check_option(name, "design", DESIGNS)]()
