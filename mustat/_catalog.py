"""What the ``mustat`` command's help lists, known without importing torch.

The registries (datasets, models, criteria, standard-error estimators) and the run defaults live
in modules that import torch, which takes seconds; ``mustat --help`` must print in well under
one. So the help reads these static copies of the built-in names and defaults, and
``tests/test_cli_startup.py`` checks that each equals its source: a new estimator, dataset or
default that is not copied here fails that test, and the message says which entry to change.
The commands themselves validate every name against the live registries after parsing, so names
that plugins register (``mustat.plugins``, ``MUSTAT_PLUGINS``) are accepted although the help
does not list them.

Only the standard library may be imported here.
"""

from __future__ import annotations

from typing import NamedTuple

#: :data:`mustat.data.DATASETS`, sorted
DATASETS = ("breast_cancer", "cifar10", "digits", "fashion_mnist", "mnist", "mnist1d", "mnist5k",
            "synthetic-linear", "synthetic-logistic", "synthetic-softmax")
#: :data:`mustat.models.MODELS`, sorted
MODELS = ("cnn1d", "glm", "lenet5", "mlp", "resnet", "torch-example", "vgg")
#: :data:`mustat.criteria.CRITERIA`, sorted
CRITERIA = ("gradient-weight", "lamp", "magnitude", "mu", "obs", "random")
#: :data:`mustat.config.DEFAULT_CRITERIA`
DEFAULT_CRITERIA = ("mu", "magnitude", "random")
#: :data:`mustat.config.DEFAULT_MAX_TENSOR_SPARSITY`
DEFAULT_MAX_TENSOR_SPARSITY = 0.99
#: :data:`mustat.config.DEFAULT_SE`: ``mustat prune``'s default estimators
DEFAULT_SE = ("pseudo", "kfac")
#: :func:`mustat.uncertainty.default_estimators` of the built-in registry (``mustat scale``'s default)
DEFAULT_ESTIMATORS = ("pseudo", "calibrated", "batch-means", "curvature")
#: the fields of ``mustat.config.TrainConfig()``
TRAIN_DEFAULTS = dict(optimizer="adam", lr=0.001, momentum=0.9, weight_decay=0.001, batch_size=64, epochs=60,
                      retrain_epochs=40, track_epochs=40, sampler="replacement")
#: :data:`mustat.structured.groups.BASELINES`: Torch-Pruning's importances
STRUCTURED_BASELINES = ("magnitude", "taylor", "lamp")
#: :data:`mustat.layerwise.solve.METHODS` and ``SCOPES``
ONESHOT_METHODS = ("magnitude", "wanda", "sparsegpt", "mu", "mu-sandwich")
ONESHOT_SCOPES = ("row", "layer", "global")
#: :data:`mustat.layerwise.solve.SIGMAS` and :data:`mustat.layerwise.allocation.ALLOCATIONS`
ONESHOT_SIGMAS = ("row", "layer", "loss")
ONESHOT_ALLOCATIONS = ("uniform", "owl")


class Role(NamedTuple):
    """One role of the standard-error estimators, a line of ``mustat prune --help``."""

    title: str
    """What the SEs of this role are for."""
    estimators: tuple[str, ...]
    """Registered names (:data:`mustat.uncertainty.ESTIMATORS`), in registration order."""
    variants: tuple[str, ...]
    """Declared variants (``Estimator.variants``) that serve this role, in registration order."""


#: The built-in estimators and variants by what their standard errors are for (docs: DESIGN's
#: "two quantities, kept apart"). The test derives the grouping from the registry: the pseudo
#: bootstrap and its variants are the paper's own statistic; every other name goes by the
#: ``quantity`` its estimator reports with the variant's options ("sampling" or "saliency"), so a
#: ``*-sandwich`` variant sits with the sampling SEs and its base with the saliency ones.
ESTIMATOR_ROLES = (
    Role("the paper's trajectory SD (of the SGD iterates)",
         ("pseudo",), ("pseudo-every10", "pseudo-ema", "pseudo-epoch", "pseudo-balanced")),
    Role("sampling SEs, for tests, intervals and FDR",
         ("calibrated", "batch-means", "bootstrap"),
         ("batch-means-balanced", "fisher-sandwich", "block-sandwich", "kfac-sandwich", "ekfac-sandwich",
          "woodfisher-sandwich", "woodfisher-row-sandwich")),
    Role("saliency SEs, for ranking (OBS: sqrt([H^-1]_qq))",
         ("curvature", "wald", "fisher", "block", "kfac", "ekfac", "woodfisher"),
         ("kfac-layer", "kfac-damped", "kfac-mc", "ekfac-layer", "woodfisher-row", "woodfisher-damped")),
)


def estimator_roles_text() -> str:
    """The ``--se`` names by role, for a help epilog: one line per role, its variants on the line
    below (a formatter that keeps line breaks wraps what is too long)."""
    lines = ["standard-error estimators (--se) by role:"]
    for role in ESTIMATOR_ROLES:
        lines.append(f"  {role.title}: {' '.join(role.estimators)}")
        if role.variants:
            lines.append(f"      variants: {' '.join(role.variants)}")
    lines.append("  estimators that plugins register are accepted too; a wrong name is refused with the list "
                 "of every registered one")
    return "\n".join(lines)
