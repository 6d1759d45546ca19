"""The true nonparametric bootstrap of a small network, vectorized: B refits on
resampled data trained together as one batched model.

Every replicate starts from the given (fitted) model's parameters. For a model
with no hidden layer the refit's optimum is unique, so the start only saves
time; for hidden-layer networks it is necessary: permutation and ReLU-rescaling
symmetries make the optima of independent refits incomparable weight by
weight, while a warm start keeps each replicate in the full-data fit's basin,
so the spread measures sampling variability around *that* solution.

Every refit minimises its resample's mean loss plus the training's L2 penalty
(``weight_decay``, PyTorch's convention), so the bootstrap targets the same
penalised estimator as the Wald references; whether each refit converged is
checked (the max-abs gradient of its penalised objective) and reported.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor, nn

from mustat._checks import check_option, check_scalar
from mustat._functional import FunctionalModel, eval_mode, vmap_or_loop
from mustat.batching import Data, gather
from mustat.uncertainty.base import Estimator, FitContext, NotFittedError, register_estimator

Loss = Callable[[Tensor, Tensor], Tensor]


def plan(n: int, *, B: int, epochs: int, seed: int) -> tuple[Tensor, Iterator[Tensor]]:
    """Resample indices ``(B, n)`` and, per epoch, each replicate's visiting order ``(B, n)``."""
    g = torch.Generator().manual_seed(seed)
    resample = torch.randint(n, (B, n), generator=g)

    def orders():
        for _ in range(epochs):
            yield torch.rand(B, n, generator=g).argsort(dim=1)

    return resample, orders()


def _make_optimizer(kind: str, params, lr: float, momentum: float, weight_decay: float):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS = ("sgd", "adam")


def _check(B, epochs, lr, batch_size, optimizer, weight_decay):
    check_scalar(B, "B", kind=Integral, low=2)
    check_scalar(epochs, "epochs", kind=Integral, low=1)
    check_scalar(lr, "lr", kind=Real, low=0.0, closed="neither")
    check_scalar(batch_size, "batch_size", kind=Integral, low=1)
    check_option(optimizer, "optimizer", OPTIMIZERS)
    check_scalar(weight_decay, "weight_decay", kind=Real, low=0.0)


@dataclass(frozen=True)
class Replicates:
    """Stacked refits: ``params[name]`` has shape ``(B, *param.shape)`` for every refitted tensor;
    ``grad_max[b]`` is replicate b's max-abs gradient of its penalised mean loss on its own
    resample at the end."""

    params: dict[str, Tensor]
    grad_max: Tensor


