"""From scores to masks: global or layer-wise pruning to a cumulative sparsity,
applied through ``torch.nn.utils.parametrize`` (see ``mustat._masking`` for why)."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from numbers import Real

import pandas as pd
import torch
from torch import Tensor, nn

from mustat import _masking as M
from mustat._checks import check_option, check_scalar
from mustat._params import entries, entry, install_mask, mask_of, masked_names, select
from mustat.patterns import check_groups, is_transposed, nm_keep, parse_pattern, resolve_sparsity


class Scope(str, Enum):
    """How weights are ranked."""

    GLOBAL = "global"
    """All scored weights ranked together: layers end with different sparsities."""
    LAYER = "layer"
    """Each tensor ranked on its own and pruned to the same fraction."""


@dataclass(frozen=True)
class PruningReport:
    """Per-tensor counts of pruned (masked) weights.

    ``compression_ratio`` is total / nonzero weights over the reported tensors.
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    pruned: tuple[int, ...]

    @classmethod
    def from_model(cls, model: nn.Module, params=None) -> PruningReport:
        names = select(model, params)
        table = entries(model)
        sizes, pruned = [], []
        for name in names:
            e = table[name]
            m = e.mask()
            sizes.append(getattr(e.module, e.attr).numel())
            pruned.append(0 if m is None else int((m == 0).sum()))
        return cls(tuple(names), tuple(sizes), tuple(pruned))

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def total_pruned(self) -> int:
        return sum(self.pruned)

    @property
    def sparsity(self) -> float:
        """Fraction of pruned weights among the reported tensors."""
        return self.total_pruned / self.total

    @property
    def compression_ratio(self) -> float:
        kept = self.total - self.total_pruned
        return float("inf") if kept == 0 else self.total / kept

    def to_frame(self) -> pd.DataFrame:
        """One row per tensor plus a ``total`` row."""
        df = pd.DataFrame({"tensor": self.names, "size": self.sizes, "pruned": self.pruned})
        df.loc[len(df)] = ["total", self.total, self.total_pruned]
        df["kept"] = df["size"] - df["pruned"]
        df["sparsity"] = df["pruned"] / df["size"]
        return df

    def __str__(self) -> str:
        return (
            self.to_frame().to_string(index=False, float_format=lambda x: f"{x:.4f}")
            + f"\ncompression ratio {self.compression_ratio:.2f}x"
        )

    def _repr_html_(self) -> str:
        return self.to_frame().to_html(index=False, float_format=lambda x: f"{x:.4f}")


def _alive(model: nn.Module, name: str, like: Tensor) -> Tensor:
    m = mask_of(model, name)
    if m is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    return (m != 0).to(like.device)


def ranked_cut(scores: Tensor, alive: Tensor, k: int, protected: Tensor | None = None) -> Tensor:
    """Boolean ``keep`` of the flattened scores: the ``k`` lowest are cut.

    Already dead entries are cut first (never revived) and ``protected`` entries last,
    whatever their scores (``+inf`` included); ties fall to the lower flat index (a
    stable sort), so the result is deterministic.
    """
    order = torch.sort(scores, stable=True).indices
    if protected is not None:
        order = order[torch.sort(protected[order].to(torch.uint8), stable=True).indices]
    order = order[torch.sort(alive[order].to(torch.uint8), stable=True).indices]
    keep = torch.ones_like(alive)
    keep[order[:k]] = False
    return keep


class LayerCollapseWarning(UserWarning):
    """A prune removed every weight of some tensors (``tensors`` names them): the network
    cannot pass signal through them any more."""

    def __init__(self, message: str, tensors: list[str]):
        super().__init__(message)
        self.tensors = list(tensors)

    def __reduce__(self):  # crosses process boundaries intact (parallel workers)
        return type(self), (str(self), self.tensors)


