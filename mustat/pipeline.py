"""The main job: train, prune by each criterion, retrain, report.

Everything a run needs is in its folder: ``params.json`` (every setting, the
seeds, versions), ``results.csv`` (tidy), ``accuracy_vs_sparsity.png`` (drawn
from the CSV) and ``checkpoints/`` (one per seed and criterion, rewritten
atomically after every round), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import platform
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import mustat
from mustat._checks import check_option
from mustat._io import atomic_write, write_json
from mustat.criteria import CRITERIA
from mustat.data import load
from mustat.pruning import Scope
from mustat.training import (
    PruneConfig,
    TrainConfig,
    dense_phase,
    prune_phase,
    resolve_device,
    schedule,
)

RESULT_COLUMNS = ["criterion", "scope", "seed", "round", "target_sparsity", "sparsity", "compression_ratio",
                  "test_accuracy", "test_loss", "val_accuracy"]


def run_id(params: dict) -> str:
    """A short id derived from the settings (so equal settings share a folder)."""
    return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def run(
    *,
    dataset: str = "digits",
    data_dir: str | None = None,
    model: str = "mlp",
    criteria: Sequence[str] = ("mu", "mu-calibrated", "magnitude", "random"),
    scope: str = "global",
    schedule_kind: str = "geometric",
    target_sparsity: float = 0.95,
    rounds: int = 5,
    seeds: Sequence[int] = (0,),
    config: TrainConfig | None = None,
    device: str = "auto",
    out: str | Path | None = None,
    quiet: bool = False,
    on_round: Callable[[dict], None] | None = None,
) -> pd.DataFrame:
    """Run the pipeline for every seed and criterion; returns the tidy results
    (``results.attrs["out"]`` is the run folder).

    Raises ``ValueError`` for unknown names (listing the valid ones), and when
    ``out`` already holds a run with different settings.
    """
    config = config or TrainConfig()
    for c in criteria:
        check_option(c, "criterion", sorted(CRITERIA))
    check_option(scope, "scope", Scope)
    check_option(dataset, "dataset", mustat.data.DATASETS)
    check_option(model, "model", mustat.models.MODELS)
    targets = schedule(schedule_kind, target_sparsity, rounds)
    calibrated = any(CRITERIA[c].se_kind == "calibrated" for c in criteria)
    if calibrated and config.sampler != "replacement":
        warnings.warn(
            "calibrated standard errors assume minibatches drawn with replacement; with "
            f"sampler={config.sampler!r} they are biased (use --sampler replacement)",
            stacklevel=2,
        )
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed")
    dev = resolve_device(device)
    params = dict(dataset=dataset, data_dir=str(data_dir) if data_dir else None, model=model, criteria=list(criteria),
                  scope=scope, schedule=schedule_kind, target_sparsity=target_sparsity, rounds=rounds,
                  seeds=list(seeds), device=dev.type, train=asdict(config), targets=targets)
    out = Path(out) if out is not None else Path("runs") / run_id(params)
    _claim(out, params)

    total = len(seeds) * (config.epochs + len(criteria) * len(targets) * config.retrain_epochs)
    bar = tqdm(total=total, desc="mustat prune", unit="epoch", disable=quiet)
    rows = []
    ckpt = out / "checkpoints"
    for seed in seeds:
        data = load(dataset, data_dir=data_dir, seed=seed).to(dev)
        dense_path = ckpt / f"seed{seed}-dense.pt"
        if dense_path.exists():
            dense = torch.load(dense_path, map_location=dev)
            bar.update(config.epochs)
        else:
            state, row = dense_phase(model, data, config, seed=seed, progress=bar, grad_moment=calibrated)
            dense = dict(state, dense_row=row)
            atomic_write(dense_path, lambda t, s=dense: torch.save(s, t))
        rows.append(dense["dense_row"])
        for crit in criteria:
            path = ckpt / f"seed{seed}-{crit}.pt"
            start = torch.load(path, map_location=dev) if path.exists() else dict(dense, rows=[])
            bar.update(start["round"] * config.retrain_epochs)
            prune = PruneConfig(crit, scope, schedule_kind, target_sparsity, rounds)
            rows += prune_phase(model, data, config, prune, start, seed=seed, checkpoint=path,
                                progress=bar, on_round=on_round)
            _write_results(out, rows)
    bar.close()
    results = _write_results(out, rows)
    plot(results, out / "accuracy_vs_sparsity.png")
    results.attrs["out"] = str(out)
    return results


def _claim(out: Path, params: dict) -> None:
    """Write params.json, or check that an existing run folder has the same settings."""
    path = out / "params.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("settings") != json.loads(json.dumps(params)):
            raise ValueError(f"{out} holds a run with other settings (see {path}); choose another --out or delete it")
        return
    versions = dict(mustat=mustat.__version__, torch=torch.__version__, numpy=np.__version__,
                    pandas=pd.__version__, python=platform.python_version())
    write_json(path, dict(settings=params, versions=versions))


def _write_results(out: Path, rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    atomic_write(out / "results.csv", lambda t: df.to_csv(t, index=False))
    return df


def table(results: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy, mean ± sd over seeds: rows = target sparsity, columns = criteria and the dense baseline."""
    pruned = results[results["criterion"] != "dense"]
    dense = results[results["criterion"] == "dense"]["test_accuracy"]

    def fmt(x):
        return f"{x.mean():.3f}" if len(x) == 1 else f"{x.mean():.3f} ± {x.std(ddof=1):.3f}"

    t = pruned.pivot_table(index="target_sparsity", columns="criterion", values="test_accuracy", aggfunc=fmt, sort=False)
    t = t[[c for c in dict.fromkeys(pruned["criterion"])]]
    t["dense"] = fmt(dense)
    t.index.name = "sparsity"
    return t


def plot(results: pd.DataFrame, path: Path) -> Path:
    """Accuracy against sparsity by criterion (seaborn, from the tidy results)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import seaborn as sns

    pruned = results[results["criterion"] != "dense"]
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(data=pruned, x="sparsity", y="test_accuracy", hue="criterion", marker="o", errorbar="sd", ax=ax)
    dense = results.loc[results["criterion"] == "dense", "test_accuracy"].mean()
    ax.axhline(dense, color="grey", ls="--", lw=1, label="dense")
    ax.set(xlabel="sparsity (fraction of weights pruned)", ylabel="test accuracy")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda t: fig.savefig(t, format="png", dpi=120))
    plt.close(fig)
    return path
