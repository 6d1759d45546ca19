"""Naming and finding the tensors mustat tracks, scores and prunes.

A tensor is named by its module path plus attribute (``"0.weight"``,
``"features.3.weight"``); the name does not change when a mask is added, whatever
names the masking mechanism gives the underlying tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from mustat._masking import masked_names, split_name

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def default_names(model: nn.Module) -> list[str]:
    """The ``weight`` of every ``nn.Linear`` and ``nn.Conv{1,2,3}d``, in module order."""
    return [
        f"{path}.weight" if path else "weight"
        for path, module in model.named_modules()
        if isinstance(module, PRUNABLE_TYPES)
    ]


def all_names(model: nn.Module) -> list[str]:
    """Every parameter's mustat name (masked weights under their plain name)."""
    names = []
    for full, _ in model.named_parameters():
        if ".parametrizations." in full or full.startswith("parametrizations."):
            head, _, tail = full.partition("parametrizations.")
            full = head + tail.split(".")[0]
        names.append(full)
    return list(dict.fromkeys(names))


def resolve(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(module, attr)`` holding the tensor called ``name``; ValueError if there is none."""
    path, attr = split_name(name)
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        module = None
    if module is None or not hasattr(module, attr) or not isinstance(getattr(module, attr), Tensor):
        valid = all_names(model)
        shown = ", ".join(valid[:20]) + (", ..." if len(valid) > 20 else "")
        raise ValueError(f"{name!r} is not a parameter of the model; valid names: {shown}")
    return module, attr


def select(model: nn.Module, params: Iterable[str] | None, argname: str = "params") -> list[str]:
    """Validate a user's list of names, or return the default prunable set.

    The default includes tensors that already carry a mask, so a model pruned
    with a custom ``params`` list is still reported in full.
    """
    if params is None:
        names = list(dict.fromkeys(default_names(model) + masked_names(model)))
        if not names:
            raise ValueError(
                "the model has nothing to prune: no nn.Linear or nn.Conv{1,2,3}d weights; "
                f"pass {argname}=[...] with parameter names from model.named_parameters()"
            )
        return names
    if isinstance(params, str):
        raise TypeError(f"{argname} must be a list of parameter names, got the string {params!r}")
    names = list(dict.fromkeys(params))
    if not names:
        raise ValueError(f"{argname} is empty; give at least one parameter name")
    for n in names:
        resolve(model, n)
    return names