class ScoreScaleWarning(LayerCollapseWarning):
    """A global prune gutted some tensors without emptying them (``tensors`` names them,
    ``kept`` maps each to the fraction of its weights left): the scores' scale differs
    between tensors, so ranking them together spent the pruning on a few.

    How it is decided: with target ``s``, a tensor of ``n`` weights is gutted when this call
    prunes some of its weights, leaves at least one, and leaves it with more than
    ``floor(n * (3 + s) / 4)`` pruned, which is what ``max_tensor_sparsity=(3 + s) / 4``
    would allow: it keeps under a quarter of the share ``1 - s`` that an even (layer-wise)
    prune keeps. At ``s = 0.9`` that is a tensor pruned beyond 97.5%, at ``s = 0.5`` beyond
    87.5%. Magnitude pruning moves cuts between tensors too (the largest tensor ends a little
    beyond ``s``, small ones well below it), but seldom by that much. That cap or
    ``scope="layer"`` prevents it; scores whose scale is comparable across tensors avoid it. An emptied tensor
    raises the parent :class:`LayerCollapseWarning` instead, and layer-wise scope and N:M
    patterns never warn. A filter on :class:`LayerCollapseWarning` silences both.

    It looks only at how the cuts are shared between tensors: a criterion that ranks the
    weights within a tensor badly, at ordinary shares, does not raise it.
    """

    def __init__(self, message: str, tensors: list[str], kept: Mapping[str, float] | None = None):
        super().__init__(message, tensors)
        self.kept = dict(kept or {})

    def __reduce__(self):
        return type(self), (str(self), self.tensors, self.kept)


def _gutting_cap(sparsity: float) -> float:
    """The per-tensor sparsity beyond which :class:`ScoreScaleWarning` calls a tensor gutted."""
    return (3 + sparsity) / 4


def _gutted(sizes: Mapping[str, int], kept: Mapping[str, int], cut: Mapping[str, int], sparsity: float) -> list[str]:
    """The tensors :class:`ScoreScaleWarning` names (see there for the rule)."""
    cap = _gutting_cap(sparsity)
    return [t for t in sizes if cut[t] > 0 and kept[t] > 0 and sizes[t] - kept[t] > _cap_count(cap, sizes[t])]


def _protected(scores: Tensor, alive: Tensor, max_pruned: int) -> Tensor:
    """The live entries a per-tensor cap keeps: the highest-scoring ones beyond ``max_pruned`` cuts.

    Live entries rank above dead ones whatever their scores, so a live entry scoring
    ``-inf`` is still protected before a dead one (which is pruned anyway)."""
    out = torch.zeros_like(alive)
    n_keep = scores.numel() - max_pruned
    if n_keep > 0:
        order = torch.sort(scores, descending=True, stable=True).indices
        order = order[torch.sort(alive[order].to(torch.uint8), descending=True, stable=True).indices]
        out[order[:n_keep]] = True
    return out


def _cap_count(cap: float, n: int) -> int:
    """``floor(cap * n)``, robust to the float error of the product (0.29 * 100 is 28.999...)."""
    return math.floor(cap * n + 1e-9)


def cap_violation(sizes: dict[str, int], dead: dict[str, int], sparsity: float, scope: str | Scope,
                  max_tensor_sparsity: float) -> str | None:
    """Why :func:`prune` cannot reach ``sparsity`` on tensors of ``sizes`` (``dead`` entries each
    already pruned) under the per-tensor cap, or None when it can. The pipeline checks every
    round's target with it before training."""
    scope = check_option(scope, "scope", Scope)
    allowed = {n: max(_cap_count(max_tensor_sparsity, sizes[n]), dead.get(n, 0)) for n in sizes}
    if scope is Scope.GLOBAL:
        total = sum(sizes.values())
        k = round(sparsity * total)
        if k > sum(allowed.values()):
            return (f"sparsity={sparsity} cannot be reached with max_tensor_sparsity={max_tensor_sparsity}: the cap "
                    f"allows at most {sum(allowed.values()) / total:.4f} of these {total} weights; raise the cap or "
                    "lower the target")
        return None
    for n, size in sizes.items():
        k = round(sparsity * size)
        if k > allowed[n]:
            return (f"sparsity={sparsity} cannot be reached with scope='layer' and max_tensor_sparsity="
                    f"{max_tensor_sparsity}: {n!r} has {size} entries, so the target prunes {k} and the cap allows "
                    f"{allowed[n]}; raise the cap or lower the target")
    return None


