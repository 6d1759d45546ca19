"""The true nonparametric bootstrap of a small network, vectorized: B refits on
resampled data trained together as one batched model.

Every replicate starts from the given (fitted) model's parameters. For a model
with no hidden layer the refit's optimum is unique, so the start only saves
time; for hidden-layer networks it is necessary: permutation and ReLU-rescaling
symmetries make the optima of independent refits incomparable weight by
weight, while a warm start keeps each replicate in the full-data fit's basin,
so the spread measures sampling variability around *that* solution.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from numbers import Integral, Real

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from mustat._checks import check_option, check_scalar

Loss = Callable[[Tensor, Tensor], Tensor]


def plan(n: int, *, B: int, epochs: int, seed: int) -> tuple[Tensor, Iterator[Tensor]]:
    """Resample indices ``(B, n)`` and, per epoch, each replicate's visiting order ``(B, n)``."""
    g = torch.Generator().manual_seed(seed)
    resample = torch.randint(n, (B, n), generator=g)

    def orders():
        for _ in range(epochs):
            yield torch.rand(B, n, generator=g).argsort(dim=1)

    return resample, orders()


def _make_optimizer(kind: str, params, lr: float, momentum: float):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return torch.optim.Adam(params, lr=lr)


def _check(B, epochs, lr, batch_size, optimizer):
    check_scalar(B, "B", kind=Integral, low=2)
    check_scalar(epochs, "epochs", kind=Integral, low=1)
    check_scalar(lr, "lr", kind=Real, low=0.0, closed="neither")
    check_scalar(batch_size, "batch_size", kind=Integral, low=1)
    check_option(optimizer, "optimizer", ["sgd", "adam"])


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
    seed: int = 0,
) -> dict[str, Tensor]:
    """Refit ``model`` on ``B`` bootstrap resamples at once; returns the stacked
    parameters, each of shape ``(B, *param.shape)``.

    ``loss(output, target)`` is the batch's *mean* training loss (a mean of
    per-sample terms, which the MLP fast path relies on). Each replicate
    draws ``n`` rows with replacement, then trains ``epochs`` epochs of
    minibatches (``batch_size``, default ``n``: full batch) in its own random
    order, with its own optimizer state (a ``torch.optim`` optimizer over the
    stacked tensors is exactly ``B`` independent ones: SGD and Adam act
    elementwise). ``model`` is not modified.
    """
    X, y = data
    n = len(X)
    batch_size = batch_size or n
    _check(B, epochs, lr, batch_size, optimizer)
    base = copy.deepcopy(model)
    params, buffers = stack_module_state([base] * B)
    params = {k: nn.Parameter(v.detach().clone()) for k, v in params.items()}
    base = base.to("meta")
    opt = _make_optimizer(optimizer, list(params.values()), lr, momentum)
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
    return {k: v.detach() for k, v in params.items()}


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
    the Wald SE of the exact MLE only when the refits converge.
    """
    reps = bootstrap_replicates(model, loss, data, **kwargs)
    return {k: v.std(dim=0, unbiased=True) for k, v in reps.items()}


def bootstrap_replicates_loop(
    model: nn.Module, loss: Loss, data: tuple[Tensor, Tensor], *, B: int = 200, epochs: int = 50,
    lr: float = 1e-2, batch_size: int | None = None, optimizer: str = "adam", momentum: float = 0.0, seed: int = 0,
) -> dict[str, Tensor]:
    """The same bootstrap as a plain Python loop of B fits (same resamples and orders).

    The reference the vectorized version is tested and benchmarked against.
    """
    X, y = data
    n = len(X)
    batch_size = batch_size or n
    _check(B, epochs, lr, batch_size, optimizer)
    resample, orders = plan(n, B=B, epochs=epochs, seed=seed)
    orders = list(orders)
    fits = []
    for b in range(B):
        m = copy.deepcopy(model)
        opt = _make_optimizer(optimizer, m.parameters(), lr, momentum)
        for order in orders:
            rows = resample[b, order[b]]
            for start in range(0, n, batch_size):
                idx = rows[start : start + batch_size]
                opt.zero_grad()
                loss(m(X[idx]), y[idx]).backward()
                opt.step()
        fits.append({k: v.detach() for k, v in m.named_parameters()})
    return {k: torch.stack([f[k] for f in fits]) for k in fits[0]}
