"""mustat: magnitude-and-uncertainty (M&U) pruning with calibrated statistics.

The public names below are imported on first use (PEP 562), not when the package is: the
``mustat`` command imports this package before it parses anything, and importing torch and the
registries up front cost seconds on every ``mustat --help``. ``from mustat import prune`` and
``mustat.prune`` work as before; so does ``mustat.<submodule>`` without importing it first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mustat._version import __version__

if TYPE_CHECKING:  # the same names, for type checkers and readers; _HOMES is what runs
    from mustat._functional import FunctionalModel
    from mustat.criteria import CRITERIA, Criterion, loss_gradient, register_criterion, score
    from mustat.layerwise import OneShotReport, oneshot
    from mustat.patterns import check_pattern
    from mustat.pruning import (
        LayerCollapseWarning,
        PruningReport,
        Scope,
        ScoreScaleWarning,
        finalize,
        from_torch_prune,
        load_pruned_state_dict,
        prune,
        sparsity,
        to_torch_prune,
    )
    from mustat.sparse import load_sparse, save_sparse, sparse_inference
    from mustat.stats import WaldResults, prune_fdr, pvalues, wald, zvalues
    from mustat.structured import prune_channels, prune_channels_fdr, unit_statistics
    from mustat.uncertainty import (
        ESTIMATORS,
        DegenerateSEWarning,
        Estimator,
        FitContext,
        Marginal,
        PseudoBootstrap,
        TrainingSetup,
        Window,
        WindowWarning,
        hessian_se,
        make_estimator,
        newton_recentre,
        register_estimator,
    )

#: the module that defines each public name (tests/test_cli_startup.py checks it against the
#: imports above and against __all__)
_HOMES: dict[str, str] = {
    "FunctionalModel": "mustat._functional",
    **dict.fromkeys(["CRITERIA", "Criterion", "loss_gradient", "register_criterion", "score"], "mustat.criteria"),
    **dict.fromkeys(["OneShotReport", "oneshot"], "mustat.layerwise"),
    "check_pattern": "mustat.patterns",
    **dict.fromkeys(["LayerCollapseWarning", "PruningReport", "Scope", "ScoreScaleWarning", "finalize",
                     "from_torch_prune", "load_pruned_state_dict", "prune", "sparsity", "to_torch_prune"],
                    "mustat.pruning"),
    **dict.fromkeys(["load_sparse", "save_sparse", "sparse_inference"], "mustat.sparse"),
    **dict.fromkeys(["WaldResults", "prune_fdr", "pvalues", "wald", "zvalues"], "mustat.stats"),
    **dict.fromkeys(["prune_channels", "prune_channels_fdr", "unit_statistics"], "mustat.structured"),
    **dict.fromkeys(["ESTIMATORS", "DegenerateSEWarning", "Estimator", "FitContext", "Marginal", "PseudoBootstrap",
                     "TrainingSetup", "Window", "WindowWarning", "hessian_se", "make_estimator",
                     "newton_recentre", "register_estimator"], "mustat.uncertainty"),
}

__all__ = [
    "__version__",
    "CRITERIA",
    "ESTIMATORS",
    "Criterion",
    "DegenerateSEWarning",
    "Estimator",
    "FitContext",
    "FunctionalModel",
    "LayerCollapseWarning",
    "Marginal",
    "OneShotReport",
    "PruningReport",
    "PseudoBootstrap",
    "Scope",
    "ScoreScaleWarning",
    "WaldResults",
    "Window",
    "WindowWarning",
    "TrainingSetup",
    "check_pattern",
    "finalize",
    "from_torch_prune",
    "hessian_se",
    "load_pruned_state_dict",
    "load_sparse",
    "loss_gradient",
    "make_estimator",
    "newton_recentre",
    "oneshot",
    "prune",
    "prune_channels",
    "prune_channels_fdr",
    "prune_fdr",
    "pvalues",
    "register_criterion",
    "register_estimator",
    "save_sparse",
    "score",
    "sparse_inference",
    "sparsity",
    "to_torch_prune",
    "unit_statistics",
    "wald",
    "zvalues",
]


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use and kept here after; else a
    submodule (``mustat.models``), imported now as ``import mustat.models`` would."""
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(importlib.import_module(home), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":  # the submodule exists but something it imports does not
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}; its public names are listed in "
                         "mustat.__all__")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