def prune(
    model: nn.Module,
    scores: Mapping[str, Tensor],
    *,
    sparsity: float | None = None,
    scope: str | Scope = "global",
    max_tensor_sparsity: float | None = None,
    update=None,
    pattern: str = "unstructured",
) -> PruningReport:
    """Mask the lowest-scoring weights so that ``sparsity`` of them are zero.

    Parameters
    ----------
    model
        The network; masks are added (or tightened) in place.
    scores
        Scores keyed by tensor name (from :func:`mustat.score`); lower is pruned first.
        ``+inf`` means "prune last", ``-inf`` "prune first"; NaN is refused.
    sparsity
        Cumulative target fraction of pruned weights among the scored tensors after
        the call, in [0, 1) (not an increment): exactly ``round(sparsity * n)`` pruned,
        over all tensors (``scope="global"``) or per tensor (``scope="layer"``).
        Pruned weights are never revived: a target below the current sparsity
        leaves the masks as they are, with a warning. Required for an unstructured
        pattern; an N:M pattern implies ``1 - N/M``.
    scope
        ``"global"`` or ``"layer"``; see :class:`Scope`.
    max_tensor_sparsity
        At most this fraction of any one tensor is pruned (``floor(c * n_t)``
        entries; weights already pruned stay pruned). Global ranking can otherwise
        empty a whole layer when a criterion's scale differs between layers
        (``None``: no cap). A target the cap makes unreachable is an error.
    update
        A fitted marginal estimator (``fisher``, ``block``, ``kfac``, ``woodfisher``): after the
        masks are set, the kept weights get Optimal Brain Surgeon's compensating update in its
        block structure (:meth:`mustat.uncertainty.Marginal.obs_update`), fitted at the weights
        being pruned. ``None``: the kept weights are left as they are.
    pattern
        ``"unstructured"``, or ``"N:M"`` (``"2:4"``, ``"4:8"``): the N highest-scoring of every M
        consecutive weights of each row are kept (:mod:`mustat.patterns`; a convolution's row is
        ``in * kernel``). The groups are fixed, so ``scope`` does not apply, and
        ``max_tensor_sparsity`` is refused. Check a model with :func:`mustat.check_pattern`.

    Returns
    -------
    PruningReport
        Counts for the scored tensors after the call.

    Warns
    -----
    LayerCollapseWarning
        When a tensor that still had live weights ends fully pruned.
    ScoreScaleWarning
        With ``scope="global"``, when this call leaves a tensor pruned beyond ``(3 + sparsity) / 4``
        (beyond 97.5% at 90%) but not empty; see :class:`ScoreScaleWarning`.
    """
    nm = parse_pattern(pattern)
    if sparsity is not None:
        check_scalar(sparsity, "sparsity", kind=Real, low=0.0, high=1.0, closed="left")
    sparsity = resolve_sparsity(sparsity, nm)
    if nm.structured and max_tensor_sparsity is not None:
        raise ValueError(f"max_tensor_sparsity does not apply to pattern='{nm}': every tensor is pruned to exactly "
                         f"{nm.sparsity:g}; leave it out")
    scope = check_option(scope, "scope", Scope)
    if update is not None:
        if not callable(getattr(update, "obs_update", None)):
            raise ValueError(f"update must be a fitted marginal estimator (fisher, block, kfac, woodfisher) with "
                             f"obs_update(), got {type(update).__name__}")
        update.check_update(model)          # before any mask changes
    if max_tensor_sparsity is not None:
        check_scalar(max_tensor_sparsity, "max_tensor_sparsity", kind=Real, low=0.0, high=1.0, closed="right")
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must be a non-empty dict of tensors keyed by tensor name, as mustat.score returns")
    targets = {}
    table = entries(model)
    for key, s in scores.items():
        e = entry(model, key, table)
        name = e.name
        if name in targets:
            raise ValueError(f"scores has two entries, {name!r} and {key!r}, for one tensor (they are tied: "
                             "one parameter used in two places); give one")
        w = getattr(e.module, e.attr)
        if not isinstance(s, Tensor) or s.shape != w.shape:
            shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(f"scores[{key!r}] has shape {shape}, the weight has {tuple(w.shape)}")
        if torch.isnan(s).any():
            raise ValueError(f"scores[{key!r}] contains NaN; scores must be numbers (+/-inf allowed)")
        check_groups(w.T.shape if is_transposed(e.module, e.attr) else w.shape, nm, name)
        targets[name] = (e.module, e.attr, s.detach(), _alive(model, name, s))

    already = sum(int((~a).sum()) for *_, a in targets.values())
    if max_tensor_sparsity is not None:
        why = cap_violation({n: t[2].numel() for n, t in targets.items()},
                            {n: int((~t[3]).sum()) for n, t in targets.items()}, sparsity, scope, max_tensor_sparsity)
        if why:
            raise ValueError(why)
    if nm.structured:
        keeps = {}
        for name, (module, attr, s, a) in targets.items():
            flip = is_transposed(module, attr)
            keep = nm_keep(s.T if flip else s, nm, a.T if flip else a)
            keeps[name] = keep.T if flip else keep
        below = False
    elif scope is Scope.GLOBAL:
        device = next(iter(targets.values()))[2].device
        if device.type == "mps":  # no float64 there: rank on the CPU
            device = torch.device("cpu")
        parts, guards = [], []
        for _, _, s, a in targets.values():
            flat_s, flat_a = s.flatten().to(device, torch.float64), a.flatten().to(device)
            if max_tensor_sparsity is not None:
                most = max(_cap_count(max_tensor_sparsity, s.numel()), int((~flat_a).sum()))
                guards.append(_protected(flat_s, flat_a, most))
            parts.append(flat_s)
        flat = torch.cat(parts)
        protected = torch.cat(guards) if guards else None
        alive = torch.cat([a.flatten().to(device) for *_, a in targets.values()])
        k = round(sparsity * flat.numel())
        keep_all = ranked_cut(flat, alive, max(k, int((~alive).sum())), protected)
        keeps, start = {}, 0
        for name, (_, _, s, _) in targets.items():
            keeps[name] = keep_all[start : start + s.numel()].view(s.shape)
            start += s.numel()
        below = k < already
    else:
        keeps, below = {}, False
        for name, (_, _, s, a) in targets.items():
            k = round(sparsity * s.numel())
            dead = int((~a).sum())
            below |= k < dead
            keeps[name] = ranked_cut(s.flatten(), a.flatten(), max(k, dead)).view(s.shape)
    if below:
        warnings.warn(
            f"sparsity={sparsity} is below the current sparsity; pruned weights are never revived, "
            "so those masks are left as they are",
            stacklevel=2,
        )
    collapsed = [name for name, (*_, a) in targets.items() if bool(a.any()) and not bool(keeps[name].any())]
    if collapsed:
        warnings.warn(LayerCollapseWarning(
            f"this prune removes every weight of {', '.join(collapsed)}: nothing passes through "
            f"{'it' if len(collapsed) == 1 else 'them'} any more. Global ranking compares scores across layers; "
            "cap each tensor with max_tensor_sparsity=... (the CLI's --max-tensor-sparsity) or use scope='layer'",
            collapsed), stacklevel=2)
    if scope is Scope.GLOBAL and not nm.structured:
        sizes = {n: t[2].numel() for n, t in targets.items()}
        kept = {n: int(keeps[n].sum()) for n in targets}
        cut = {n: int((targets[n][3] & ~keeps[n].to(targets[n][3].device)).sum()) for n in targets}
        gutted = _gutted(sizes, kept, cut, sparsity)
        if gutted:
            shares = {n: kept[n] / sizes[n] for n in gutted}
            listing = ", ".join(f"{n} ({1 - shares[n]:.4f} pruned: {kept[n]} of {sizes[n]} kept)" for n in gutted)
            one = len(gutted) == 1
            warnings.warn(ScoreScaleWarning(
                f"global ranking at sparsity={sparsity:g} prunes {listing} beyond (3 + sparsity)/4 = "
                f"{_gutting_cap(sparsity):g}, keeping under a quarter of the share an even prune keeps: the scores' scale differs "
                f"between tensors, so this prune guts {'it' if one else 'them'} without emptying "
                f"{'it' if one else 'them'}. Use scope='layer', or cap each tensor with max_tensor_sparsity="
                f"{_gutting_cap(sparsity):g} (the CLI's --max-tensor-sparsity), or take the standard errors from a "
                "marginal estimator such as 'kfac'",
                gutted, shares), stacklevel=2)
    for name in targets:
        install_mask(model, name, keeps[name], table)
    if update is not None:
        update.obs_update()
    return PruningReport.from_model(model, list(targets))


