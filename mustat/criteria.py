"""Pruning criteria: pure functions of a weight tensor and its standard errors
``(w, se)`` to scores. Low scores are pruned first. Where ``se`` comes from is
the estimator's business (:mod:`mustat.uncertainty`), so one criterion such as
``mu`` combines with every registered estimator (``mu[batch-means]``).

A new criterion is one decorated function::

    @register_criterion("squared")
    def squared(weight, *, se=None, generator=None):
        return weight.square()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mustat._checks import check_option
from mustat._functional import FunctionalModel, eval_mode
from mustat._params import entries, select
from mustat.batching import Data, batches
from mustat.stats import zvalues

CriterionFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Criterion:
    """A registered criterion: its name, its function ``fn(weight, *, se, generator)``,
    and whether it needs standard errors, or the loss gradient (then ``fn`` also takes ``grad``);
    ``updates``: pruning by it ends with its estimator's compensating update (``obs``)."""

    name: str
    fn: CriterionFn
    requires_se: bool = False
    requires_grad: bool = False
    updates: bool = False


CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str, *, requires_se: bool = False, requires_grad: bool = False,
                       updates: bool = False) -> Callable[[CriterionFn], CriterionFn]:
    """Register ``fn(weight, *, se, generator) -> scores`` under ``name``
    (``fn(weight, *, se, generator, grad)`` with ``requires_grad=True``; ``updates=True``: the
    pipeline follows each prune with the estimator's ``obs_update()``)."""
    if "[" in name or "]" in name:
        raise ValueError(f"criterion names cannot contain brackets (they mark the estimator: 'mu[pseudo]'), got {name!r}")

    def deco(fn: CriterionFn) -> CriterionFn:
        if name in CRITERIA:
            raise ValueError(f"a criterion named {name!r} is already registered")
        CRITERIA[name] = Criterion(name, fn, requires_se, requires_grad, updates)
        return fn

    return deco


def label(criterion: str, se: str | None = None) -> str:
    """Row label: ``"mu[batch-means]"`` for criteria that use an estimator, else the name."""
    return f"{criterion}[{se}]" if se is not None else criterion


def parse_label(text: str) -> tuple[str, str | None]:
    """``"mu[batch-means]"`` -> ``("mu", "batch-means")``; ``"magnitude"`` -> ``("magnitude", None)``."""
    name, bracket, rest = text.partition("[")
    if not bracket:
        return text, None
    if not rest.endswith("]") or not rest[:-1]:
        raise ValueError(f"criterion {text!r} is malformed; write a name, or name[estimator] such as 'mu[pseudo]'")
    return name, rest[:-1]


def get_criterion(name: str) -> Criterion:
    """The registered criterion called ``name``; ValueError listing the valid names otherwise."""
    return CRITERIA[check_option(name, "criterion", sorted(CRITERIA))]


@register_criterion("magnitude")
def magnitude(weight: Tensor, *, se: Tensor | None = None, generator=None) -> Tensor:
    """``|w|``: classic magnitude pruning (not scale-invariant)."""
    return weight.abs()


@register_criterion("mu", requires_se=True)
def mu(weight: Tensor, *, se: Tensor, generator=None) -> Tensor:
    """``|w| / se(w)``: the Wald statistic for H0: w = 0 (Ko et al. 2019), with the
    conventions of :func:`mustat.stats.zvalues`. With the constant ``se`` it is
    magnitude pruning; with the curvature SE, Optimal Brain Damage's ranking."""
    return zvalues(weight, se).abs()


@register_criterion("obs", requires_se=True, updates=True)
def obs(weight: Tensor, *, se: Tensor, generator=None) -> Tensor:
    """Optimal Brain Surgeon (Hassibi & Stork 1993): rank by the saliency ``w^2 / (2 se^2)`` with
    ``se^2 = [H^-1]_qq`` (the same order as ``mu``), then move the kept weights by the compensating
    update (``Marginal.obs_update``). Needs a marginal estimator: ``obs[kfac]``, ``obs[block]``, ..."""
    return zvalues(weight, se).square() / 2


@register_criterion("lamp")
def lamp(weight: Tensor, *, se: Tensor | None = None, generator=None) -> Tensor:
    """Layer-adaptive magnitude pruning (Lee et al. 2021): ``w_u^2 / sum_{v >= u} w_v^2`` over the
    tensor's weights sorted by magnitude, so each tensor's largest weight scores 1 and global
    ranking needs no per-layer ratio. Scale-invariant per tensor; no standard error."""
    sq = weight.detach().double().reshape(-1).square()
    order = torch.sort(sq, stable=True).indices
    tail = sq[order].flip(0).cumsum(0).flip(0)          # sum of the weights at or above each rank
    out = torch.empty_like(sq)
    out[order] = torch.where(tail > 0, sq[order] / tail.clamp_min(1e-300), torch.zeros_like(tail))
    return out.reshape(weight.shape).to(weight.device)


@register_criterion("random")
def random(weight: Tensor, *, se: Tensor | None = None, generator: torch.Generator) -> Tensor:
    """Uniform random scores: the baseline any criterion must beat."""
    return torch.rand(weight.shape, generator=generator, dtype=torch.float64).to(weight.device)


