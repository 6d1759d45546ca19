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

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from mustat._checks import check_option, check_scalar
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


#: ``"newton"`` refits to convergence (:mod:`mustat.uncertainty.newton`); the others run ``epochs``
OPTIMIZERS = ("sgd", "adam", "newton")


def _check(B, epochs, lr, batch_size, optimizer, weight_decay):
    check_scalar(B, "B", kind=Integral, low=2)
    check_scalar(epochs, "epochs", kind=Integral, low=1)
    check_scalar(lr, "lr", kind=Real, low=0.0, closed="neither")
    check_scalar(batch_size, "batch_size", kind=Integral, low=1)
    check_option(optimizer, "optimizer", OPTIMIZERS)
    check_scalar(weight_decay, "weight_decay", kind=Real, low=0.0)


@dataclass(frozen=True)
class Replicates:
    """Stacked refits: ``params[name]`` has shape ``(B, *param.shape)``; ``grad_max[b]`` is
    replicate b's max-abs gradient of its penalised mean loss on its own resample at the end;
    ``fits``: the Newton solver's full report (``optimizer="newton"`` only)."""

    params: dict[str, Tensor]
    grad_max: Tensor
    fits: Any = None


def bootstrap_replicates(
    model: nn.Module,
    loss: Loss,
    data: tuple[Tensor, Tensor],
    *,
    B: int = 200,
    epochs: int = 50,
    lr: float = 1e-2,
    batch_size: int | None = None,
    optimizer: str = "adam",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    gtol: float = 1e-8,
    max_iter: int = 100,
) -> Replicates:
    """Refit ``model`` on ``B`` bootstrap resamples at once; returns the stacked
    parameters (each of shape ``(B, *param.shape)``) and each refit's final gradient.

    ``optimizer="newton"`` solves every refit to convergence (max-abs gradient of
    its penalised mean loss at most ``gtol``, in at most ``max_iter`` damped Newton
    steps, float64, :func:`~mustat.uncertainty.newton.newton_fits`): the bootstrap of
    the penalised *estimator* rather than of a finite training run, for models small
    enough for a Hessian per refit. ``epochs``, ``lr``, ``batch_size`` and ``momentum``
    apply to ``"sgd"`` and ``"adam"`` only.

    ``loss(output, target)`` is the batch's *mean* training loss (a mean of
    per-sample terms, which the MLP fast path relies on). Each replicate
    draws ``n`` rows with replacement, then trains ``epochs`` epochs of
    minibatches (``batch_size``, default ``n``: full batch) in its own random
    order, with its own optimizer state (a ``torch.optim`` optimizer over the
    stacked tensors is exactly ``B`` independent ones: SGD and Adam act
    elementwise, weight decay included). ``model`` is not modified.
    """
    X, y = data
    n = len(X)
    batch_size = batch_size or n
    _check(B, epochs, lr, batch_size, optimizer, weight_decay)
    if optimizer == "newton":
        from mustat.uncertainty.newton import newton_fits

        resample, _ = plan(n, B=B, epochs=0, seed=seed)
        fits = newton_fits(model, loss, X[resample], y[resample], weight_decay=weight_decay, gtol=gtol,
                           max_iter=max_iter)
        return Replicates(fits.params, fits.grad_max, fits)
    base = copy.deepcopy(model)
    params, buffers = stack_module_state([base] * B)
    params = {k: nn.Parameter(v.detach().clone()) for k, v in params.items()}
    base = base.to("meta")
    opt = _make_optimizer(optimizer, list(params.values()), lr, momentum, weight_decay)
    resample, orders = plan(n, B=B, epochs=epochs, seed=seed)

    def one(p, b, xb, yb):
        return loss(functional_call(base, (p, b), (xb,)), yb)

    # Replicate b's parameters reach only its own loss, so the gradient of the summed
    # losses is exactly each replicate's gradient: plain autograd through a batched
    # forward, cheaper than vmap(grad(...)). MLPs get hand-batched matmuls (baddbmm),
    # which skip vmap's per-op dispatch; anything else goes through vmap.
    fast = _batched_mlp(model)
    if fast is not None:
        def losses(p, b, xb, yb):
            # equal batch sizes: sum over replicates of mean losses = B * mean over all rows
            return loss(fast(p, xb).flatten(0, 1), yb.flatten(0, 1)) * B
    else:
        losses = vmap(one, in_dims=(0, 0, 0, 0))
    for order in orders:
        rows = torch.gather(resample, 1, order)
        for start in range(0, n, batch_size):
            idx = rows[:, start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            losses(params, buffers, X[idx], y[idx]).sum().backward()
            opt.step()
    # convergence: each refit's full-resample gradient of its penalised objective
    opt.zero_grad(set_to_none=True)
    losses(params, buffers, X[resample], y[resample]).sum().backward()
    grad_max = torch.stack([
        (p.grad + weight_decay * p.detach()).abs().flatten(1).amax(1) for p in params.values()
    ]).amax(0)
    return Replicates({k: v.detach() for k, v in params.items()}, grad_max.detach())


_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity)