def sparsity(model: nn.Module, params=None) -> float:
    """Fraction of exactly-zero entries among the effective prunable weights.

    Counts values, not masks: it is what a saved, finalized model holds.
    """
    zeros = total = 0
    table = entries(model)
    for name in select(model, params):
        w = table[name].effective()
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total


def finalize(model: nn.Module) -> nn.Module:
    """Make pruning permanent (like ``torch.nn.utils.prune.remove``).

    Every masked tensor (mustat's masks, ``torch.nn.utils.prune``'s and ``torch.ao``'s)
    becomes a plain parameter holding zeros where it was masked; no masks or mask
    parametrizations are left. A tied tensor stays tied. Returns ``model``.
    """
    table = entries(model)
    for name in masked_names(model, table):
        e = table[name]
        keep = e.mask().detach()
        for s in e.places():  # every mechanism off, the one leaf parameter back in every place
            M.strip_mask(s.module, s.attr)
        with torch.no_grad():
            e.leaf.mul_(keep.to(e.leaf))
        for s in e.places():
            if s.module._parameters.get(s.attr) is not e.leaf:
                if hasattr(s.module, s.attr):
                    delattr(s.module, s.attr)
                s.module.register_parameter(s.attr, e.leaf)
    return model


_MASK_KEY = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.(\d+)\.mask$")


