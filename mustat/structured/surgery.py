"""Physical removal of channels through Torch-Pruning's dependency graph: to a compute budget
(:func:`prune_channels`) or to the channels a group-level FDR procedure keeps
(:func:`prune_channels_fdr`). The result is a plain, smaller, dense ``nn.Module``.

A model pruned beforehand (masks from :func:`mustat.prune`, ``torch.nn.utils.prune`` or
``torch.ao``) is cut as its effective weights: its masks are baked in (:func:`mustat.finalize`)
before Torch-Pruning's surgery, which cannot cut a parametrized layer, and the surviving entries'
masks are re-installed afterwards as mustat masks, so the function is the masked model's minus the
removed channels. An error before the cut puts the masks back."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np
import pandas as pd
import torch
import torch_pruning as tp
from statsmodels.stats.multitest import multipletests
from torch import nn

from mustat._checks import check_option, check_scalar
from mustat._functional import eval_mode
from mustat._io import atomic_write
from mustat._params import entries, install_mask, masked_names
from mustat.structured.groups import (
    BASELINES,
    NEEDS_GRADIENT,
    Group,
    WaldImportance,
    baseline,
    channel_scores,
    dependency_graph,
    groups,
    output_layers,
    tested_producers,
    wald_scores,
)
from mustat.structured.macs import MacModel, Unsupported, count, record_outputs
from mustat.structured.units import UnitStatistics, chi2_sf

ADJUST_METHODS = ("bonferroni", "holm", "fdr_bh", "fdr_by")

#: ``wald`` is the group Wald statistic per MAC, ``wald-chi2`` and ``wald-pvalue`` its other scores
#: (:class:`~mustat.structured.WaldImportance`); the rest are Torch-Pruning's
IMPORTANCES = ("wald", "wald-chi2", "wald-pvalue", *BASELINES)


@dataclass(frozen=True)
class StructuredReport:
    """What a structured pruning step did: multiply-accumulates and parameters before and after
    (Torch-Pruning's counter, one sample), and per group root the channels ``removed`` and ``kept``."""

    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    removed: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)

    @property
    def flop_speedup(self) -> float:
        return self.macs_before / max(self.macs_after, 1)

    def __str__(self) -> str:
        gone = ", ".join(f"{k}: -{v}" for k, v in self.removed.items() if v) or "nothing"
        return (f"MACs {self.macs_before:,} -> {self.macs_after:,} ({self.flop_speedup:.2f}x), params "
                f"{self.params_before:,} -> {self.params_after:,}; channels removed: {gone}")


def _bake(model: nn.Module) -> dict[str, torch.Tensor]:
    """Take ``model``'s masks off, leaving its effective weights (:func:`mustat.finalize`); returns
    the keep-masks (bool) by tensor name, for :func:`_restore` or :func:`_cut`."""
    from mustat.pruning import finalize  # mustat.pruning is imported after mustat.structured

    table = entries(model)
    masks = {n: table[n].mask().detach() != 0 for n in masked_names(model, table)}
    if masks:
        finalize(model)
    return masks