def _batched_mlp(model: nn.Module):
    """For an ``nn.Sequential`` of Linear / Flatten / elementwise activations (no
    masks), a forward taking stacked parameters ``(B, ...)`` and inputs ``(B, n, ...)``."""
    if not isinstance(model, nn.Sequential):
        return None
    steps = []
    for name, m in model.named_children():
        if isinstance(m, nn.Linear) and type(m) is nn.Linear:
            steps.append(("linear", name, m.bias is not None))
        elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            steps.append(("flatten", name, None))
        elif isinstance(m, _ELEMENTWISE):
            steps.append(("act", m, None))
        else:
            return None

    def forward(p, x):
        for kind, ref, bias in steps:
            if kind == "linear":
                w = p[f"{ref}.weight"].transpose(1, 2)
                x = torch.baddbmm(p[f"{ref}.bias"].unsqueeze(1), x, w) if bias else torch.bmm(x, w)
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


def bootstrap_replicates_loop(
    model: nn.Module, loss: Loss, data: tuple[Tensor, Tensor], *, B: int = 200, epochs: int = 50,
    lr: float = 1e-2, batch_size: int | None = None, optimizer: str = "adam", momentum: float = 0.0,
    weight_decay: float = 0.0, seed: int = 0,
) -> dict[str, Tensor]:
    """The same bootstrap as a plain Python loop of B fits (same resamples and orders).

    The reference the vectorized version is tested and benchmarked against.
    """
    X, y = data
    n = len(X)
    batch_size = batch_size or n
    _check(B, epochs, lr, batch_size, optimizer, weight_decay)
    resample, orders = plan(n, B=B, epochs=epochs, seed=seed)
    orders = list(orders)
    fits = []
    for b in range(B):
        m = copy.deepcopy(model)
        opt = _make_optimizer(optimizer, m.parameters(), lr, momentum, weight_decay)
        for order in orders:
            rows = resample[b, order[b]]
            for start in range(0, n, batch_size):
                idx = rows[start : start + batch_size]
                opt.zero_grad()
                loss(m(X[idx]), y[idx]).backward()
                opt.step()
        fits.append({k: v.detach() for k, v in m.named_parameters()})
    return {k: torch.stack([f[k] for f in fits]) for k in fits[0]}


@register_estimator("bootstrap")
class Bootstrap(Estimator):
    """The true nonparametric bootstrap (module notes): ``B`` warm-started refits
    on resampled data, trained together, with the training's weight decay; the SE
    is their SD (``ddof = 1``), paired with the weights the refits started from.

    Its Monte-Carlo relative error is about ``1 / sqrt(2 (B - 1))`` (diagnostics:
    ``mc_rel_error``). Refits whose final max-abs penalised gradient exceeds
    ``gtol`` count as not converged (``converged_frac``; a warning when any).
    ``optimizer="newton"`` solves each refit to ``gtol`` (float64; small models),
    the others train ``epochs`` epochs. ``fit`` needs ``FitContext(X=..., y=..., loss=...)``.
    """

    def __init__(self, model: nn.Module, *, B: int = 200, epochs: int = 50, lr: float = 1e-2,
                 batch_size: int | None = None, optimizer: str = "adam", momentum: float = 0.0, seed: int = 0,
                 gtol: float = 1e-3, max_iter: int = 100, params: Iterable[str] | None = None):
        super().__init__(model, params=params)
        _check(B, epochs, lr, batch_size or 1, optimizer, 0.0)
        self.gtol = float(check_scalar(gtol, "gtol", kind=Real, low=0.0, closed="neither"))
        self.options = dict(B=B, epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                            momentum=momentum, seed=seed)
        if optimizer == "newton":
            self.options.update(gtol=self.gtol, max_iter=int(check_scalar(max_iter, "max_iter", kind=Integral, low=1)))
        self._se: dict[str, Tensor] | None = None
        self._estimate: dict[str, Tensor] | None = None
        self._diag: dict[str, Any] = {}

    def fit(self, context: FitContext) -> Bootstrap:
        context.need(self.name, "X", "y", "loss")
        from mustat.pruning import finalize

        work = finalize(copy.deepcopy(self._model))  # refits train the effective weights
        missing = [n for n in self.names if n not in dict(work.named_parameters())]
        if missing:
            raise ValueError(f"bootstrap: {missing} are not parameters of the model")
        reps = bootstrap_replicates(work, context.loss, (context.X, context.y), weight_decay=context.penalty(),
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
        return {k: v.clone() for k, v in self._se.items()}

    @property
    def centre(self) -> str:
        return "weights the refits started from"

    def estimate(self) -> dict[str, Tensor]:
        """The weights every refit started from."""
        if self._estimate is None:
            return self._current_weights()
        return {k: v.clone() for k, v in self._estimate.items()}

    def diagnostics(self) -> dict[str, Any]:
        return dict(self._diag)