def bootstrap_replicates(
    model: nn.Module,
    loss: Loss,
    data: Data,
    *,
    B: int = 200,
    epochs: int = 50,
    lr: float = 1e-2,
    batch_size: int | None = None,
    optimizer: str = "adam",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> Replicates:
    """Refit ``model`` on ``B`` bootstrap resamples at once; returns the stacked
    parameters (each of shape ``(B, *param.shape)``) and each refit's final gradient.

    ``loss(output, target)`` is the batch's *mean* training loss (a mean of
    per-sample terms, which the MLP fast path relies on). ``data`` is ``(X, y)`` or an
    iterable of batches, gathered into memory (a resample draws from every row). Each
    replicate draws ``n`` rows with replacement, then trains ``epochs`` epochs of
    minibatches (``batch_size``, default ``n``: full batch) in its own random
    order, with its own optimizer state (a ``torch.optim`` optimizer over the
    stacked tensors is exactly ``B`` independent ones: SGD and Adam act
    elementwise, weight decay included). Refits train the model's trainable tensors from
    their effective values through the functional view: masked (pruned) entries stay 0,
    frozen tensors stay fixed, and the forward runs in eval mode (no dropout; BatchNorm
    uses its running statistics). ``model`` is not modified.
    """
    X, y = gather(data)
    n = len(X)
    batch_size = batch_size or n
    _check(B, epochs, lr, batch_size, optimizer, weight_decay)
    fm = FunctionalModel(model)
    names = fm.trainable()
    start = fm.params(names)
    params = {k: nn.Parameter(v.unsqueeze(0).repeat(B, *([1] * v.dim()))) for k, v in start.items()}
    opt = _make_optimizer(optimizer, list(params.values()), lr, momentum, weight_decay)
    resample, orders = plan(n, B=B, epochs=epochs, seed=seed)

    # Replicate b's parameters reach only its own loss, so the gradient of the summed
    # losses is exactly each replicate's gradient: plain autograd through a batched
    # forward, cheaper than vmap(grad(...)). MLPs get hand-batched matmuls (baddbmm),
    # which skip vmap's per-op dispatch; anything else goes through vmap.
    fast = _batched_mlp(model, fm)
    if fast is not None:
        def losses(p, xb, yb):
            # equal batch sizes: sum over replicates of mean losses = B * mean over all rows
            return loss(fast(p, xb).flatten(0, 1), yb.flatten(0, 1)) * B
    else:
        def one(p, xb, yb):
            return loss(fm(p, xb), yb)

        per_replicate = vmap_or_loop(one)

        def losses(p, xb, yb):
            return per_replicate(p, xb, yb).sum()

    with eval_mode(model):
        for order in orders:
            rows = torch.gather(resample, 1, order)
            for start_row in range(0, n, batch_size):
                idx = rows[:, start_row : start_row + batch_size]
                opt.zero_grad(set_to_none=True)
                losses(params, X[idx], y[idx]).backward()
                opt.step()
        # convergence: each refit's full-resample gradient of its penalised objective
        opt.zero_grad(set_to_none=True)
        losses(params, X[resample], y[resample]).backward()
    grad_max = torch.stack([
        (p.grad + weight_decay * p.detach()).abs().flatten(1).amax(1) for p in params.values()
    ]).amax(0)
    return Replicates({k: v.detach() for k, v in params.items()}, grad_max.detach())


_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity)


def _batched_mlp(model: nn.Module, fm: FunctionalModel):
    """For an ``nn.Sequential`` of Linear / Flatten / elementwise activations, a forward taking
    stacked parameters ``(B, ...)`` (the trainable ones; the rest from the view) and inputs
    ``(B, n, ...)``; masks multiply the weights as in the model."""
    if not isinstance(model, nn.Sequential):
        return None
    children = list(model._modules.items())  # with repeats: named_children() lists a reused module once
    if len({id(m) for _, m in children}) < len(children):
        return None  # a module used twice: the general path handles it
    steps = []
    for name, m in children:
        if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
            if any(fm.table[f"{name}.{a}"].tied for a in ("weight", "bias") if f"{name}.{a}" in fm.table):
                return None
            steps.append(("linear", name, m.bias is not None))
        elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            steps.append(("flatten", name, None))
        elif isinstance(m, _ELEMENTWISE):
            steps.append(("act", m, None))
        else:
            return None
    fixed = fm.params(list(fm.table))

    def tensor(p, key):
        t = p[key] if key in p else fixed[key].unsqueeze(0)
        mask = fm.mask(key)
        return t if mask is None else t * mask

    def forward(p, x):
        for kind, ref, bias in steps:
            if kind == "linear":
                w = tensor(p, f"{ref}.weight").transpose(-1, -2)
                if bias:
                    b = tensor(p, f"{ref}.bias").unsqueeze(-2)
                    x = torch.baddbmm(b.expand(x.shape[0], 1, -1), x, w.expand(x.shape[0], -1, -1))
                else:
                    x = torch.bmm(x, w.expand(x.shape[0], -1, -1))
            elif kind == "flatten":
                x = x.flatten(2)
            else:
                x = ref(x)
        return x

    return forward


