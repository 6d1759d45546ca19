"""Masks on one tensor of one module, whichever mechanism put them there.

mustat's own mask is a ``torch.nn.utils.parametrize`` parametrization. Why parametrize
rather than ``torch.nn.utils.prune``: ``prune`` stores the effective weight as a plain
non-leaf tensor attribute, which makes ``copy.deepcopy`` of a pruned model fail (a
long-standing PyTorch complaint), while a parametrization recomputes ``module.weight`` on
access, moves with ``.to()``, and keeps its mask as a buffer in the ``state_dict``
(``<module>.parametrizations.weight.0.mask``). Registering it keeps the very same
``Parameter`` object as ``parametrizations.weight.original``, so an optimizer created before
pruning keeps training the right tensor. The gradient reaching masked entries is exactly
zero, so the effective weight stays zero whatever the optimizer does to ``original``.

Two foreign mechanisms are recognised too, so a model pruned elsewhere can be scored,
pruned further, reported and saved: ``torch.nn.utils.prune`` (an ``<attr>_orig`` parameter,
an ``<attr>_mask`` buffer and a forward pre-hook) and ``torch.ao.pruning``'s ``FakeSparsity``
parametrization (a ``mask`` buffer). Pruning a tensor further tightens the mask of the
mechanism already there. :func:`to_torch_prune` and :func:`from_torch_prune` convert.

Everything here acts on one ``(module, attr)`` location; tied tensors (one parameter in
several places) are handled a level up, in :mod:`mustat._params`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune


class WeightMask(nn.Module):
    """Parametrization ``w -> w * mask`` with the mask (0/1, the weight's dtype) as a buffer."""

    def __init__(self, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask


def _is_mask_parametrization(p: nn.Module) -> bool:
    """mustat's mask, or torch.ao.pruning's ``FakeSparsity`` (``w * mask``, a ``mask`` buffer)."""
    return isinstance(p, WeightMask) or (type(p).__name__ == "FakeSparsity" and isinstance(getattr(p, "mask", None), Tensor))


def prune_hook(module: nn.Module, attr: str) -> torch_prune.BasePruningMethod | None:
    """The ``torch.nn.utils.prune`` forward pre-hook that computes ``module.<attr>``, or None."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, torch_prune.BasePruningMethod) and hook._tensor_name == attr:
            return hook
    return None


def kind(module: nn.Module, attr: str) -> str:
    """How ``module.<attr>`` is stored: ``"plain"`` (a parameter), ``"masked"`` (a mask
    parametrization: mustat's or torch.ao's), ``"torch-prune"``, or ``"other"`` (a
    parametrization mustat cannot see through, such as weight norm)."""
    if attr in module._parameters:
        return "plain"
    if parametrize.is_parametrized(module, attr):
        plist = module.parametrizations[attr]
        ok = hasattr(plist, "original") and all(_is_mask_parametrization(p) for p in plist)
        return "masked" if ok else "other"
    if prune_hook(module, attr) is not None and f"{attr}_orig" in module._parameters:
        return "torch-prune"
    return "other"


def find_mask(module: nn.Module, attr: str) -> Tensor | None:
    """The keep-mask of ``module.<attr>`` (nonzero = kept), from any recognised mechanism, or None.

    Several mask parametrizations on one tensor (unusual) are combined into one mask."""
    k = kind(module, attr)
    if k == "torch-prune":
        return getattr(module, f"{attr}_mask")
    if k == "masked":
        masks = [p.mask for p in module.parametrizations[attr]]
        out = masks[0]
        for m in masks[1:]:
            out = out * m
        return out
    return None


def leaf(module: nn.Module, attr: str) -> nn.Parameter | None:
    """The trainable leaf behind ``module.<attr>``: the parameter, the ``original`` under a
    mask parametrization, or torch prune's ``<attr>_orig``; None under other parametrizations."""
    k = kind(module, attr)
    if k == "plain":
        return module._parameters[attr]
    if k == "masked":
        return module.parametrizations[attr].original
    if k == "torch-prune":
        return module._parameters[f"{attr}_orig"]
    return None


def functional_key(path: str, module: nn.Module, attr: str) -> str | None:
    """The ``state_dict``-style key under which ``torch.func.functional_call`` replaces the
    leaf of ``module.<attr>`` (its mask, if any, is then applied by the module as usual)."""
    prefix = f"{path}." if path else ""
    k = kind(module, attr)
    if k == "plain":
        return f"{prefix}{attr}"
    if k == "masked":
        return f"{prefix}parametrizations.{attr}.original"
    if k == "torch-prune":
        return f"{prefix}{attr}_orig"
    return None


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own.

    ``parametrize`` keeps its properties on a class made at registration, and
    ``copy.deepcopy`` shares that class between the original and the copy; adding
    or removing a parametrization edits the class, so finalizing a deep copy
    would otherwise delete ``weight`` from the original too.
    """
    cls = module.__class__
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


def set_mask(module: nn.Module, attr: str, keep: Tensor) -> None:
    """Install or tighten the mask on ``module.<attr>`` (in place when one exists)."""
    k = kind(module, attr)
    if k == "other":
        raise ValueError(f"{type(module).__name__}.{attr} is computed by a parametrization mustat cannot mask "
                         "(not a plain parameter, a mask, or torch.nn.utils.prune); remove it first")
    if k == "torch-prune":
        mask = getattr(module, f"{attr}_mask")
        mask.copy_(keep.to(mask))
        with torch.no_grad():  # the pre-hook recomputes it at the next forward; make it current now
            setattr(module, attr, module._parameters[f"{attr}_orig"] * mask)
        return
    if k == "masked":
        masks = [p.mask for p in module.parametrizations[attr]]
        masks[0].copy_(keep.to(masks[0]))
        for m in masks[1:]:  # one mask carries the pattern; the others keep nothing extra
            m.fill_(1)
        return
    ref = getattr(module, attr)
    if parametrize.is_parametrized(module):
        _own_class(module)
    parametrize.register_parametrization(module, attr, WeightMask(keep.to(device=ref.device, dtype=ref.dtype)))


def strip_mask(module: nn.Module, attr: str) -> None:
    """Remove any recognised mask from ``module.<attr>`` *without* applying it: the plain leaf
    parameter (the same object, its unmasked values) is put back. :func:`mustat.finalize`
    then zeroes the masked entries once, for a tensor used in several places."""
    k = kind(module, attr)
    if k == "masked":
        _own_class(module)
        parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
    elif k == "torch-prune":
        param = module._parameters[f"{attr}_orig"]
        hook = prune_hook(module, attr)
        for key, h in list(module._forward_pre_hooks.items()):
            if h is hook:
                del module._forward_pre_hooks[key]
        del module._parameters[f"{attr}_orig"]
        del module._buffers[f"{attr}_mask"]
        if attr in module.__dict__:
            delattr(module, attr)
        module.register_parameter(attr, param)


def to_torch_prune(module: nn.Module, attr: str) -> None:
    """Move a mask parametrization on ``module.<attr>`` to ``torch.nn.utils.prune``'s layout
    (``<attr>_orig`` holding the same values, ``<attr>_mask``, a pre-hook). The parameter
    object is kept, so an optimizer over it keeps training it."""
    if kind(module, attr) != "masked":
        return
    keep = find_mask(module, attr).detach().clone()
    _own_class(module)
    parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
    torch_prune.custom_from_mask(module, attr, keep)


def from_torch_prune(module: nn.Module, attr: str) -> None:
    """Move a ``torch.nn.utils.prune`` or ``torch.ao.pruning`` mask on ``module.<attr>`` to a
    mustat mask, keeping the unmasked values and the parameter object."""
    k = kind(module, attr)
    if k == "torch-prune" or (k == "masked" and not all(isinstance(p, WeightMask) for p in module.parametrizations[attr])):
        keep = find_mask(module, attr).detach().clone()
        strip_mask(module, attr)
        set_mask(module, attr, keep)
