"""Naming and finding the tensors mustat tracks, scores and prunes.

A tensor is named by its module path plus attribute (``"0.weight"``,
``"features.3.weight"``); the name does not change when a mask is added, whatever
names the masking mechanism gives the underlying tensors.

One parameter used in several places (an embedding tied to an output head, a module
shared by two paths) is *one* tensor: it is named by its first name in module order,
counted once, scored once, and every place it is used gets the same mask
(:func:`install_mask`). Any of its names is accepted and mapped to the first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from torch import Tensor, nn
from torch.nn.utils import parametrize

from mustat import _masking as M

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable(module: nn.Module, attr: str) -> bool:
    """Whether ``module.<attr>`` is pruned by default: the ``weight`` of a Linear or convolution,
    the input and hidden weights of a recurrent layer (``weight_ih_l0``, ``weight_hh_l0``, ...),
    and the packed input projection of an attention layer (``in_proj_weight``; its output
    projection is a Linear). Embeddings, norms and biases are not."""
    if isinstance(module, PRUNABLE_TYPES):
        return attr == "weight"
    if isinstance(module, nn.RNNBase):
        return attr.startswith(("weight_ih_l", "weight_hh_l"))
    if isinstance(module, nn.MultiheadAttention):
        return attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
    return False


@dataclass(frozen=True, eq=False)
class Slot:
    """One place a tensor is used: ``module.<attr>``, called ``path`` (``"head.weight"``)."""

    path: str
    module: nn.Module
    attr: str

    @property
    def key(self) -> str | None:
        """Its key for ``torch.func.functional_call`` (see :func:`mustat._masking.functional_key`)."""
        return M.functional_key(self.path.rpartition(".")[0], self.module, self.attr)


@dataclass(frozen=True, eq=False)
class Entry:
    """A tensor of the model: its (first) name, every place it is used, and its trainable leaf
    (``None`` when a parametrization mustat cannot see through computes it)."""

    name: str
    slots: tuple[Slot, ...]
    leaf: nn.Parameter | None

    @property
    def module(self) -> nn.Module:
        return self.slots[0].module

    @property
    def attr(self) -> str:
        return self.slots[0].attr

    @property
    def frozen(self) -> bool:
        """Not trained (``requires_grad=False``), as when fine-tuning part of a model."""
        return self.leaf is not None and not self.leaf.requires_grad

    @property
    def tied(self) -> bool:
        return len(self.slots) > 1

    @cached_property
    def _places(self) -> tuple[Slot, ...]:
        seen, out = set(), []
        for s in self.slots:
            if (id(s.module), s.attr) not in seen:
                seen.add((id(s.module), s.attr))
                out.append(s)
        return tuple(out)

    def places(self) -> tuple[Slot, ...]:
        """The distinct ``(module, attr)`` places (a shared module's paths count once)."""
        return self._places

    def mask(self) -> Tensor | None:
        """The tensor's keep-mask (nonzero = kept): every place's mask combined, so a mask put on
        any one use (torch.nn.utils.prune on a tied head, say) is the tensor's; None if none."""
        masks = [m for m in (M.find_mask(s.module, s.attr) for s in self.places()) if m is not None]
        if not masks:
            return None
        out = masks[0]
        for m in masks[1:]:
            out = out * m.to(out)
        return out

    def source(self) -> tuple[Tensor, Tensor | None]:
        """The tensor holding the values (the leaf, detached) and the mask to apply to it; no data
        is touched for a tensor used in one place."""
        values = self.leaf.detach() if self.leaf is not None else getattr(self.module, self.attr).detach()
        return values, self.mask()

    def effective(self) -> Tensor:
        """The values the model computes with (masks applied), detached."""
        values, mask = self.source()
        return values if mask is None else values * mask.to(values.dtype)


def _internal(module: nn.Module) -> set[int]:
    """Ids of the modules inside ``module``'s parametrizations (not part of the model proper)."""
    if not parametrize.is_parametrized(module):
        return set()
    return {id(m) for m in module.parametrizations.modules()}


def entries(model: nn.Module) -> dict[str, Entry]:
    """Every tensor of ``model`` by first name, in module order (see the module notes)."""
    groups: dict[int, list[Slot]] = {}
    leaves: dict[int, nn.Parameter | None] = {}
    skip: set[int] = set()
    seen: set[tuple[int, str]] = set()
    for path, module in model.named_modules(remove_duplicate=False):
        if id(module) in skip:
            continue
        skip |= _internal(module)
        attrs = [a for a, p in module._parameters.items() if p is not None]
        if parametrize.is_parametrized(module):
            attrs += list(module.parametrizations)
        pruned = {h._tensor_name for h in module._forward_pre_hooks.values()
                  if isinstance(h, M.torch_prune.BasePruningMethod)}
        attrs = [a for a in attrs if not (a.endswith("_orig") and a[:-5] in pruned)] + sorted(pruned)
        for attr in dict.fromkeys(attrs):
            leaf = M.leaf(module, attr)
            if leaf is not None:
                ident = id(leaf)
            elif parametrize.is_parametrized(module, attr):  # computed by a foreign parametrization
                ident = id(module.parametrizations[attr])
            else:
                continue
            slot = Slot(f"{path}.{attr}" if path else attr, module, attr)
            if (id(module), attr) in seen:  # a shared module seen again under another path
                groups[ident].append(slot)
                continue
            seen.add((id(module), attr))
            groups.setdefault(ident, []).append(slot)
            leaves[ident] = leaf
    return {slots[0].path: Entry(slots[0].path, tuple(slots), leaves[ident]) for ident, slots in groups.items()}


def _aliases(table: dict[str, Entry]) -> dict[str, str]:
    return {s.path: e.name for e in table.values() for s in e.slots}


def _unknown(name: str, table: dict[str, Entry]) -> ValueError:
    valid = list(table)
    shown = ", ".join(valid[:20]) + (", ..." if len(valid) > 20 else "")
    return ValueError(f"{name!r} is not a parameter of the model; valid names: {shown}")


def entry(model: nn.Module, name: str, table: dict[str, Entry] | None = None) -> Entry:
    """The :class:`Entry` called ``name`` (any of a tied tensor's names); ValueError if none."""
    table = entries(model) if table is None else table
    first = _aliases(table).get(name)
    if first is None:
        raise _unknown(name, table)
    return table[first]


def resolve(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(module, attr)`` of the tensor called ``name`` (its first place); ValueError if there is none."""
    e = entry(model, name)
    return e.module, e.attr


def default_names(model: nn.Module, table: dict[str, Entry] | None = None) -> list[str]:
    """Every trainable weight :func:`prunable` by default, in module order (a tied weight once,
    under its first name). Frozen tensors (``requires_grad=False``) are left out: training does
    not move them, so nothing can retrain around their pruning and the trajectory estimators
    cannot measure them; name them in ``params=`` to prune them."""
    table = entries(model) if table is None else table
    return [e.name for e in table.values() if not e.frozen and any(prunable(s.module, s.attr) for s in e.slots)]


def all_names(model: nn.Module) -> list[str]:
    """Every tensor's name (first names; masked weights under their plain name)."""
    return list(entries(model))


def trainable_names(model: nn.Module) -> list[str]:
    """Every tensor training moves (not frozen, and one mustat can address)."""
    return [e.name for e in entries(model).values() if e.leaf is not None and not e.frozen]


def masked_names(model: nn.Module, table: dict[str, Entry] | None = None) -> list[str]:
    """Names of every tensor carrying a mask (mustat's, torch.nn.utils.prune's or torch.ao's)."""
    table = entries(model) if table is None else table
    return [e.name for e in table.values() if e.mask() is not None]


def mask_of(model: nn.Module, name: str) -> Tensor | None:
    """The keep-mask of the tensor called ``name`` (nonzero = kept), or None."""
    return entry(model, name).mask()


def install_mask(model: nn.Module, name: str, keep: Tensor, table: dict[str, Entry] | None = None) -> None:
    """Install (or tighten, in place) the mask of ``name`` on every place the tensor is used."""
    for s in entry(model, name, table).places():
        M.set_mask(s.module, s.attr, keep)


def select(model: nn.Module, params: Iterable[str] | None, argname: str = "params") -> list[str]:
    """Validate a user's list of names (returning first names, each once), or return the
    default prunable set.

    The default includes tensors that already carry a mask, so a model pruned with a
    custom ``params`` list is still reported in full.
    """
    table = entries(model)
    if params is None:
        names = list(dict.fromkeys(default_names(model, table) + masked_names(model, table)))
        if not names:
            raise ValueError(
                "the model has nothing to prune: no trainable Linear, convolution, recurrent or attention weights; "
                f"pass {argname}=[...] with parameter names from model.named_parameters()"
            )
        return names
    if isinstance(params, str):
        raise TypeError(f"{argname} must be a list of parameter names, got the string {params!r}")
    names = list(params)
    if not names:
        raise ValueError(f"{argname} is empty; give at least one parameter name")
    return list(dict.fromkeys(entry(model, n, table).name for n in names))