def bootstrap_se(model: nn.Module, loss: Loss, data: tuple[Tensor, Tensor], **kwargs) -> dict[str, Tensor]:
    """Bootstrap standard errors: the SD (``ddof=1``) across :func:`bootstrap_replicates`.

    Keys are ``model.named_parameters()`` names. The bootstrap SE estimates the
    sampling SD of the estimator *as trained* (finite epochs included); it equals
    the Wald SE of the exact (penalised) optimum only when the refits converge.
    """
    reps = bootstrap_replicates(model, loss, data, **kwargs)
    return {k: v.std(dim=0, unbiased=True) for k, v in reps.params.items()}


@register_estimator("bootstrap")
class Bootstrap(Estimator):
    """The true nonparametric bootstrap (module notes): ``B`` warm-started refits
    on resampled data, trained together, with the training's weight decay; the SE
    is their SD (``ddof = 1``), paired with the weights the refits started from.

    Its Monte-Carlo relative error is about ``1 / sqrt(2 (B - 1))`` (diagnostics:
    ``mc_rel_error``). Refits whose final max-abs penalised gradient exceeds
    ``gtol`` count as not converged (``converged_frac``; a warning when any). Pruned
    entries stay pruned in every refit (SE 0). ``fit`` needs ``FitContext(X=..., y=...,
    loss=...)`` (or ``data=``, gathered into memory).
    """

    needs = ("data", "loss")

    def __init__(self, model: nn.Module, *, B: int = 200, epochs: int = 50, lr: float = 1e-2,
                 batch_size: int | None = None, optimizer: str = "adam", momentum: float = 0.0, seed: int = 0,
                 gtol: float = 1e-3, params: Iterable[str] | None = None):
        super().__init__(model, params=params)
        _check(B, epochs, lr, batch_size or 1, optimizer, 0.0)
        self.gtol = float(check_scalar(gtol, "gtol", kind=Real, low=0.0, closed="neither"))
        self.options = dict(B=B, epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                            momentum=momentum, seed=seed)
        self._se: dict[str, Tensor] | None = None
        self._estimate: dict[str, Tensor] | None = None
        self._diag: dict[str, Any] = {}

    def fit(self, context: FitContext) -> Bootstrap:
        context.need(self.name, *self.needs)
        reps = bootstrap_replicates(self._model, context.loss, context.source, weight_decay=context.penalty(),
                                    **self.options)
        self._se = {n: reps.params[n].std(dim=0, unbiased=True) for n in self.names}
        self._estimate = self._current_weights()
        B = self.options["B"]
        converged = reps.grad_max <= self.gtol
        self._diag = dict(B=B, mc_rel_error=1 / math.sqrt(2 * (B - 1)),
                          grad_max_median=float(reps.grad_max.median()), grad_max=float(reps.grad_max.max()),
                          converged_frac=float(converged.double().mean()), weight_decay=context.penalty())
        if not bool(converged.all()):
            warnings.warn(
                f"bootstrap: {int((~converged).sum())} of {B} refits did not converge (max |gradient| of the "
                f"penalised loss {self._diag['grad_max']:.3g} > gtol={self.gtol:g}); raise epochs or lr",
                stacklevel=2,
            )
        return self

    def se(self) -> dict[str, Tensor]:
        if self._se is None:
            raise NotFittedError("bootstrap is not fitted: call fit(FitContext(X=..., y=..., loss=...)) after training")
        # a weight that no refit moved has no information from the resamples: inf, not 0
        return self._identified({k: v.clone() for k, v in self._se.items()})

    @property
    def centre(self) -> str:
        return "weights the refits started from"

    def estimate(self) -> dict[str, Tensor]:
        """The weights every refit started from."""
        if self._estimate is None:
            return self._current_weights()
        return {k: v.clone() for k, v in self._estimate.items()}

    def diagnostics(self) -> dict[str, Any]:
        if self._se is None:
            return dict(self._diag)
        self.se()
        return {**self._diag, "unidentified": self._unidentified}