def _restore(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    for name, keep in masks.items():
        install_mask(model, name, keep)


def _restore_if_uncut(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """After an error: put the masks back if no tensor was cut (the model as it came)."""
    table = entries(model)
    if masks and not masked_names(model, table) and all(
            n in table and tuple(table[n].leaf.shape) == tuple(k.shape) for n, k in masks.items()):
        _restore(model, masks)


def _baked_copy(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no masks, else a copy with its masks baked in."""
    if not masked_names(model):
        return model
    copied = copy.deepcopy(model)
    _bake(copied)
    return copied


def _order(scores: list[np.ndarray], found: list[Group], min_channels: int) -> list[tuple[int, int]]:
    """Channels in removal order (lowest score first; ties by group, then channel), each group
    keeping its ``min_channels`` best."""
    flat = [(s, gi, c) for gi, sc in enumerate(scores) for c, s in enumerate(sc)]
    flat.sort(key=lambda t: (t[0], t[1], t[2]))
    left = [g.size for g in found]
    out = []
    for _, gi, c in flat:
        if left[gi] > min_channels:
            out.append((gi, c))
            left[gi] -= 1
    return out


def _chunks(scores: list[np.ndarray], found: list[Group], min_channels: int, round_to: int | None
            ) -> list[list[tuple[int, int]]]:
    """Channels in removal order, in chunks that leave every group a multiple of ``round_to``.

    Without ``round_to`` each chunk is one channel, in :func:`_order`'s order. With it, a group of
    ``n`` channels sorted by score (lowest first) is split at the removals that leave a multiple of
    ``round_to``: the first chunk is its ``n mod round_to`` lowest channels (``round_to`` when that
    is 0), then ``round_to`` at a time, down to ``round_to * ceil(min_channels / round_to)`` kept; a
    group no wider than that is left whole. Chunks are ranked across groups by their mean score
    (per channel, so a short first chunk competes on equal terms; ties by group, then chunk)."""
    if round_to is None:
        return [[pair] for pair in _order(scores, found, min_channels)]
    floor = round_to * -(-min_channels // round_to)
    ranked = []
    for gi, (sc, g) in enumerate(zip(scores, found)):
        by_score = np.argsort(np.asarray(sc), kind="stable")
        cut, k = 0, 0
        while g.size - cut > floor:
            step = (g.size - cut) % round_to or round_to
            if g.size - cut - step < floor:
                break
            idx = by_score[cut:cut + step]
            ranked.append((float(np.mean(np.asarray(sc)[idx])), gi, k, [(gi, int(c)) for c in idx]))
            cut, k = cut + step, k + 1
    ranked.sort(key=lambda t: t[:3])
    return [chunk for *_, chunk in ranked]


def _apply(model: nn.Module, graph: tp.DependencyGraph, found: list[Group], plan: Sequence[tuple[int, int]]) -> None:
    by_group: dict[int, list[int]] = {}
    for gi, c in plan:
        by_group.setdefault(gi, []).append(c)
    for gi, idxs in sorted(by_group.items()):
        item = found[gi].tp_group[0]
        graph.get_pruning_group(item.dep.target.module, item.dep.handler, sorted(idxs)).prune()


def _replay(trial: nn.Module, example_inputs, found: list[Group], plan, ignored_names) -> nn.Module:
    """Apply ``plan`` (made on a model of the same structure) to ``trial`` through its own graph."""
    graph = dependency_graph(trial, example_inputs)
    mods = dict(trial.named_modules())
    found_t = groups(trial, graph, [mods[n] for n in ignored_names])
    by_root = {g.root: i for i, g in enumerate(found_t)}
    _apply(trial, graph, found_t, [(by_root[found[gi].root], c) for gi, c in plan])
    return trial


def _macs_after(model: nn.Module, example_inputs, found: list[Group], plan, ignored_names) -> int:
    """MACs after ``plan``, counted on a cut copy of ``model`` (a deep copy and a trace: the slow way)."""
    return count(_replay(copy.deepcopy(model), example_inputs, found, plan, ignored_names), example_inputs)[0]


def _flat(chunks) -> list[tuple[int, int]]:
    return [pair for chunk in chunks for pair in chunk]


def _mac_model(model, example_inputs, graph, found, seen) -> MacModel | None:
    try:
        return MacModel(model, example_inputs, graph, found, seen)
    except Unsupported:
        return None


def _search(model, example_inputs, found, chunks, macs, macs0, target_macs, min_channels, ignored_names,
            round_to) -> list[tuple[int, int]]:
    """The shortest prefix of ``chunks`` whose removal meets ``target_macs``, by bisection (MACs
    never grow when channels go). Candidates are counted by ``macs``
    (:class:`~mustat.structured.macs.MacModel`, from the layer shapes); where that is ``None`` (a
    layer its formulas do not cover), on a cut copy of the model each."""
    if macs is not None:
        after = macs.after
    else:
        def after(plan):
            return _macs_after(model, example_inputs, found, plan, ignored_names)
    best = after(_flat(chunks))
    if best > target_macs:
        kept = f"{min_channels} per group" if round_to is None else \
            f"{round_to * -(-min_channels // round_to)} per group (round_to={round_to})"
        raise ValueError(f"the budget target_macs={target_macs:,} is out of reach: removing every prunable "
                         f"channel but {kept} leaves {best:,} MACs "
                         f"({macs0 / max(best, 1):.2f}x); ask for less")
    lo, hi = 0, len(chunks)
    while lo < hi:
        mid = (lo + hi) // 2
        if after(_flat(chunks[:mid])) <= target_macs:
            hi = mid
        else:
            lo = mid + 1
    if round_to is None or hi == 0:
        return _flat(chunks[:hi])
    # the last chunk: of each group's next one, that which meets the budget leaving the most MACs
    # (chunks of a wide, early layer can cost far more than the slack; ties by rank)
    base, nexts = chunks[:hi - 1], {}
    for rank, chunk in enumerate(chunks[hi - 1:]):
        nexts.setdefault(chunk[0][0], (rank, chunk))
    fits = []
    for rank, chunk in nexts.values():
        m = after(_flat(base) + chunk)
        if m <= target_macs:
            fits.append((-m, rank, chunk))
    return _flat(base) + min(fits, key=lambda t: t[:2])[2]


def _importance(importance, model: nn.Module, stats: UnitStatistics | None, example_inputs):
    if isinstance(importance, tp.importance.Importance):
        return importance
    check_option(importance, "importance", IMPORTANCES)
    if importance.startswith("wald"):
        if stats is None:
            raise ValueError(f"importance={importance!r} needs stats=mustat.structured.unit_statistics(model, se) "
                             "(or estimator=...)")
        score = {"wald": "chi2-per-mac", "wald-chi2": "chi2", "wald-pvalue": "pvalue"}[importance]
        return WaldImportance(stats, score, example_inputs)
    if importance in NEEDS_GRADIENT:
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            raise ValueError(f"importance={importance!r} reads the loss gradient from .grad, which is empty for "
                             f"{missing[:3]}: run loss.backward() on training data first")
    return baseline(importance)


def _check_round_to(round_to) -> None:
    if round_to is not None:
        check_scalar(round_to, "round_to", kind=Integral, low=1)


def _names(model: nn.Module, layers) -> list[str]:
    names = {m: n for n, m in model.named_modules()}
    return [names[m] for m in layers]


def prune_channels(
    model: nn.Module,
    example_inputs,
    importance="wald",
    *,
    speedup: float | None = None,
    target_macs: int | None = None,
    stats: UnitStatistics | None = None,
    ignored_layers: Sequence[nn.Module] | None = None,
    min_channels: int = 1,
    round_to: int | None = None,
) -> StructuredReport:
    """Remove the least important channels, ranked across all groups, until the model's
    multiply-accumulates fall to ``target_macs`` (or to the current count divided by ``speedup``).

    Parameters
    ----------
    model
        The model, modified in place; a masked one is cut as its effective weights and keeps the
        masks of the entries that survive (module notes).
    example_inputs
        One input batch for tracing (one sample is enough).
    importance
        ``"wald"`` (mustat's group Wald statistic per MAC saved: needs ``stats``), ``"wald-chi2"``,
        ``"wald-pvalue"`` (:class:`~mustat.structured.WaldImportance`), one of Torch-Pruning's
        ``"magnitude"``, ``"taylor"`` (reads ``.grad``: call ``loss.backward()`` first),
        ``"lamp"``, or any ``tp.importance.Importance``.
    speedup, target_macs
        The budget: exactly one.
    stats
        :func:`~mustat.structured.unit_statistics` of ``model`` for ``importance="wald"``.
    ignored_layers
        Layers whose outputs must keep their size; default: the last Linear or Conv.
    min_channels
        Channels every group keeps (>= 1).
    round_to
        Leave every pruned group a multiple of this many channels (Torch-Pruning's ``round_to``):
        channels go in chunks, per group the lowest-scored first (the first chunk ``n mod
        round_to`` channels, then ``round_to`` at a time), chunks ranked across groups by their mean
        score; a group keeps at least ``round_to`` (``min_channels`` rounded up to a multiple), and
        one no wider is not pruned. The budget is met by the fewest chunks: all but the last in
        rank order, the last being, of each group's next chunk, the one that meets the budget
        leaving the most MACs; so the MACs land at most one chunk's cost below the budget.
        ``None`` (default): single channels (any width), the lowest-ranked first. Measured on the
        VGG-style CNN at equal MACs (docs/PERFORMANCE.md, 1 thread, CPU): 8 took the magnitude
        ranking's batch-64 latency from 1.56x to 1.02x Torch-Pruning's uniform model, but cost the
        Wald ranking 0.72x -> 0.79x (batch 64) and 0.95x -> 1.14x (batch 1), where it kept layers
        the ranking would cut below 8; hence not the default. Pass 8 when the widths come out odd.

    Raises
    ------
    ValueError
        Bad arguments, or a budget no removal reaches (the reachable speed-up named); all before
        the model changes.

    Notes
    -----
    The number of channels (chunks) is the smallest that meets the budget, found by bisection
    (MACs never grow when channels go). Each candidate's MACs come from the layer shapes
    (:class:`~mustat.structured.macs.MacModel`), not from a cut copy, and the model is cut once;
    a model with a layer those formulas do not cover is searched on cut copies (the old way).
    """
    check_scalar(min_channels, "min_channels", kind=Integral, low=1)
    _check_round_to(round_to)
    if (speedup is None) == (target_macs is None):
        raise ValueError("prune_channels takes speedup=... or target_macs=..., exactly one")
    masks = _bake(model)
    try:
        return _prune_channels(model, example_inputs, importance, speedup, target_macs, stats, ignored_layers,
                               min_channels, round_to, masks)
    except BaseException:
        _restore_if_uncut(model, masks)
        raise


def _prune_channels(model, example_inputs, importance, speedup, target_macs, stats, ignored_layers, min_channels,
                    round_to, masks) -> StructuredReport:
    if speedup is not None:
        check_scalar(speedup, "speedup", kind=Real, low=1.0)
    else:
        check_scalar(target_macs, "target_macs", kind=Integral, low=1)
    imp = _importance(importance, model, stats, example_inputs)
    with record_outputs(model) as seen:
        graph = dependency_graph(model, example_inputs)
    ignored = list(ignored_layers) if ignored_layers is not None else None
    found = groups(model, graph, ignored)
    macs = _mac_model(model, example_inputs, graph, found, seen)
    macs0, params0 = (macs.dense, macs.params) if macs is not None else count(model, example_inputs)
    if speedup is not None:
        target_macs = int(macs0 / speedup)
    ignored_names = _names(model, ignored if ignored is not None else output_layers(model))
    chunks = _chunks(channel_scores(model, graph, found, imp), found, min_channels, round_to)
    plan = [] if macs0 <= target_macs else _search(model, example_inputs, found, chunks, macs, macs0,
                                                   target_macs, min_channels, ignored_names, round_to)
    report = _cut(model, example_inputs, graph, found, plan, macs0, params0, masks, ignored_names)
    if macs is not None and macs.after(plan) != report.macs_after:
        warnings.warn(f"the MACs counted from the layer shapes ({macs.after(plan):,}) differ from Torch-Pruning's "
                      f"count of the cut model ({report.macs_after:,}): the budget may be missed; please report "
                      f"the model ({type(model).__name__})", RuntimeWarning, stacklevel=3)
    return report


def _cut(model, example_inputs, graph, found, plan, macs0, params0, masks, ignored_names) -> StructuredReport:
    removed = {g.root: 0 for g in found}
    for gi, _ in plan:
        removed[found[gi].root] += 1
    shadow = None
    if masks:                                  # the masks, cut as the weights are: a copy holding them as values
        shadow = copy.deepcopy(model)
        table = entries(shadow)
        with torch.no_grad():
            for name, keep in masks.items():
                table[name].leaf.copy_(keep.to(table[name].leaf))
        shadow = _replay(shadow, example_inputs, found, plan, ignored_names)
    _apply(model, graph, found, plan)
    macs1, params1 = count(model, example_inputs)       # before the masks: the counter skips parametrized layers
    if shadow is not None:
        table = entries(shadow)
        _restore(model, {name: table[name].leaf.detach() != 0 for name in masks})
    kept = {g.root: g.size - removed[g.root] for g in found}
    return StructuredReport(macs0, macs1, params0, params1, removed, kept)


def group_tests(model: nn.Module, example_inputs, stats: UnitStatistics,
                ignored_layers: Sequence[nn.Module] | None = None) -> pd.DataFrame:
    """One row per channel of every prunable group: ``group`` (its root layer), ``channel``,
    ``producers`` (the layers tested jointly), ``chi2``, ``dof`` and the :math:`\\chi^2_{dof}`
    ``pvalue`` of ``H0: every weight producing the channel is 0``. A group none of whose producers
    ``stats`` covers is an error (untested, it would count as p = 1). A masked model is read, not
    changed (its groups are those of its effective weights)."""
    copied = _baked_copy(model)
    if copied is not model and ignored_layers is not None:
        mods = dict(copied.named_modules())
        ignored_layers = [mods[n] for n in _names(model, ignored_layers)]
    model = copied
    graph = dependency_graph(model, example_inputs)
    rows = []
    for g in groups(model, graph, None if ignored_layers is None else list(ignored_layers)):
        tested = tested_producers(g, stats)
        if not tested:
            raise ValueError(f"the group rooted at {g.root!r} (producers {list(g.producers)}) has no statistics; "
                             f"stats cover {sorted(stats.chi2)}")
        chi2, dof = wald_scores(g, stats, graph, model)
        p = chi2_sf(chi2, dof)
        rows.append(pd.DataFrame({"group": g.root, "channel": np.arange(g.size), "producers": ",".join(tested),
                                  "chi2": chi2, "dof": dof, "pvalue": p}))
    if not rows:
        raise ValueError(f"{type(model).__name__} has no prunable group")
    return pd.concat(rows, ignore_index=True)


def fdr_keep(tests: pd.DataFrame, fdr: float = 0.05, method: str = "fdr_bh") -> pd.DataFrame:
    """``tests`` with ``p_adjusted`` and ``keep``: the channels whose adjusted p-value is ``<= fdr``
    (for ``fdr_bh``, Benjamini-Hochberg over every channel of every group: the expected share of
    kept channels that are truly dead is at most ``fdr`` when the p-values are valid and
    independent or positively dependent)."""
    check_scalar(fdr, "fdr", kind=Real, low=0.0, high=1.0, closed="neither")
    check_option(method, "method", ADJUST_METHODS)
    out = tests.copy()
    out["p_adjusted"] = multipletests(out["pvalue"].to_numpy(), method=method)[1]
    out["keep"] = out["p_adjusted"] <= fdr
    return out


def prune_channels_fdr(
    model: nn.Module,
    example_inputs,
    stats: UnitStatistics,
    *,
    fdr: float = 0.05,
    method: str = "fdr_bh",
    ignored_layers: Sequence[nn.Module] | None = None,
    min_channels: int = 1,
    round_to: int | None = None,
) -> tuple[StructuredReport, pd.DataFrame]:
    """Remove every channel whose group Wald test is not significant at false discovery rate
    ``fdr`` (:func:`fdr_keep`): the width of each layer is chosen by the data. A group with fewer
    than ``min_channels`` discoveries keeps its most significant ones (marked ``forced``). With
    ``round_to``, a group keeps its discoveries rounded up to a multiple of ``round_to`` (at
    least ``round_to``, at most the group), the extra channels being its most significant
    non-discoveries (also ``forced``): rounding never removes a discovery.

    Returns the report and the tests with ``p_adjusted``, ``keep`` and ``forced``. A masked model is
    cut as its effective weights and keeps the masks of the entries that survive (module notes)."""
    check_scalar(min_channels, "min_channels", kind=Integral, low=1)
    _check_round_to(round_to)
    tests = fdr_keep(group_tests(model, example_inputs, stats, ignored_layers), fdr, method)
    masks = _bake(model)
    try:
        return _prune_fdr(model, example_inputs, tests, ignored_layers, min_channels, round_to, masks)
    except BaseException:
        _restore_if_uncut(model, masks)
        raise


def _prune_fdr(model, example_inputs, tests, ignored_layers, min_channels, round_to, masks):
    tests["forced"] = False
    for _, rows in tests.groupby("group", sort=False):
        want = max(min_channels, int(rows["keep"].sum()))
        if round_to is not None:
            want = min(len(rows), round_to * -(-want // round_to))
        short = want - int(rows["keep"].sum())
        if short > 0:
            best = rows[~rows["keep"]].sort_values("pvalue", kind="stable").index[:short]
            tests.loc[best, "forced"] = True
    macs0, params0 = count(model, example_inputs)
    graph = dependency_graph(model, example_inputs)
    found = groups(model, graph, None if ignored_layers is None else list(ignored_layers))
    index = {g.root: i for i, g in enumerate(found)}
    drop = tests[~tests["keep"] & ~tests["forced"]]
    plan = [(index[r], int(c)) for r, c in zip(drop["group"], drop["channel"])]
    ignored_names = _names(model, ignored_layers if ignored_layers is not None else output_layers(model))
    return _cut(model, example_inputs, graph, found, plan, macs0, params0, masks, ignored_names), tests


def export(model: nn.Module, example_inputs: torch.Tensor, path) -> None:
    """Save ``model`` with ``torch.export`` (any batch size) so that plain torch reloads it in any
    process, no mustat needed: ``torch.export.load(path).module()(x)``. Written atomically; the
    eval-mode graph is traced and the model's mode restored."""
    if not isinstance(example_inputs, torch.Tensor):
        raise ValueError(f"export takes one input tensor, got {type(example_inputs).__name__}")
    if not str(path).endswith(".pt2"):
        raise ValueError(f"path={str(path)!r}: torch.export archives end in .pt2")
    # two rows: torch.export specialises a batch of one to the constant 1
    x = example_inputs[:1].expand(2, *example_inputs.shape[1:]).contiguous()
    with eval_mode(model):
        program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    atomic_write(path, lambda tmp: torch.export.save(program, tmp))