@register_criterion("gradient-weight", requires_grad=True)
def gradient_weight(weight: Tensor, *, se: Tensor | None = None, generator=None, grad: Tensor) -> Tensor:
    """``|w * g|`` with ``g`` the gradient of the mean *data* loss: SNIP's connection
    sensitivity (Lee, Ajanthan & Torr 2019), the first-order estimate of the loss change
    when the weight is removed, here at the current weights rather than at initialisation.
    At a penalised optimum ``g = -weight_decay * w``, so it ranks like ``w^2``: magnitude."""
    return (weight * grad).abs()


def loss_gradient(model: nn.Module, data: Data, loss: Callable[[Tensor, Tensor], Tensor], *,
                  params: Iterable[str] | None = None, batch_size: int = 1024) -> dict[str, Tensor]:
    """The gradient of the mean loss over ``data`` with respect to every scored weight (keyed like
    :func:`score`): ``data`` is ``(X, y)`` tensors (read in chunks of ``batch_size``) or an iterable of
    batches such as a DataLoader; ``loss(output, target)`` is a batch mean. The gradient is taken
    through the functional view (:class:`mustat._functional.FunctionalModel`) in eval mode, so
    frozen tensors have one too, masked entries get 0, and the model (its ``.grad`` fields and
    train/eval mode included) is left as it was."""
    names = select(model, params)
    fm = FunctionalModel(model)
    values = fm.params(names)
    total = {n: torch.zeros_like(v) for n, v in values.items()}
    rows = 0

    def summed(v, xb, yb):
        return loss(fm(v, xb), yb) * len(yb)

    with eval_mode(model):
        for xb, yb in batches(data, batch_size):
            for n, g in torch.func.grad(summed)(values, xb, yb).items():
                total[n] += g
            rows += len(yb)
    if rows == 0:
        raise ValueError("loss_gradient: the data has no rows")
    return {n: t / rows for n, t in total.items()}


def score(
    model: nn.Module,
    criterion: str,
    *,
    se: Mapping[str, Tensor] | None = None,
    seed: int | None = None,
    params: Iterable[str] | None = None,
    weights: Mapping[str, Tensor] | None = None,
    grads: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Score every prunable weight of ``model`` by ``criterion``.

    Parameters
    ----------
    model
        The network (read only).
    criterion
        A registered name: ``"magnitude"``, ``"mu"``, ``"random"``, ... (see ``CRITERIA``).
    se
        Standard errors keyed by tensor name, as any estimator's ``se()`` returns
        (:mod:`mustat.uncertainty`); required by ``"mu"``. Extra keys are ignored.
    seed
        Seed of the ``"random"`` criterion (``None``: a fresh nondeterministic seed).
    params
        Names of the tensors to score; default: every ``nn.Linear``/``nn.Conv*d`` weight
        and every masked tensor.
    weights
        Values to score instead of the current weights: the estimate the ``se``
        belongs with, ``estimator.estimate()`` (for example the window mean).
    grads
        Loss gradients keyed by tensor name (:func:`loss_gradient`); required by
        criteria registered with ``requires_grad`` (``"gradient-weight"``).

    Returns
    -------
    dict[str, Tensor]
        Scores with each weight's shape. Already pruned weights score ``-inf``,
        below every unpruned weight.
    """
    crit = get_criterion(criterion)
    if crit.requires_se and se is None:
        raise ValueError(
            f"criterion {crit.name!r} needs se=..., a dict of standard errors keyed by tensor "
            "name such as an estimator's se() returns (mustat.uncertainty)"
        )
    if crit.requires_grad and grads is None:
        raise ValueError(
            f"criterion {crit.name!r} needs grads=..., the loss gradient per tensor: "
            "mustat.criteria.loss_gradient(model, (X, y), loss)"
        )
    names = select(model, params)
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    out = {}
    table = entries(model)
    for name in names:
        e = table[name]
        w = e.effective()
        if weights is not None:
            w = _lookup(weights, name, w, "weights")
        s = None
        if crit.requires_se:
            s = _lookup(se, name, w, "se")
            if torch.isnan(s).any() or (s < 0).any():
                raise ValueError(f"se[{name!r}] has NaN or negative entries; standard errors must be >= 0 (+inf: unidentified)")
        extra = {"grad": _lookup(grads, name, w, "grads")} if crit.requires_grad else {}
        scores = crit.fn(w, se=s, generator=generator, **extra)
        mask = e.mask()
        if mask is not None:
            scores = scores.masked_fill(mask == 0, float("-inf"))
        out[name] = scores
    return out


def _lookup(mapping: Mapping[str, Tensor], name: str, ref: Tensor, argname: str) -> Tensor:
    if name not in mapping:
        raise ValueError(
            f"{argname} has no entry {name!r}; it must have one per scored tensor "
            f"(scored: pass params=[...] to choose them), got keys {sorted(mapping)}"
        )
    value = mapping[name]
    if not isinstance(value, Tensor) or value.shape != ref.shape:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{argname}[{name!r}] has shape {shape}, the weight has {tuple(ref.shape)}")
    return value.detach().to(ref.device)
