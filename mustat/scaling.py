"""The scale-invariance experiment: does a criterion pick the same weights when one hidden
layer is rescaled in a way that leaves the network's function unchanged?

In a ReLU network, multiplying layer ``k``'s weight and bias by ``c > 0`` and dividing
layer ``k+1``'s weight by ``c`` computes the same function (ReLU is positively
homogeneous). Magnitude pruning ranks ``|w|``, so global ranking moves the pruning into
whichever layer got smaller. A Wald statistic ``|w| / se(w)`` is unchanged *if* the
standard error scales with its parameter, as a sampling SE of the estimate does (a
sandwich or curvature SE measured at the rescaled point: gradients with respect to layer
``k`` scale by ``1/c``, curvature by ``1/c^2``, the SE by ``c``). Whether a
trajectory-based SE does is the question, so every estimator tracks **after** the
rescaling, in the new coordinates, for ``track_epochs`` epochs of continued training
(rescaling a tracker's replicates by hand would make any SE invariant by construction,
which tests nothing).

Two modes: ``"after"`` rescales the trained network (the clean test of invariance);
``"init"`` rescales the *initialisation* and trains from there, where a user meets the
problem (layers at different scales). Each ``(seed, c)`` is pruned one-shot, globally,
to ``sparsity`` with no per-tensor cap and no retraining, so the accuracy reflects the
ranking alone.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from mustat._checks import check_option, check_scalar
from mustat._io import atomic_write
from mustat.config import TrainConfig
from mustat.criteria import get_criterion, label, parse_label
from mustat.data import load
from mustat.models import build, loss_fn
from mustat.pipeline import criterion_scores
from mustat.pruning import LayerCollapseWarning, prune
from mustat.training import evaluate, seeded, steps_per_epoch, train_epochs
from mustat.uncertainty import FitContext, make_estimator

MODES = ("after", "init")


def rescale(model: nn.Module, layer: str, next_layer: str, c: float) -> nn.Module:
    """In place: ``layer``'s weight and bias times ``c``, ``next_layer``'s weight divided by ``c``
    (submodule names, e.g. ``"1"`` and ``"3"``). Function-preserving when only a positively
    homogeneous activation (ReLU) lies between them. Returns ``model``."""
    check_scalar(c, "c", low=0.0, closed="neither")
    first, second = model.get_submodule(layer), model.get_submodule(next_layer)
    with torch.no_grad():
        first.weight.mul_(c)
        if first.bias is not None:
            first.bias.mul_(c)
        second.weight.div_(c)
    return model


def scale_experiment(
    *,
    dataset: str = "digits",
    model: str = "mlp",
    layer: str = "1",
    next_layer: str = "3",
    cs: Sequence[float] = (0.1, 0.3, 1.0, 3.0, 10.0),
    labels: Sequence[str] | None = None,
    sparsity: float = 0.95,
    mode: str = "after",
    track_epochs: int = 10,
    config: TrainConfig | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    out: str | Path | None = None,
) -> pd.DataFrame:
    """Run the experiment (module notes); one row per seed, ``c`` and criterion label with the
    test accuracy after pruning, the fraction of ``layer`` pruned, and ``output_change``, the
    largest absolute change of the test logits caused by the rescaling itself (the function
    check). Written atomically to ``out/scale-<mode>.csv`` when ``out`` is given."""
    config = config or TrainConfig(epochs=30)
    check_option(mode, "mode", MODES)
    check_scalar(sparsity, "sparsity", low=0.0, high=1.0, closed="neither")
    pairs = [parse_label(lab) for lab in labels]
    for crit, _ in pairs:
        get_criterion(crit)
    rows = []
    for seed in seeds:
        data = load(dataset, seed=seed)
        n_out = data.n_classes or 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            base = build(model, data.input_shape, n_out)
        gen = torch.Generator().manual_seed(seed)
        if mode == "after":
            with seeded(base, seed):
                train_epochs(base, config.make_optimizer(base.parameters()), (data.X_train, data.y_train),
                             epochs=config.epochs, batch_size=config.batch_size, sampler=config.sampler, generator=gen)
        for c in cs:
            net = rescale(copy.deepcopy(base), layer, next_layer, c)
            with torch.no_grad():
                change = float((net.eval()(data.X_test) - base.eval()(data.X_test)).abs().max())
            net.train()
            g = torch.Generator().manual_seed(seed * 1000 + 1)
            if mode == "init":
                with seeded(net, seed):
                    train_epochs(net, config.make_optimizer(net.parameters()), (data.X_train, data.y_train),
                                 epochs=config.epochs, batch_size=config.batch_size, sampler=config.sampler, generator=g)
            rows += _track_and_prune(net, data, config, pairs, track_epochs, sparsity, layer, g,
                                     dict(seed=seed, c=c, mode=mode, output_change=change))
    df = pd.DataFrame(rows)
    if out is not None:
        atomic_write(Path(out) / f"scale-{mode}.csv", lambda p: df.to_csv(p, index=False))
    return df


def _track_and_prune(net, data, config: TrainConfig, pairs, track_epochs, sparsity, layer, gen, info) -> list[dict]:
    """Train ``track_epochs`` more epochs with every trajectory estimator attached, then prune a
    copy by each criterion and evaluate it."""
    opt = config.make_optimizer(net.parameters())
    setup = replace(config.setup(len(data.y_train)),
                    window_steps=track_epochs * steps_per_epoch(len(data.y_train), config.batch_size))
    ests = {}
    for _, se in pairs:
        if se is not None and se not in ests:
            ests[se] = make_estimator(se, net, setup=setup)
    with seeded(net, info["seed"] * 1000 + 1):
        train_epochs(net, opt, (data.X_train, data.y_train), epochs=track_epochs, batch_size=config.batch_size,
                     sampler=config.sampler, generator=gen, estimators=list(ests.values()))
    context = FitContext(X=data.X_train, y=data.y_train, loss=lambda o, t: loss_fn(net, o, t), optimizer=opt,
                         batch_size=config.batch_size, weight_decay=config.weight_decay)
    for est in ests.values():
        est.fit(context)
    rows = []
    for crit, se in pairs:
        pruned = copy.deepcopy(net)
        scores = criterion_scores(pruned, crit, data, estimator=ests[se] if se is not None else None,
                                  seed=info["seed"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LayerCollapseWarning)  # collapse is what this measures
            report = prune(pruned, scores, sparsity=sparsity)
        frame = report.to_frame().set_index("tensor")
        acc, _ = evaluate(pruned, (data.X_test, data.y_test))
        rows.append(dict(info, label=label(crit, se), sparsity=sparsity, test_accuracy=acc,
                         layer_pruned=float(frame.loc[f"{layer}.weight", "sparsity"])
                         if f"{layer}.weight" in frame.index else np.nan))
    return rows


def plot(df: pd.DataFrame, path: str | Path) -> Path:
    """Save :func:`figure` as a PNG at ``path`` (atomically); returns the path."""
    import matplotlib.pyplot as plt

    fig = figure(df)
    path = Path(path)
    atomic_write(path, lambda t: fig.savefig(t, format="png", dpi=110))
    plt.close(fig)
    return path


def figure(df: pd.DataFrame):
    """Accuracy after pruning against ``c`` (log scale), one line per criterion, 95% CI over seeds."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import seaborn as sns

    modes = list(dict.fromkeys(df["mode"]))
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 3.8), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sns.lineplot(data=df[df["mode"] == mode], x="c", y="test_accuracy", hue="label", marker="o",
                     errorbar=("ci", 95), seed=0, ax=ax)  # seeded bootstrap: the same bands on a redraw
        ax.set(xscale="log", xlabel="c (hidden layer rescaled by c, the next by 1/c)", ylabel="test accuracy",
               title=f"rescaled {'after training' if mode == 'after' else 'at initialisation'}")
        ax.legend(fontsize="small")
    fig.suptitle("Scale invariance: accuracy after pruning when a hidden layer is rescaled (function unchanged); "
                 "95% CI over seeds", fontsize=10)
    fig.tight_layout()
    return fig
