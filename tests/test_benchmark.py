"""The pruning benchmark runner: a small grid end to end, resume, stale cells, the statistics."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from torch import nn

import mustat
from mustat.benchmark import load_grid, run_benchmark, summarise
from mustat.cli import main
from mustat.models import build, flops

GRID = """
criteria = ["magnitude", "random", "gradient-weight", "mu"]
se = ["pseudo"]
seeds = [0, 1]
target_sparsity = 0.8
[[experiment]]
dataset = "digits"
model = "mlp"
scope = ["global", "layer"]
epochs = 2
retrain_epochs = 1
track_epochs = 1
"""


def test_small_grid_end_to_end_and_resume(tmp_path, capsys):
    (tmp_path / "g.toml").write_text(GRID)
    out = tmp_path / "out"
    assert main(["benchmark", "--grid", str(tmp_path / "g.toml"), "--out", str(out), "--scheduler", "serial",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "digits / mlp / global scope, adam lr 0.001, weight decay 0.001, no cap" in printed
    assert "digits / mlp / layer scope" in printed
    results = pd.read_csv(out / "results.csv")
    summary = pd.read_csv(out / "summary.csv")
    labels = {"magnitude", "random", "gradient-weight", "mu[pseudo]"}
    assert set(results.label) == labels | {"dense"}
    # 2 scopes x 2 seeds x (dense + 4 criteria x 3 rounds)
    assert len(results) == 2 * 2 * (1 + 4 * 3)
    assert len(summary) == 2 * 4 * 3 and set(summary.n_seeds) == {2}
    assert summary.dense.notna().all()
    # layer scope prunes every tensor to 80%: none is emptied; the dense rows have nothing pruned
    assert (results.empty_tensors == 0).all()
    assert (results[results.label == "dense"].flop_speedup == 1).all()
    assert (results[results.label != "dense"].flop_speedup > 1).all()
    assert (out / "accuracy_vs_sparsity.png").stat().st_size > 10_000
    # resume: a lost cell is recomputed, identically; the others are read back
    cells = sorted((out / "cells").glob("*.csv"))
    assert len(cells) == 4
    before = {p.name: p.stat().st_mtime_ns for p in cells}
    cells[0].unlink()
    run_benchmark(load_grid(tmp_path / "g.toml"), out, scheduler="serial", quiet=True)
    after = {p.name: p.stat().st_mtime_ns for p in sorted((out / "cells").glob("*.csv"))}
    assert set(after) == set(before)
    assert [n for n in after if after[n] != before[n]] == [cells[0].name]
    again = pd.read_csv(out / "results.csv")
    pd.testing.assert_frame_equal(again.drop(columns="cell_seconds"), results.drop(columns="cell_seconds"))
    # each cell records its cost and its thread count (float32 training reproduces only at the same count)
    assert (results.cell_seconds > 0).all() and (results.torch_threads == torch.get_num_threads()).all()
    assert summary.cell_seconds.notna().all() and "cell time median" in printed
    # another grid in the same folder is refused; a changed setting gets new keys
    (tmp_path / "h.toml").write_text(GRID.replace("epochs = 2", "epochs = 3"))
    with pytest.raises(ValueError, match="other settings"):
        run_benchmark(load_grid(tmp_path / "h.toml"), out, scheduler="serial", quiet=True)
    keys_g = {c.key for c in load_grid(tmp_path / "g.toml").cells()}
    keys_h = {c.key for c in load_grid(tmp_path / "h.toml").cells()}
    assert not keys_g & keys_h


def test_summary_statistics_match_scipy():
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(5):
        base = 0.9 + 0.01 * rng.standard_normal()
        rows.append(dict(label="dense", seed=seed, target_sparsity=0.0, test_accuracy=0.95))
        for lab, shift in (("magnitude", 0.0), ("mu[pseudo]", 0.02)):
            rows.append(dict(label=lab, seed=seed, target_sparsity=0.9, test_accuracy=base + shift + 0.005 * rng.standard_normal()))
    df = pd.DataFrame(rows).assign(dataset="d", model="m", scope="global", weight_decay=0.0, sparsity=0.9,
                                   compression_ratio=10.0, flop_speedup=10.0, test_loss=1.0)
    s = summarise(df).set_index("label")
    mu = df[df.label == "mu[pseudo]"].test_accuracy.to_numpy()
    mag = df[df.label == "magnitude"].test_accuracy.to_numpy()
    lo, hi = stats.t.interval(0.95, 4, loc=mu.mean(), scale=stats.sem(mu))
    assert s.loc["mu[pseudo]", "ci_low"] == pytest.approx(lo) and s.loc["mu[pseudo]", "ci_high"] == pytest.approx(hi)
    assert s.loc["mu[pseudo]", "diff_vs_magnitude"] == pytest.approx((mu - mag).mean())
    assert s.loc["mu[pseudo]", "paired_t_p"] == pytest.approx(stats.ttest_rel(mu, mag).pvalue)
    assert s.loc["mu[pseudo]", "wilcoxon_p"] == pytest.approx(stats.wilcoxon(mu - mag).pvalue)
    assert np.isnan(s.loc["magnitude", "paired_t_p"]) and s.loc["mu[pseudo]", "dense"] == 0.95


def test_grid_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(GRID.replace('dataset = "digits"', 'dataset = "digits"\nlearning_rate = 0.1'))
    with pytest.raises(ValueError, match="unknown experiment keys \\['learning_rate'\\]; valid: .*'lr'"):
        load_grid(bad)
    bad.write_text(GRID.replace('"digits"', '"imagenet"'))
    with pytest.raises(ValueError, match="dataset='imagenet' is not valid"):
        load_grid(bad)
    with pytest.raises(FileNotFoundError):
        load_grid(tmp_path / "missing.toml")


def test_flops_count_nonzero_macs():
    model = build("lenet5", (1, 28, 28), 10)
    dense, sparse = flops(model, (1, 28, 28))
    # conv1 6x25 weights at 28x28, conv2 16x150 at 10x10, then the three Linear layers
    expected = 6 * 25 * 28 * 28 + 16 * 150 * 10 * 10 + 400 * 120 + 120 * 84 + 84 * 10
    assert dense == sparse == expected
    mustat.prune(model, mustat.score(model, "magnitude"), sparsity=0.9, scope="layer")
    mode = model.training
    dense2, sparse2 = flops(model, (1, 28, 28))
    assert dense2 == expected and model.training == mode
    conv1 = int((model[0].weight != 0).sum())
    assert conv1 == round(0.1 * 150)
    assert sparse2 < expected / 5


def test_gradient_weight_matches_autograd_and_needs_grads(mlp, batch):
    from mustat.criteria import loss_gradient

    X, y = batch
    mustat.prune(mlp, mustat.score(mlp, "magnitude"), sparsity=0.5)
    grads = loss_gradient(mlp, (X, y), nn.functional.cross_entropy, batch_size=7)
    plain = mustat.finalize(__import__("copy").deepcopy(mlp))
    nn.functional.cross_entropy(plain(X), y).backward()
    for name, g in grads.items():
        module = plain.get_submodule(name.rpartition(".")[0])
        live = module.weight != 0
        torch.testing.assert_close(g[live], module.weight.grad[live], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in mlp.parameters())
    scores = mustat.score(mlp, "gradient-weight", grads=grads)
    w = mlp[0].weight.detach()
    expected = (w * grads["0.weight"]).abs().masked_fill(w == 0, float("-inf"))
    torch.testing.assert_close(scores["0.weight"], expected)
    with pytest.raises(ValueError, match="needs grads="):
        mustat.score(mlp, "gradient-weight")


@pytest.mark.parametrize("name, n_cells", [("grid", 90), ("collapse", 12)])
def test_committed_grids_load(name, n_cells):
    """The grid files the docs report stay valid as the runner changes."""
    from pathlib import Path

    grid = load_grid(Path(__file__).parents[1] / "docs" / "pruning" / f"{name}.toml")
    assert len(grid.cells()) == n_cells
    assert len({c.key for c in grid.cells()}) == n_cells


def test_grid_reads_user_files_from_data_dir(tmp_path):
    """Full MNIST (or CIFAR-10) from the user's files: ``data_dir`` in an experiment block; nothing downloads."""
    from test_data import write_mnist

    (tmp_path / "mnist").mkdir()
    write_mnist(tmp_path / "mnist", n_train=300, n_test=50)
    grid = tmp_path / "g.toml"
    grid.write_text(GRID.replace('dataset = "digits"', f'dataset = "mnist"\ndata_dir = "{tmp_path / "mnist"}"')
                    .replace('scope = ["global", "layer"]', 'scope = "global"').replace("seeds = [0, 1]", "seeds = [0]")
                    .replace('"gradient-weight", ', ""))
    summary, results = run_benchmark(load_grid(grid), tmp_path / "out", scheduler="serial", quiet=True)
    assert set(results.dataset) == {"mnist"} and set(results.data_dir) == {str(tmp_path / "mnist")}
    dense = results[results.label == "dense"]
    # scored on the 50 test images of those files (not a bundled test set): a multiple of 1/50
    acc = dense.test_accuracy.iloc[0] * 50
    assert len(dense) == 1 and abs(acc - round(acc)) < 1e-4
    bad = tmp_path / "h.toml"
    bad.write_text(grid.read_text().replace(str(tmp_path / "mnist"), str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_benchmark(load_grid(bad), tmp_path / "out2", scheduler="serial", quiet=True)


def test_comparison_counts_significant_differences():
    """Worst paired difference over the high sparsities and the significant ones, against numpy and scipy."""
    from mustat.benchmark import comparison, report

    rng = np.random.default_rng(1)
    rows = []
    for seed in range(5):
        rows.append(dict(label="dense", seed=seed, target_sparsity=0.0, test_accuracy=0.95))
        for t, shift in ((0.5, 0.0), (0.9, -0.02), (0.98, 0.0)):   # clearly below at 90%, a tie at 98%
            base = 0.9 + 0.01 * rng.standard_normal()
            rows.append(dict(label="magnitude", seed=seed, target_sparsity=t, test_accuracy=base))
            rows.append(dict(label="mu[pseudo]", seed=seed, target_sparsity=t,
                             test_accuracy=base + shift + 0.002 * rng.standard_normal()))
    df = pd.DataFrame(rows).assign(dataset="d", model="m", scope="global", optimizer="adam", lr=1e-3, weight_decay=0.0,
                                   max_tensor_sparsity=0.0, sparsity=lambda d: d.target_sparsity,
                                   compression_ratio=10.0, flop_speedup=10.0)
    comp = comparison(summarise(df)).set_index("label")
    acc = df.pivot_table(index=["target_sparsity", "seed"], columns="label", values="test_accuracy")
    d = (acc["mu[pseudo]"] - acc["magnitude"]).groupby("target_sparsity").mean()
    p = {t: stats.ttest_rel(acc.loc[t, "mu[pseudo]"], acc.loc[t, "magnitude"]).pvalue for t in (0.9, 0.98)}
    assert p[0.9] < 0.05 < p[0.98]
    mu = comp.loc["mu[pseudo]"]
    assert mu.n_sparsities == 2 and mu.worst_diff == pytest.approx(d[0.9]) and mu.best_diff == pytest.approx(d[0.98])
    assert (mu.n_below, mu.n_above) == (1, 0) and mu.diff_at_max == pytest.approx(d[0.98])
    assert mu.vs_dense_at_max == pytest.approx(acc.loc[0.98, "mu[pseudo]"].mean() - 0.95)
    assert comp.loc["magnitude", "vs_dense_at_max"] == pytest.approx(acc.loc[0.98, "magnitude"].mean() - 0.95)
    assert f"{100 * d[0.9]:+.1f} (1↓ 0↑ of 2)" in report(summarise(df))


def _results(**setting):
    rows = []
    for seed in range(3):
        rows.append(dict(label="dense", seed=seed, target_sparsity=0.0, test_accuracy=0.95))
        for lab in ("magnitude", "mu[pseudo]"):
            rows.append(dict(label=lab, seed=seed, target_sparsity=0.9, test_accuracy=0.5 + 0.2 * seed))
    return pd.DataFrame(rows).assign(dataset="d", model="m", scope="global", weight_decay=0.0, sparsity=0.9,
                                     compression_ratio=10.0, flop_speedup=10.0, test_loss=1.0, **setting)


def test_summary_keeps_experiments_apart_on_every_setting():
    """Two batch sizes (or momenta, samplers, data folders) were merged into one row of 6 seeds."""
    for column, values in (("batch_size", (32, 64)), ("momentum", (0.0, 0.9)), ("sampler", ("shuffle", "replacement")),
                           ("data_dir", ("/a", "/b"))):
        df = pd.concat([_results(**{column: v}) for v in values], ignore_index=True)
        s = summarise(df)
        assert len(s[s.label == "mu[pseudo]"]) == 2 and (s.n_seeds == 3).all(), column


def test_accuracy_intervals_stay_in_the_unit_interval():
    s = summarise(_results()).set_index("label")
    assert s.loc["magnitude", "ci_low"] >= 0.0 and s.loc["magnitude", "ci_high"] <= 1.0
    assert s.loc["magnitude", "ci_high"] == 1.0  # 0.7 ± t(2) * 0.2 / sqrt(3) reaches past 1


@pytest.mark.parametrize("edit, match", [
    (('epochs = 2', 'epochs = "1"'), "block 1: epochs must be an integer, got '1'"),
    (('seeds = [0, 1]', 'seeds = 0'), "seeds must be a non-empty list"),
    (('criteria = ["magnitude", "random", "gradient-weight", "mu"]', 'criteria = "magnitude"'),
     "criteria must be a non-empty list"),
    (('model = "mlp"', 'model = 3'), "model must be a name"),
    (('target_sparsity = 0.8', 'target_sparsity = "high"'), "top-level settings: target_sparsity must be a real"),
])
def test_grid_values_of_the_wrong_type_name_the_file(tmp_path, edit, match):
    bad = tmp_path / "bad.toml"
    bad.write_text(GRID.replace(*edit))
    with pytest.raises(ValueError, match=match) as err:
        load_grid(bad)
    assert str(bad) in str(err.value)


def test_empty_and_binary_grid_files(tmp_path):
    from validation.study import load_grid as load_study_grid

    for loader in (load_grid, load_study_grid):
        empty = tmp_path / "empty.toml"
        empty.write_text("")
        with pytest.raises(ValueError, match=f"{empty} is empty"):
            loader(empty)
        binary = tmp_path / "bin.toml"
        binary.write_bytes(bytes(range(256)))
        with pytest.raises(ValueError, match=f"{binary} is not a text file"):
            loader(binary)
    only = tmp_path / "only.toml"
    only.write_text('replications = 4\n')
    with pytest.raises(ValueError, match="defines no cells"):
        load_study_grid(only)


def test_a_damaged_cell_file_is_named(tmp_path):
    (tmp_path / "g.toml").write_text(GRID.replace('scope = ["global", "layer"]', 'scope = "global"').replace("[0, 1]", "[0]"))
    out = tmp_path / "out"
    grid = load_grid(tmp_path / "g.toml")
    run_benchmark(grid, out, scheduler="serial", quiet=True)
    cell = next((out / "cells").iterdir())
    cell.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match=f"{cell} cannot be read.*delete it"):
        run_benchmark(grid, out, scheduler="serial", quiet=True)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "docs" / "pruning").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_committed_pruning_grid_loads(path):
    assert load_grid(path).cells()         # the commands in docs/ must run as written
