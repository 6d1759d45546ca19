"""Designs of a calibration study: data, the model to fit, and what is known.

GLM designs (no hidden layer) have an exact reference, the Wald SE at the MLE,
and, when simulated, known coefficients (zeros are null weights), so coverage,
type-I error and power are defined. Their replicate datasets train together as
one stacked model (:class:`StackedGLM`: each replicate's parameters see only its
own data, so stacking changes nothing but the cost).

Hidden-layer designs are one-hidden-layer ReLU networks fitted with weight decay
(without it they are not identified); the ``teacher-*`` ones simulate from a
known teacher network, which gives the gauge-fixed teacher-replicate reference
(:mod:`validation.references`).
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
    when unknown); ``model(seed)`` the network to fit; ``loss(model)`` its mean loss.

    ``family``: the GLM family (GLM designs) or the hidden-layer network's likelihood
    (``"logistic"``, ``"linear"``: unit-variance Gaussian, ``"softmax"``);
    ``teacher()``: the float64 network that simulates the data, where there is one.
    """

    name: str
    glm: bool
    simulated: bool
    sample: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    model: Callable[[int], nn.Module]
    family: str = "logistic"
    teacher: Callable[[], nn.Module] | None = None

    @property
    def multiclass(self) -> bool:
        return self.family == "softmax"

    def loss(self) -> Callable[[Tensor, Tensor], Tensor]:
        """The mean training loss (the NLL per sample, the Gaussian's with unit variance)."""
        return MEAN_LOSSES[self.family]

    def stacked_model(self, seeds: list[int]) -> StackedGLM:
        """One GLM per seed, stacked (GLM designs): replicate r initialised as ``model(seeds[r])``."""
        if not self.glm:
            raise ValueError(f"design {self.name!r} has a hidden layer; only GLM designs stack")
        return StackedGLM([self.model(s) for s in seeds])

    def stacked_loss(self) -> Callable[[Tensor, Tensor], Tensor]:
        """The sum over replicates of each replicate's mean loss: outputs and targets ``(S, R)``."""
        per_sample = PER_SAMPLE_LOSSES[self.family]
        return lambda out, y: per_sample(out, y).mean(0).sum()


