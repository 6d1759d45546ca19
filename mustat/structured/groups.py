r"""Coupled groups of channels, found by Torch-Pruning's dependency graph, and their scores.

A *group* is everything that must shrink together when one channel goes: the root layer's
output row, the BatchNorm entries after it, the input columns of every consumer, and, through a
residual sum, the output rows of every other layer that feeds the same sum
(``tp.DependencyGraph``; Fang et al. 2023, "DepGraph"). A channel of a group is tested jointly
over every layer that *produces* it: the group Wald statistic is the sum of the unit statistics
of those layers (:mod:`~mustat.structured.units`; the estimators' blocks are independent across
layers), with the summed degrees of freedom, and its p-value is the upper tail of
:math:`\chi^2_{k}`. For ranking under a compute budget the default score is the statistic per MAC
the channel costs (:class:`WaldImportance`): one scale across groups and sizes, where
Torch-Pruning's users reach for ad-hoc normalisers.

The baselines are Torch-Pruning's own importances, used as its users would: group magnitude
(L2), group Taylor :math:`|w\,g|` and LAMP.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch_pruning as tp
from torch import Tensor, nn

from mustat._checks import check_option
from mustat._functional import eval_mode
from mustat._params import PRUNABLE_TYPES
from mustat.structured.macs import MacModel, Unsupported, count, record_outputs
from mustat.structured.units import UnitStatistics, chi2_logsf

ROOTS = PRUNABLE_TYPES   # Torch-Pruning's roots: the weight layers, listed once in mustat._params


@dataclass
class Group:
    """One coupled group: ``root`` (the module name whose output channels index it), ``producers``
    (every module whose output channels it removes), ``size`` (channels)."""

    root: str
    producers: tuple[str, ...]
    size: int
    tp_group: tp.dependency.Group


def dependency_graph(model: nn.Module, example_inputs) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``, traced on ``example_inputs`` (autograd on,
    train/eval mode restored)."""
    with eval_mode(model), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)


def output_layers(model: nn.Module) -> list[nn.Module]:
    """The default layers never to prune: the last Linear or Conv in module order (the output)."""
    roots = [m for m in model.modules() if isinstance(m, ROOTS)]
    if not roots:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv layer to prune")
    return roots[-1:]


def groups(model: nn.Module, graph: tp.DependencyGraph, ignored: list[nn.Module] | None = None) -> list[Group]:
    """Every prunable coupled group of ``model`` whose root is a Linear or Conv layer, except those
    that would change an ``ignored`` layer's outputs (default: :func:`output_layers`)."""
    ignored = output_layers(model) if ignored is None else list(ignored)
    names = {m: n for n, m in model.named_modules()}
    out = []
    for g in graph.get_all_groups(ignored_layers=ignored, root_module_types=ROOTS):
        root = g[0].dep.target.module
        producers = tuple(dict.fromkeys(names[d.target.module] for d, _ in g
                                        if graph.is_out_channel_pruning_fn(d.handler) and d.target.module in names))
        out.append(Group(names[root], producers, len(g[0].idxs), g))
    return out


