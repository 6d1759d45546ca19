"""The masking mechanism: a ``torch.nn.utils.parametrize`` parametrization.

Why parametrize rather than ``torch.nn.utils.prune``: ``prune`` stores the
effective weight as a plain non-leaf tensor attribute, which makes
``copy.deepcopy`` of a pruned model fail (a long-standing PyTorch complaint),
while a parametrization recomputes ``module.weight`` on access, deep-copies,
moves with ``.to()``, and keeps its mask as a buffer in the ``state_dict``
(``<module>.parametrizations.weight.0.mask``). Registering it keeps the very
same ``Parameter`` object as ``parametrizations.weight.original``, so an
optimizer created before pruning keeps training the right tensor. The gradient
reaching masked entries is exactly zero, so the effective weight stays zero
whatever the optimizer does to ``original`` (momentum, Adam, weight decay).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils import parametrize


class WeightMask(nn.Module):
    """Parametrization ``w -> w * mask`` with the mask (0/1, the weight's dtype) as a buffer."""

    def __init__(self, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask


def split_name(name: str) -> tuple[str, str]:
    """``"features.3.weight"`` -> ``("features.3", "weight")``."""
    module_path, _, attr = name.rpartition(".")
    return module_path, attr


def find_mask(module: nn.Module, attr: str) -> WeightMask | None:
    """The mustat mask on ``module.<attr>``, or None."""
    if not parametrize.is_parametrized(module, attr):
        return None
    for p in module.parametrizations[attr]:
        if isinstance(p, WeightMask):
            return p
    return None


def source(module: nn.Module, attr: str) -> tuple[Tensor, Tensor | None]:
    """The tensor that holds ``module.<attr>``'s values and the mask to apply to it.

    For the usual cases (a plain parameter, or a parameter masked by mustat
    alone) this touches no data, so the per-step tracker update stays a few
    fused ops.
    """
    p = module._parameters.get(attr)
    if p is not None:
        return p.detach(), None
    if parametrize.is_parametrized(module, attr):
        plist = module.parametrizations[attr]
        if len(plist) == 1 and isinstance(plist[0], WeightMask):
            return plist.original.detach(), plist[0].mask
    return getattr(module, attr).detach(), None


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own.

    ``parametrize`` keeps its properties on a class made at registration, and
    ``copy.deepcopy`` shares that class between the original and the copy; adding
    or removing a parametrization edits the class, so finalizing a deep copy
    would otherwise delete ``weight`` from the original too.
    """
    cls = module.__class__
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


def leaf(module: nn.Module, attr: str) -> nn.Parameter | None:
    """The trainable leaf behind ``module.<attr>`` (the parameter, or a mustat-masked
    weight's ``original``), or None under other parametrizations."""
    p = module._parameters.get(attr)
    if p is not None:
        return p
    if parametrize.is_parametrized(module, attr):
        plist = module.parametrizations[attr]
        if len(plist) == 1 and isinstance(plist[0], WeightMask):
            return plist.original
    return None


def set_mask(module: nn.Module, attr: str, mask: Tensor) -> None:
    """Install or update the mask on ``module.<attr>`` (in place when one exists)."""
    existing = find_mask(module, attr)
    if existing is not None:
        existing.mask.copy_(mask)
        return
    ref = getattr(module, attr)
    if parametrize.is_parametrized(module):
        _own_class(module)
    parametrize.register_parametrization(
        module, attr, WeightMask(mask.to(device=ref.device, dtype=ref.dtype))
    )


def remove_mask(module: nn.Module, attr: str) -> None:
    """Make the mask permanent: ``module.<attr>`` becomes a plain zero-filled parameter."""
    _own_class(module)
    parametrize.remove_parametrizations(module, attr, leave_parametrized=True)


def masked_names(model: nn.Module) -> list[str]:
    """Names (``"<module path>.<attr>"``) of every tensor carrying a mustat mask."""
    out = []
    for path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for attr in module.parametrizations:
                if find_mask(module, attr) is not None:
                    out.append(f"{path}.{attr}" if path else attr)
    return out
