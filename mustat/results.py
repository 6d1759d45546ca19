"""A run's tidy results: their columns, the table the CLI prints, and the figure.

Everything here reads the results table (``results.csv``), never the models, so a
figure can be redrawn from the file alone.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mustat._io import atomic_write

RESULT_COLUMNS = ["label", "criterion", "se", "scope", "seed", "round", "target_sparsity", "sparsity",
                  "compression_ratio", "flop_speedup", "empty_tensors", "test_accuracy", "test_loss", "val_accuracy",
                  "se_ok"]


def metric(results: pd.DataFrame) -> str:
    """The column a table reports: test accuracy, or test loss for regression (NaN accuracy)."""
    return "test_loss" if results["test_accuracy"].isna().all() else "test_accuracy"


def table(results: pd.DataFrame) -> pd.DataFrame:
    """The :func:`metric`, mean ± sd over seeds: rows = target sparsity, columns = runs and the dense baseline."""
    col = metric(results)
    pruned = results[results["label"] != "dense"]
    dense = results[results["label"] == "dense"][col]

    def fmt(x):
        return f"{x.mean():.3f}" if len(x) == 1 else f"{x.mean():.3f} ± {x.std(ddof=1):.3f}"

    t = pruned.pivot_table(index="target_sparsity", columns="label", values=col, aggfunc=fmt, sort=False)
    t = t[[c for c in dict.fromkeys(pruned["label"])]]
    t["dense"] = fmt(dense)
    t.index.name = "sparsity"
    t.columns.name = None
    return t


def plot(results: pd.DataFrame, path: Path, *, title: str = "", chance: float | None = None) -> Path:
    """Save :func:`figure` as a PNG at ``path`` (atomically); returns the path."""
    import matplotlib.pyplot as plt

    fig = figure(results, title=title, chance=chance)
    atomic_write(path, lambda t: fig.savefig(t, format="png", dpi=120))
    plt.close(fig)
    return path


def figure(results: pd.DataFrame, *, title: str = "", chance: float | None = None):
    """The :func:`metric` against sparsity by run, one line per criterion (mean, band: sd over
    seeds; seaborn, from the tidy results), the dense model and chance as reference lines.

    The x axis is the compression ratio ``1 / (1 - sparsity)`` on a log scale, labelled with
    the sparsity: the high sparsities that matter (0.9375, 0.95, 0.98) sit apart there, where
    a linear sparsity axis crowds them together."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import seaborn as sns

    col = metric(results)
    pruned = results[results["label"] != "dense"].assign(compression=lambda d: 1 / (1 - d["target_sparsity"]))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    sns.lineplot(data=pruned, x="compression", y=col, hue="label", marker="o", errorbar="sd", ax=ax)
    dense = results.loc[results["label"] == "dense", col].mean()
    ax.axhline(dense, color="grey", ls="--", lw=1, label="dense")
    if chance is not None and col == "test_accuracy":
        ax.axhline(chance, color="black", ls=":", lw=1, label=f"chance ({chance:.2f})")
    targets = sorted(pruned["target_sparsity"].unique())
    ax.set_xscale("log")
    ax.set_xticks([1 / (1 - s) for s in targets])
    ax.set_xticklabels([f"{s:g}" for s in targets], rotation=45 if len(targets) > 5 else 0)
    ax.minorticks_off()
    ax.set(xlabel="sparsity (fraction of weights pruned; log compression-ratio scale)", ylabel=col.replace("_", " "),
           title=title or f"{col.replace('_', ' ')} against sparsity by criterion (mean ± sd over seeds)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def title(dataset: str, model: str, scope: str, seeds) -> str:
    seeds = list(seeds)
    shown = ", ".join(map(str, seeds)) if len(seeds) <= 6 else f"{seeds[0]}..{seeds[-1]}"
    return f"{dataset} / {model} / {scope} scope; mean ± sd over seeds {shown}"