def load_pruned_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True):
    """Load a pruned model's ``state_dict`` into a model, adding the masks it needs.

    A fresh, unpruned model has no place for masks, so plain
    ``model.load_state_dict`` refuses a pruned state; this installs each mask
    found in ``state_dict`` first, then loads. A state saved in ``torch.nn.utils.prune``'s
    layout (``<attr>_orig``, ``<attr>_mask``) is loaded as mustat masks. Returns what
    ``load_state_dict`` returns.
    """
    state_dict = dict(state_dict)
    for key in [k for k in state_dict if k.endswith("_mask") and f"{k[:-5]}_orig" in state_dict]:
        head, _, attr = key[:-5].rpartition(".")
        prefix = f"{head}." if head else ""
        state_dict[f"{prefix}parametrizations.{attr}.original"] = state_dict.pop(f"{key[:-5]}_orig")
        state_dict[f"{prefix}parametrizations.{attr}.0.mask"] = state_dict.pop(key)
    installs = []
    for key, value in state_dict.items():
        m = _MASK_KEY.match(key)
        if m is None:
            continue
        path, attr = m.group(1) or "", m.group(2)
        try:
            module = model.get_submodule(path) if path else model
        except AttributeError:
            raise ValueError(f"state_dict mask {key!r} has no module {path!r} in this model: is it the same "
                             "architecture?") from None
        if not isinstance(getattr(module, attr, None), Tensor) or getattr(module, attr).shape != value.shape:
            have = tuple(getattr(module, attr).shape) if isinstance(getattr(module, attr, None), Tensor) else None
            raise ValueError(f"state_dict mask {key!r} has shape {tuple(value.shape)}, the model's {attr} has "
                             f"{have}: is it the same architecture?")
        installs.append((module, attr, value))
    for module, attr, value in installs:  # every mask checked before the model is touched
        M.set_mask(module, attr, value)
    return model.load_state_dict(state_dict, strict=strict)


def to_torch_prune(model: nn.Module) -> nn.Module:
    """Convert every mustat mask on ``model`` to ``torch.nn.utils.prune``'s layout, in place
    (``<attr>_orig`` with the same values and parameter object, ``<attr>_mask``, a pre-hook),
    for code that expects it; ``torch.nn.utils.prune.remove`` then finalizes as usual. Tied
    tensors cannot be expressed there (each place would get its own ``_orig``): an error.
    Returns ``model``. mustat reads that layout too, so scoring and pruning go on."""
    table = entries(model)
    for name in masked_names(model, table):
        e = table[name]
        if e.tied:
            raise ValueError(f"{name!r} is tied ({', '.join(s.path for s in e.slots)}); torch.nn.utils.prune "
                             "cannot keep one parameter in two places: keep mustat's masks for this model")
        M.to_torch_prune(e.module, e.attr)
    return model


def from_torch_prune(model: nn.Module) -> nn.Module:
    """Convert every ``torch.nn.utils.prune`` and ``torch.ao.pruning`` mask on ``model`` to a
    mustat mask, in place, keeping the unmasked values and the parameter objects (an
    optimizer over them keeps working). Returns ``model``."""
    table = entries(model)
    for name in masked_names(model, table):
        for s in table[name].slots:
            M.from_torch_prune(s.module, s.attr)
    return model
