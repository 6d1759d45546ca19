"""Bootstrap references that only the validation uses: the converged Newton bootstrap of a
small network, and the plain loop of refits the vectorized library bootstrap
(:func:`mustat.uncertainty.bootstrap_replicates`) is tested and benchmarked against."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mustat._functional import clone_model
from mustat.uncertainty.bootstrap import Replicates, _check, _make_optimizer, plan
from validation.newton import NewtonFits, newton_fits

Loss = Callable[[Tensor, Tensor], Tensor]


def newton_bootstrap(model: nn.Module, loss: Loss, data: tuple[Tensor, Tensor], *, B: int = 200, seed: int = 0,
                     weight_decay: float = 0.0, gtol: float = 1e-8, max_iter: int = 100
                     ) -> tuple[Replicates, NewtonFits]:
    """The bootstrap of the penalised *estimator*: every refit on the resamples
    :func:`mustat.uncertainty.bootstrap.plan` draws, warm-started at ``model`` and solved to
    ``gtol`` by damped Newton (float64, :func:`validation.newton.newton_fits`). ``loss`` is the
    mean loss of a batch. Returns the stacked refits and the solver's full report."""
    X, y = data
    resample, _ = plan(len(X), B=B, epochs=0, seed=seed)
    fits = newton_fits(model, loss, X[resample], y[resample], weight_decay=weight_decay, gtol=gtol,
                       max_iter=max_iter)
    return Replicates(fits.params, fits.grad_max), fits


def bootstrap_replicates_loop(
    model: nn.Module, loss: Loss, data: tuple[Tensor, Tensor], *, B: int = 200, epochs: int = 50,
    lr: float = 1e-2, batch_size: int | None = None, optimizer: str = "adam", momentum: float = 0.0,
    weight_decay: float = 0.0, seed: int = 0,
) -> dict[str, Tensor]:
    """The library's vectorized bootstrap as a plain Python loop of B fits (same resamples and
    orders): the reference it is tested and benchmarked against."""
    X, y = data
    n = len(X)
    batch_size = batch_size or n
    _check(B, epochs, lr, batch_size, optimizer, weight_decay)
    resample, orders = plan(n, B=B, epochs=epochs, seed=seed)
    orders = list(orders)
    fits = []
    for b in range(B):
        m = clone_model(model).eval()
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
