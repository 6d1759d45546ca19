"""Pruning criteria: pure functions from a weight tensor (and its standard
errors) to scores. Low scores are pruned first.

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
from mustat._masking import find_mask
from mustat._params import resolve, select

CriterionFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Criterion:
    """A registered criterion: its name, its function, whether it needs ``se``, and
    which estimator the training pipeline feeds it (``"pseudo"``: the raw pseudo-bootstrap
    SD; ``"calibrated"``: :func:`mustat.uncertainty.calibrated_se` with the window mean
    as the estimate)."""

    name: str
    fn: CriterionFn
    requires_se: bool = False
    se_kind: str | None = None


CRITERIA: dict[str, Criterion] = {}


def register_criterion(
    name: str, *, requires_se: bool = False, se_kind: str | None = None
) -> Callable[[CriterionFn], CriterionFn]:
    """Register ``fn(weight, *, se, generator) -> scores`` under ``name``."""
    check_option(se_kind, "se_kind", [None, "pseudo", "calibrated"])

    def deco(fn: CriterionFn) -> CriterionFn:
        if name in CRITERIA:
            raise ValueError(f"a criterion named {name!r} is already registered")
        CRITERIA[name] = Criterion(name, fn, requires_se, se_kind or ("pseudo" if requires_se else None))
        return fn

    return deco


def get_criterion(name: str) -> Criterion:
    """The registered criterion called ``name``; ValueError listing the valid names otherwise."""
    return CRITERIA[check_option(name, "criterion", sorted(CRITERIA))]


@register_criterion("magnitude")
def magnitude(weight: Tensor, *, se: Tensor | None = None, generator=None) -> Tensor:
    """``|w|``: classic magnitude pruning (not scale-invariant)."""
    return weight.abs()


@register_criterion("mu", requires_se=True)
def mu(weight: Tensor, *, se: Tensor, generator=None) -> Tensor:
    """``|w| / se(w)``: the Wald statistic for H0: w = 0 (Ko et al. 2019).

    ``se == 0`` with ``w != 0`` (a frozen weight) scores ``+inf``; ``se == inf``
    (an unidentified weight) and ``w == 0`` score 0.
    """
    return torch.where(weight == 0, torch.zeros_like(weight), weight.abs() / se)


register_criterion("mu-calibrated", requires_se=True, se_kind="calibrated")(mu)
"""``|w| / se(w)`` with the calibrated SE (the pipeline passes ``calibrated_se`` and the window mean)."""


@register_criterion("random")
def random(weight: Tensor, *, se: Tensor | None = None, generator: torch.Generator) -> Tensor:
    """Uniform random scores: the baseline any criterion must beat."""
    return torch.rand(weight.shape, generator=generator, dtype=torch.float64).to(weight.device)


def score(
    model: nn.Module,
    criterion: str,
    *,
    se: Mapping[str, Tensor] | None = None,
    seed: int | None = None,
    params: Iterable[str] | None = None,
    weights: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Score every prunable weight of ``model`` by ``criterion``.

    Parameters
    ----------
    model
        The network (read only).
    criterion
        A registered name: ``"magnitude"``, ``"mu"``, ``"mu-calibrated"``, ``"random"``, ...
        (see ``CRITERIA``). ``"mu"`` and ``"mu-calibrated"`` compute the same ``|w| / se``;
        they differ in the ``se`` (and estimate) the training pipeline supplies.
    se
        Standard errors keyed by tensor name, as :meth:`PseudoBootstrap.std` returns;
        required by ``"mu"``. Extra keys are ignored.
    seed
        Seed of the ``"random"`` criterion (``None``: a fresh nondeterministic seed).
    params
        Names of the tensors to score; default: every ``nn.Linear``/``nn.Conv*d`` weight
        and every masked tensor.
    weights
        Values to score instead of the current weights (for example the window mean,
        ``tracker.mean()``).

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
            "name such as PseudoBootstrap.std() returns"
        )
    names = select(model, params)
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    out = {}
    for name in names:
        module, attr = resolve(model, name)
        w = getattr(module, attr).detach()
        if weights is not None:
            w = _lookup(weights, name, w, "weights")
        s = None
        if crit.requires_se:
            s = _lookup(se, name, w, "se")
            if torch.isnan(s).any() or (s < 0).any():
                raise ValueError(f"se[{name!r}] has NaN or negative entries; standard errors must be >= 0 (+inf: unidentified)")
        scores = crit.fn(w, se=s, generator=generator)
        mask = find_mask(module, attr)
        if mask is not None:
            scores = scores.masked_fill(mask.mask == 0, float("-inf"))
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