def _per_sample_logistic(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.binary_cross_entropy_with_logits(out, y.to(out.dtype), reduction="none")


def _per_sample_linear(out: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (out - y.to(out.dtype)).square()


PER_SAMPLE_LOSSES = {"logistic": _per_sample_logistic, "linear": _per_sample_linear}
#: mean losses; a single-output network's ``(n, 1)`` output is squeezed first
MEAN_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "logistic": lambda out, y: _per_sample_logistic(_squeeze(out), y).mean(),
    "linear": lambda out, y: _per_sample_linear(_squeeze(out), y).mean(),
    "softmax": lambda out, y: nn.functional.cross_entropy(out, y.long()),
}


def _squeeze(out: Tensor) -> Tensor:
    return out.squeeze(-1) if out.ndim > 1 and out.shape[-1] == 1 else out


class _StackedLinear(nn.Linear):
    """``R`` single-output linear predictors: ``x (S, R, d) -> (S, R)``; row r of ``weight``
    belongs to replicate r. An ``nn.Linear``, so estimators track it by default."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("srd,rd->sr", x, self.weight) + self.bias


class StackedGLM(nn.Module):
    """Replicate GLMs (single output each) trained as one model, samples first.

    Data ``X (n, R, d)``, targets ``(n, R)``; with :meth:`Design.stacked_loss` the gradient
    of replicate r's parameters is exactly its own mean-loss gradient, and every optimizer
    and estimator mustat has acts elementwise, so the stack trains ``R`` independent fits.
    """

    def __init__(self, glms: list[nn.Module]):
        super().__init__()
        if any(g.linear.out_features != 1 for g in glms):
            raise ValueError("StackedGLM stacks single-output GLMs (logistic, linear)")
        self.linear = _StackedLinear(glms[0].linear.in_features, len(glms))
        with torch.no_grad():
            self.linear.weight.copy_(torch.cat([g.linear.weight for g in glms]))
            self.linear.bias.copy_(torch.cat([g.linear.bias for g in glms]))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


#: misspecified noise of the linear designs (the fitted loss is the unit-variance Gaussian's):
#: ``hetero``: Gaussian with variance 0.25 + 0.75 z^2 (z the third feature, unit variance), mean 1;
#: ``t3``: Student-t with 3 dof scaled to unit variance (heavy tails, homoscedastic);
#: ``omitted``: the truth has 0.5 (z^2 - 1) in the mean (z the sixth feature over its scale) on top
#: of unit Gaussian noise. The term is uncorrelated with every linear function of the Gaussian
#: features, so the least-squares estimand stays ``COEF``, but the residual variance (1.5 on
#: average) depends on z: a model narrower than the truth.
NOISES = ("gaussian", "hetero", "t3", "omitted")


def _glm_design(family: str, n: int = 2000, corr: float = 0.3, name: str | None = None,
                noise: str = "gaussian") -> Design:
    check_option(noise, "noise", NOISES)
    if noise != "gaussian" and family != "linear":
        raise ValueError(f"noise={noise!r} needs family='linear', got {family!r}")

    def sample(rep):
        X, y, truth = glm_design(family, n=n, coef=COEF, scales=SCALES, corr=corr, intercept=0.2, seed=1000 + rep)
        if noise != "gaussian":
            rng = np.random.default_rng([1000 + rep, NOISES.index(noise)])
            mean = 0.2 + X @ np.asarray(COEF)
            if noise == "hetero":
                z = X[:, 2] / SCALES[2]
                y = mean + np.sqrt(0.25 + 0.75 * z**2) * rng.standard_normal(n)
            elif noise == "t3":
                y = mean + rng.standard_t(3, n) / np.sqrt(3.0)
            else:
                z = X[:, 5] / SCALES[5]
                y = mean + 0.5 * (z**2 - 1) + rng.standard_normal(n)
        return X, y.astype(float), np.asarray(truth["coef"], dtype=float)

    return Design(name or family, True, True, sample, lambda seed: _seeded(lambda: GLM(len(COEF), family), seed),
                  family=family)


def _mlp(d: int, hidden: int, k: int, activation: type[nn.Module] = nn.ReLU) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(nn.Linear(d, hidden), activation(), nn.Linear(hidden, k))


def _teacher_design(name: str, family: str, *, d: int, hidden: int, k: int, n: int = 2000, seed: int = 123,
                    in_scale: float = 2.0, out_weight: float = 1.0, activation: type[nn.Module] = nn.ReLU,
                    null_inputs: int = 0, student_hidden: int | None = None) -> Design:
    """A one-hidden-layer ReLU teacher and Gaussian inputs; labels from its likelihood
    (``family``); replication r draws its own data. The teacher is PyTorch's seeded init with
    the first layer times ``in_scale`` and every output weight of magnitude ``out_weight``
    (signs from the init): each unit matters, so weight decay up to 1e-2 keeps all of them
    alive and the penalised optimum is a strict minimum (a unit that weight decay collapses
    sits at the ReLU's kink, where no Wald reference exists). ``activation``: the hidden layer's
    (teacher and student alike); a smooth one (softplus) has no kinks and no rescaling orbit.
    ``null_inputs``: the last that many inputs feed no unit (their first-layer weights are 0): a
    student's weights from them are 0 at the teacher's optimum, in any gauge and unit order, and the
    expected loss is even in them (the input is symmetric and independent of the rest). At another
    local optimum they need not be 0 (docs/CALIBRATION.md, the FDR section).
    ``student_hidden``: a student with fewer units than the teacher (a misspecified model); it has
    no teacher reference then (teacher replicates fit the teacher's architecture, not the student's)."""

    def teacher():
        t = _seeded(_mlp(d, hidden, k, activation), seed).double()
        with torch.no_grad():
            t[0].weight.mul_(in_scale)
            t[0].bias.mul_(in_scale)
            t[2].weight.copy_(out_weight * t[2].weight.sign())
            if null_inputs:
                t[0].weight[:, d - null_inputs:] = 0
        return t

    net = teacher()

    def sample(rep):
        rng = np.random.default_rng(2000 + rep)
        X = rng.standard_normal((n, d))
        with torch.no_grad():
            f = net(torch.tensor(X)).numpy()
        if family == "logistic":
            y = rng.binomial(1, 1 / (1 + np.exp(-f[:, 0]))).astype(float)
        elif family == "linear":
            y = f[:, 0] + rng.standard_normal(n)
        else:
            P = np.exp(f - f.max(1, keepdims=True))
            P /= P.sum(1, keepdims=True)
            y = (P.cumsum(1) > rng.random((n, 1))).argmax(1).astype(float)
        return X, y, None

    width = hidden if student_hidden is None else student_hidden
    return Design(name, False, True, sample, lambda s: _seeded(_mlp(d, width, k, activation), s), family=family,
                  teacher=teacher if student_hidden is None else None)


def _breast_cancer() -> Design:
    from sklearn.datasets import load_breast_cancer

    def sample(rep):
        X, y = load_breast_cancer(return_X_y=True)
        X = X[:, [0, 1, 4, 8, 9, 11, 14, 18]]  # eight weakly collinear features; all 30 separate the classes
        return (X - X.mean(0)) / X.std(0), y.astype(float), None

    return Design("breast_cancer", True, False, sample, lambda seed: _seeded(lambda: GLM(8, "logistic"), seed))


def _digits(hidden: int = 8) -> Design:
    from sklearn.datasets import load_digits

    def sample(rep):
        X, y = load_digits(return_X_y=True)
        std = X.std(0)
        return (X - X.mean(0)) / np.where(std > 0, std, 1.0), y.astype(float), None

    return Design("digits", False, False, sample, lambda s: _seeded(_mlp(64, hidden, 10), s), family="softmax")


DESIGNS: dict[str, Callable[[], Design]] = {
    "logistic": lambda: _glm_design("logistic"),
    "linear": lambda: _glm_design("linear"),
    # strongly correlated features: the diagonal approximations' VIF gap is large (1/sqrt(VIF) ~ 0.6)
    "logistic-r7": lambda: _glm_design("logistic", corr=0.7, name="logistic-r7"),
    "linear-r7": lambda: _glm_design("linear", corr=0.7, name="linear-r7"),
    # misspecified linear designs (NOISES): the sandwich and the inverse information differ with the
    # omitted term (every coefficient) and with hetero (the third); t3 separates them only in tails
    "linear-hetero": lambda: _glm_design("linear", name="linear-hetero", noise="hetero"),
    "linear-t3": lambda: _glm_design("linear", name="linear-t3", noise="t3"),
    "linear-omitted": lambda: _glm_design("linear", name="linear-omitted", noise="omitted"),
    # one-hidden-layer teachers: binary 6-8-1 (the first study's), regression 6-8-1, softmax 10-16-3
    "teacher-mlp": lambda: _teacher_design("teacher-mlp", "logistic", d=6, hidden=8, k=1),
    "teacher-regression": lambda: _teacher_design("teacher-regression", "linear", d=6, hidden=8, k=1),
    "teacher-softmax": lambda: _teacher_design("teacher-softmax", "softmax", d=10, hidden=16, k=3),
    # the regression teacher with a smooth activation: no kinks and no rescaling orbit, so the three
    # references can agree where ReLU's kinks defeat them (small weight decay)
    "teacher-softplus": lambda: _teacher_design("teacher-softplus", "linear", d=6, hidden=8, k=1,
                                                activation=nn.Softplus),
    # a planted sparse teacher: 10 inputs, the last 4 of which feed no unit (32 null first-layer
    # weights); the network-level FDR study (docs/calibration/fdr.py)
    # the regression teacher (8 units) fitted by a 4-unit student: a model narrower than the truth
    "teacher-narrow": lambda: _teacher_design("teacher-narrow", "linear", d=6, hidden=8, k=1, student_hidden=4),
    "teacher-sparse": lambda: _teacher_design("teacher-sparse", "linear", d=10, hidden=8, k=1, null_inputs=4),
    "breast_cancer": _breast_cancer,
    "digits": _digits,
}


def get_design(name: str) -> Design:
    return DESIGNS[check_option(name, "design", DESIGNS)]()