def wald_scores(group: Group, stats: UnitStatistics, graph: tp.DependencyGraph, model: nn.Module
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(chi2, dof)`` of each of the group's channels: the sums over its producing layers that
    ``stats`` covers (:func:`tested_producers`).

    Summing treats the producers' estimates as independent, as the estimators' layer blocks do;
    where two producers are strongly correlated (a convolution and the BatchNorm after it, or the
    branches of a residual sum) the sum overstates the evidence."""
    names = {m: n for n, m in model.named_modules()}
    chi2, dof = np.zeros(group.size), np.zeros(group.size)
    for item in group.tp_group.items:
        name = names.get(item.dep.target.module)
        if name not in stats.chi2 or not graph.is_out_channel_pruning_fn(item.dep.handler):
            continue
        if item.root_idxs is None or any(r is None for r in item.root_idxs):
            continue
        width = graph.get_pruner_of_module(item.dep.target.module).get_out_channels(item.dep.target.module)
        if width is not None and len(stats.chi2[name]) != width:
            raise ValueError(f"stats for layer {name!r} cover {len(stats.chi2[name])} units, the layer has {width}: "
                             "they belong to another version of the model; recompute them after every pruning step")
        np.add.at(chi2, item.root_idxs, stats.chi2[name][item.idxs])
        np.add.at(dof, item.root_idxs, stats.dof[name][item.idxs])
    return chi2, dof


def tested_producers(group: Group, stats: UnitStatistics) -> tuple[str, ...]:
    """The producers of ``group`` that ``stats`` covers (BatchNorm layers, say, have no K-FAC statistics)."""
    return tuple(n for n in group.producers if n in stats.chi2)


WALD_SCORES = ("chi2-per-mac", "chi2", "pvalue")


def channel_cost(model: nn.Module, example_inputs, root: str) -> int:
    """Multiply-accumulates one channel of the group rooted at module ``root`` costs: the count
    saved by removing it (measured on a copy); the group must have two channels or more."""
    trial = copy.deepcopy(model)
    graph = dependency_graph(trial, example_inputs)
    mod = dict(trial.named_modules())[root]
    if graph.get_pruner_of_module(mod).get_out_channels(mod) < 2:
        raise ValueError(f"the group rooted at {root!r} has one channel left; removing it would empty the layer")
    before = count(trial, example_inputs)[0]
    graph.get_pruning_group(mod, graph.get_pruner_of_module(mod).prune_out_channels, [0]).prune()
    return before - count(trial, example_inputs)[0]


class WaldImportance(tp.importance.Importance):
    r"""mustat's group Wald statistic as a Torch-Pruning ``Importance`` (higher: keep), comparable
    across groups, so use it with ``global_pruning=True`` and no normaliser. ``score``:

    * ``"chi2-per-mac"`` (default): :math:`\chi^2_g` divided by the MACs one channel of the group
      costs. :math:`\chi^2_g = w_g^\top \Sigma_g^{-1} w_g` is twice the increase of the negative
      log-likelihood, to second order, when the channel is removed and the other weights re-fitted
      (Optimal Brain Surgeon's saliency of the group, with :math:`\Sigma = H^{-1}`); per MAC it is
      the greedy solution of "lose the least likelihood for the compute saved". Needs
      ``example_inputs``.
    * ``"chi2"``: the statistic alone (compute ignored).
    * ``"pvalue"``: :math:`-\log p` of :math:`\chi^2_{k}`, the evidence that the channel is not
      zero. A test, not a cost: a unit with many inputs needs a large statistic to be significant,
      so p-values favour removing wide layers whatever they cost (the structured benchmark measures
      what that does).

    Build the :class:`~mustat.structured.UnitStatistics` on the model the pruner is given;
    scores refer to its current channels, so recompute them after every pruning step.
    """

    def __init__(self, stats: UnitStatistics, score: str = "chi2-per-mac", example_inputs=None):
        self.stats, self.score = stats, check_option(score, "score", WALD_SCORES)
        if score == "chi2-per-mac" and example_inputs is None:
            raise ValueError("score='chi2-per-mac' needs example_inputs to count each channel's MACs")
        self.example_inputs = example_inputs
        self._macs_key, self._macs = None, None

    def _cost(self, model: nn.Module, root: str) -> int:
        """:func:`channel_cost`, from the layer shapes (:class:`~mustat.structured.macs.MacModel`,
        kept while the model's shapes stay) where its formulas cover the model, else on a copy."""
        key = (id(model), tuple(tuple(p.shape) for p in model.parameters()))
        if self._macs_key != key:
            with record_outputs(model) as seen:
                graph = dependency_graph(model, self.example_inputs)
            try:
                self._macs = (MacModel(model, self.example_inputs, graph, [], seen), graph)
            except Unsupported:
                self._macs = None
            self._macs_key = key
        if self._macs is None:
            return channel_cost(model, self.example_inputs, root)
        macs, graph = self._macs
        mod = model.get_submodule(root)
        try:
            return macs.channel_cost(graph.get_pruning_group(mod, graph.get_pruner_of_module(mod).prune_out_channels, [0]))
        except Unsupported:
            return channel_cost(model, self.example_inputs, root)

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> Tensor | None:
        graph = group._DG
        g = Group("", (), len(group[0].idxs), group)
        chi2, dof = wald_scores(g, self.stats, graph, graph.model)
        if not dof.any():
            root = {m: n for n, m in graph.model.named_modules()}[group[0].dep.target.module]
            raise ValueError(f"the group rooted at {root!r} has no statistics for any layer producing it (stats "
                             f"cover {sorted(self.stats.chi2)}); unscored, it would be pruned first. Estimate "
                             "those layers' SEs, or pass the root layer in ignored_layers")
        if self.score == "pvalue":
            return torch.as_tensor(-chi2_logsf(chi2, dof), dtype=torch.float64)
        if self.score == "chi2":
            return torch.as_tensor(chi2, dtype=torch.float64)
        if g.size < 2:     # its last channel is never removed, so its cost does not matter
            return torch.as_tensor(chi2, dtype=torch.float64)
        root = {m: n for n, m in graph.model.named_modules()}[group[0].dep.target.module]
        cost = self._cost(graph.model, root)
        return torch.as_tensor(chi2 / max(cost, 1), dtype=torch.float64)


def _taylor() -> tp.importance.Importance:
    return tp.importance.GroupTaylorImportance()


#: Torch-Pruning's importances, as its documentation configures them.
BASELINES: dict[str, Callable[[], tp.importance.Importance]] = {
    "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "taylor": _taylor,
    "lamp": lambda: tp.importance.LAMPImportance(p=2),
}

NEEDS_GRADIENT = frozenset({"taylor"})


def baseline(name: str) -> tp.importance.Importance:
    """A Torch-Pruning importance by name (``BASELINES``)."""
    check_option(name, "importance", BASELINES)
    return BASELINES[name]()


def channel_scores(model: nn.Module, graph: tp.DependencyGraph, found: list[Group],
                   importance: tp.importance.Importance) -> list[np.ndarray]:
    """Each group's per-channel scores (higher: keep), float64; a group the importance cannot
    score gets zeros."""
    out = []
    for g in found:
        s = importance(g.tp_group)
        out.append(np.zeros(g.size) if s is None else s.detach().to("cpu", torch.float64).numpy())
    return out
