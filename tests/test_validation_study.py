import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mustat.cli import main
from validation.estimators import Setting, split_at
from validation.study import SUMMARY_COLUMNS, Grid, References, Scoped, load_grid, run_study

TINY = Grid(designs=("logistic",),
            settings=(Setting("sgd", 0.05, epochs=3, window=2), Setting("adam", 0.01, epochs=3, window=2, sampler="shuffle")),
            scoped=(Scoped(("teacher-regression",), Setting("adam", 0.01, weight_decay=1e-2, epochs=3, window=2)),),
            replications=2, bootstrap_B=8, teacher_replicates=4)
#: wall times differ between runs; everything else must be identical
TIMING = ["cell_seconds"]


class Stop(Exception):
    pass


def test_resume_computes_only_missing_cells_and_matches(tmp_path):
    full_summary, full_cells = run_study(TINY, tmp_path / "full", scheduler="serial", quiet=True)
    done = []

    def stop_after_one(key):
        done.append(key)
        if len(done) == 1:
            raise Stop

    with pytest.raises(Stop):
        run_study(TINY, tmp_path / "cut", scheduler="serial", quiet=True, on_cell=stop_after_one)
    again = []
    summary, cells = run_study(TINY, tmp_path / "cut", scheduler="serial", quiet=True, on_cell=again.append)
    assert len(again) == len(TINY.cells()) - 1 and done[0] not in again
    pd.testing.assert_frame_equal(summary.drop(columns=TIMING), full_summary.drop(columns=TIMING))
    pd.testing.assert_frame_equal(cells, full_cells)


def test_outputs_and_columns(tmp_path):
    summary, cells = run_study(TINY, tmp_path, scheduler="serial", quiet=True)
    assert list(summary.columns) == SUMMARY_COLUMNS
    for name in ("params.json", "cells.csv", "summary.csv", "report.md", "loglog_se.png", "qq_null_pvalues.png", "coverage.png"):
        assert (tmp_path / name).stat().st_size > 100, name
    glm = summary[summary.design == "logistic"]
    mlp = summary[summary.design == "teacher-regression"]
    # truth metrics only where the truth is known and there are replications (bootstrap: one dataset)
    assert glm[glm.estimator != "bootstrap"].coverage95.notna().all() and mlp.coverage95.isna().all()
    assert glm[glm.estimator == "bootstrap"].coverage95.isna().all()
    assert set(glm.estimator) >= {"pseudo", "calibrated", "wald", "bootstrap"}
    # the gauge-fixed variants read hidden layers only, centred in the penalty's gauge
    assert not set(glm.estimator) & {"pseudo-balanced", "batch-means-balanced"}
    balanced = mlp[mlp.estimator == "batch-means-balanced"]
    assert len(balanced) and (balanced.centre == "window mean").all() and balanced.se_ratio_median.notna().all()
    wald = glm[glm.estimator == "wald"]
    assert (wald.se_ratio_median == 1).all() and (wald.loglog_slope.round(9) == 1).all()  # the reference itself
    # Wilson intervals bracket the coverage; each GLM cell pools replications x weights intervals
    cov = glm.dropna(subset=["coverage95"])
    assert len(cov) == len(glm) - 2  # all but the two bootstrap rows (one dataset: no coverage)
    assert ((cov.coverage95_lo <= cov.coverage95) & (cov.coverage95 <= cov.coverage95_hi)).all()
    assert (glm[glm.estimator == "pseudo"].n_truth == 2 * 8).all() and (glm.n_null.dropna() == 2 * 4).all()
    assert len(cells[(cells.design == "logistic") & (cells.estimator == "pseudo")]) == 2 * 2 * 8  # settings x reps x weights
    # the interval centres are stated; batch means' intervals use t with (batches - 1) degrees of freedom
    centre = glm.groupby("estimator").centre.first()
    assert centre["pseudo"] == "current weights" and centre["batch-means"] == "window mean"
    assert centre["calibrated"] == "window mean" and "optimum" in centre["wald"]
    bm = glm[glm.estimator == "batch-means"]
    assert (bm.interval_dof == bm.batches - 1).all() and (glm[glm.estimator == "pseudo"].interval_dof == float("inf")).all()
    # hidden layers: every estimator against each of the three references, and the references
    # against each other; the penalised fit is balanced and the references report their precision
    assert set(mlp.reference) == {"wald-sandwich", "bootstrap", "teacher"}
    boot = mlp[mlp.reference == "bootstrap"]
    assert set(boot.estimator) >= {"pseudo", "batch-means", "curvature", "wald-sandwich", "teacher"}
    assert boot.ref_mc_rel_error.to_numpy() == pytest.approx(np.full(len(boot), 1 / (2 * 7) ** 0.5))
    assert (mlp[mlp.reference == "wald-sandwich"].ref_mc_rel_error == 0).all()
    assert mlp.balance_max.max() < 1e-3 and (mlp.ref_converged_frac >= 0).all() and mlp.basin_z_median.notna().all()
    assert (mlp.n_weights == 8 * 6 + 8).all()  # the tracked weights of 6-8-1
    report = (tmp_path / "report.md").read_text()
    assert "![log-log SE](loglog_se.png)" in report and "| design" in report and "## Hidden layers" in report
    assert (tmp_path / "references").is_dir()  # the teacher replicates are cached for other settings


def test_hidden_layer_design_without_weight_decay_is_refused():
    with pytest.raises(ValueError, match="'teacher-regression' has a hidden layer.*weight_decay=0"):
        Grid(designs=(), settings=(), scoped=(Scoped(("teacher-regression",), Setting(epochs=2, window=1)),))


def test_stacked_replicates_train_exactly_as_separate_fits():
    import numpy as np
    import torch

    from mustat.training import train_epochs
    from validation.designs import get_design

    design = get_design("logistic")
    data = [design.sample(r) for r in range(3)]
    X = torch.tensor(np.stack([a[0] for a in data]).transpose(1, 0, 2), dtype=torch.float32)
    y = torch.tensor(np.stack([a[1] for a in data]).T.copy(), dtype=torch.float32)
    stack = design.stacked_model([10, 11, 12])
    opt = torch.optim.Adam(stack.parameters(), lr=0.01, weight_decay=1e-3)
    train_epochs(stack, opt, (X, y), epochs=2, batch_size=32, generator=torch.Generator().manual_seed(5),
                 loss=design.stacked_loss())
    for r in range(3):
        single = design.model(10 + r)
        opt = torch.optim.Adam(single.parameters(), lr=0.01, weight_decay=1e-3)
        train_epochs(single, opt, (X[:, r], y[:, r]), epochs=2, batch_size=32,
                     generator=torch.Generator().manual_seed(5), loss=design.loss())
        torch.testing.assert_close(stack.linear.weight[r], single.linear.weight[0], rtol=0, atol=2e-6)


def test_other_grid_in_same_folder_refused(tmp_path):
    run_study(Grid(designs=("logistic",), settings=(Setting(epochs=2, window=1),), replications=1, bootstrap_B=4),
              tmp_path, scheduler="serial", quiet=True)
    with pytest.raises(ValueError, match="other settings"):
        run_study(Grid(designs=("linear",), settings=(Setting(epochs=2, window=1),), replications=1, bootstrap_B=4),
                  tmp_path, scheduler="serial", quiet=True)


def test_dask_local_cluster_gives_the_serial_tables(tmp_path):
    grid = Grid(designs=("logistic",), settings=(Setting(epochs=2, window=1), Setting("sgd", 0.05, epochs=2, window=1)),
                replications=2, bootstrap_B=4)
    # float32 sums are reproducible only at one thread count: the serial run at the workers' one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial, _ = run_study(grid, tmp_path / "a", scheduler="serial", quiet=True)
    finally:
        torch.set_num_threads(threads)
    parallel, _ = run_study(grid, tmp_path / "b", scheduler="local", workers=2, quiet=True)
    pd.testing.assert_frame_equal(parallel.drop(columns=TIMING), serial.drop(columns=TIMING), rtol=1e-6)


def test_load_grid(tmp_path):
    p = tmp_path / "grid.toml"
    p.write_text('designs = ["linear"]\nreplications = 3\n[[setting]]\noptimizer = "sgd"\nlr = [0.01, 0.05]\n'
                 'sampler = ["replacement", "shuffle"]\nepochs = 10\nwindow = 5\n[[setting]]\noptimizer = "adam"\n'
                 '[[setting]]\ndesigns = ["teacher-regression"]\nweight_decay = [1e-3, 1e-2]\n')
    g = load_grid(p)
    assert g.designs == ("linear",) and g.replications == 3 and len(g.settings) == 5
    assert {s.lr for s in g.settings[:4]} == {0.01, 0.05}
    assert [(sc.designs, sc.setting.weight_decay) for sc in g.scoped] == [(("teacher-regression",), 1e-3),
                                                                           (("teacher-regression",), 1e-2)]
    assert len(g.cells()) == 7
    p.write_text('[[setting]]\nlearning_rate = 0.1\n')
    with pytest.raises(ValueError, match="unknown setting keys \\['learning_rate'\\]"):
        load_grid(p)
    p.write_text('designz = ["x"]\n')
    with pytest.raises(ValueError, match="unknown keys"):
        load_grid(p)
    p.write_text('designs = ["imagenet"]\n[[setting]]\noptimizer = "adam"\n')
    with pytest.raises(ValueError, match="design='imagenet' is not valid"):
        load_grid(p)
    p.write_text('designs = []\n[[setting]]\ndesigns = ["teacher-regression"]\nweight_decay = 1e-2\n')
    with pytest.raises(ValueError, match="designs is an empty list; give at least one value, or leave designs out"):
        load_grid(p)
    p.write_text('designs = ["linear"]\nestimators = ["batch-means-balanced"]\n[[setting]]\noptimizer = "adam"\n')
    with pytest.raises(ValueError, match="design 'linear' has no estimator to read"):
        load_grid(p)
    with pytest.raises(FileNotFoundError):
        load_grid(tmp_path / "none.toml")


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "docs" / "calibration").rglob("*.toml")),
                         ids=lambda p: p.name)
def test_every_committed_calibration_grid_loads_and_its_estimators_build(path):
    from mustat.training import steps_per_epoch
    from mustat.uncertainty import TrainingSetup, make_estimator
    from validation.designs import get_design

    cells = load_grid(path).cells()       # the commands in docs/CALIBRATION.md must run as written
    assert cells
    for cell in {(c.design, c.setting, c.estimators): c for c in cells}.values():
        s, model = cell.setting, get_design(cell.design).model(0)
        setup = TrainingSetup(optimizer=s.optimizer, n=2000, batch_size=s.batch_size, sampler=s.sampler,
                              window_steps=s.window * steps_per_epoch(2000, s.batch_size), weight_decay=s.weight_decay)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # shuffle settings are measured on purpose
            for label in cell.estimators:
                make_estimator(split_at(label)[0], model, setup=setup)


def test_cli_calibrate(tmp_path, capsys):
    p = tmp_path / "grid.toml"
    p.write_text('designs = ["logistic"]\nreplications = 2\nbootstrap_B = 4\n[[setting]]\nepochs = 2\nwindow = 1\n')
    assert main(["calibrate", "--grid", str(p), "--out", str(tmp_path / "o"), "--scheduler", "serial", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "calibrated" in out and "report.md" in out
    assert (tmp_path / "o" / "summary.csv").exists()


def test_digits_design_runs(tmp_path):
    grid = Grid(designs=(), settings=(), scoped=(Scoped(("digits",), Setting(epochs=2, window=1, weight_decay=1e-2)),),
                bootstrap_B=3, estimators=("pseudo", "curvature"), references=References(newton_max_iter=4))
    summary, cells = run_study(grid, tmp_path, scheduler="serial", quiet=True)
    assert set(summary.reference) == {"wald-sandwich", "bootstrap"}  # no teacher: two references
    assert len(cells[(cells.estimator == "pseudo") & (cells.reference == "bootstrap")]) == 64 * 8 + 8 * 10
    # constant-zero pixels: with weight decay their weights sit at 0 in every refit (reference SE 0),
    # and they are counted as uninformative, not turned into NaN metrics
    boot = summary[(summary.reference == "bootstrap") & (summary.estimator == "pseudo")].iloc[0]
    assert boot.n_ref_uninformative > 0 and boot.n_weights == 64 * 8 + 8 * 10


def test_a_code_level_change_of_a_reference_setting_recomputes_its_cells(tmp_path, monkeypatch):
    import validation.study as study

    grid = Grid(designs=("logistic",), settings=(Setting("sgd", 0.05, epochs=2, window=1, weight_decay=1e-3),),
                scoped=(), replications=2, bootstrap_B=4, estimators=("pseudo", "curvature"))
    first = []
    summary, _ = run_study(grid, tmp_path, scheduler="serial", quiet=True, on_cell=first.append)
    assert summary.weight_decay.eq(1e-3).all()
    assert set(summary.reference) == {"wald-sandwich"}  # a penalised fit: the sandwich is the reference
    again = []
    run_study(grid, tmp_path, scheduler="serial", quiet=True, on_cell=again.append)
    assert again == []  # nothing changed: nothing recomputed
    # someone edits a reference default in the code: the grid the user wrote is the same,
    # but every cell the change shapes is recomputed instead of mixed with stale ones
    monkeypatch.setattr(study, "REFERENCES", study.References(glm_gtol=1e-9))
    changed = Grid(designs=grid.designs, settings=grid.settings, scoped=(), replications=2, bootstrap_B=4,
                   estimators=grid.estimators)
    redone = []
    run_study(changed, tmp_path, scheduler="serial", quiet=True, on_cell=redone.append)
    assert len(redone) == 1 and redone != first


def test_the_quick_and_full_studies_draw_disjoint_datasets():
    from validation.designs import get_design
    from validation.study import data_index, quick_grid

    full = load_grid(Path(__file__).parent.parent / "docs" / "calibration" / "full" / "grid.toml")
    assert quick_grid().seed != full.seed
    quick_rows = {data_index(quick_grid().seed, r) for r in list(range(250)) + list(range(10_000, 10_200))}
    full_rows = {data_index(full.seed, r) for r in list(range(250)) + list(range(10_000, 10_200))}
    assert not quick_rows & full_rows
    design = get_design("logistic")
    X_quick = design.sample(data_index(quick_grid().seed, 0))[0]
    X_full = design.sample(data_index(full.seed, 0))[0]
    assert np.abs(X_quick - X_full).min() > 0


def test_a_negative_or_non_integer_seed_is_refused():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"seed={bad!r} is not valid"):
            Grid(seed=bad)


def test_the_calibration_pages_tables_are_the_committed_results():
    import sys

    import pandas as pd

    docs = Path(__file__).parent.parent / "docs"
    sys.path.insert(0, str(docs / "calibration"))
    try:
        import tables
    finally:
        sys.path.pop(0)
    page = (docs / "CALIBRATION.md").read_text()
    lines = (tables.quick_table(pd.read_csv(docs / "calibration" / "summary.csv"))
             + tables.full_table(pd.read_csv(docs / "calibration" / "full" / "summary.csv"))
             + tables.invariant_table(pd.read_csv(docs / "calibration" / "invariant.csv"))
             + tables.misspecified_table(pd.read_csv(docs / "calibration" / "misspecified.csv"))
             + tables.narrow_table(pd.read_csv(docs / "calibration" / "full" / "narrow" / "summary.csv"))
             + tables.narrow_table(pd.read_csv(docs / "calibration" / "full" / "digits" / "summary.csv"))
             + tables.fdr_table(pd.read_csv(docs / "calibration" / "fdr.csv"))
             + tables.marginal_glm_table(pd.read_csv(docs / "calibration" / "marginal" / "study" / "summary.csv"))
             + tables.marginal_glm_table(pd.read_csv(docs / "calibration" / "marginal" / "study" / "summary.csv"),
                                         at_mean=True)
             + tables.marginal_full_table(pd.read_csv(docs / "calibration" / "marginal" / "full" / "summary.csv"))
             + tables.marginal_hidden_table(pd.read_csv(docs / "calibration" / "marginal" / "study" / "summary.csv")))
    missing = [line for line in lines if line not in page]
    assert not missing, f"{len(missing)} table lines of docs/CALIBRATION.md differ from tables.py, e.g. {missing[0]}"


def test_at_mean_fits_a_post_hoc_estimator_at_the_window_mean(tmp_path):
    grid = Grid(designs=("logistic",), settings=(Setting("adam", 0.01, epochs=3, window=2),),
                scoped=(Scoped(("teacher-regression",), Setting("adam", 0.01, weight_decay=1e-2, epochs=3, window=2)),),
                replications=2, bootstrap_B=4, teacher_replicates=4,
                estimators=("batch-means", "fisher", "fisher@mean", "curvature@mean"))
    summary, cells = run_study(grid, tmp_path, scheduler="serial", quiet=True)
    assert set(summary.estimator) >= {"fisher@mean", "curvature@mean"}
    at = summary[summary.estimator == "fisher@mean"]
    assert (at.centre == "window mean (where the curvature is evaluated)").all()
    assert at.coverage95.notna().any() and (summary[summary.estimator == "fisher@mean"].n_weights > 0).all()
    # on the GLM the weights of fisher@mean are the window mean, which batch means also reports
    glm = cells[(cells.design == "logistic") & (cells.reference == "wald")]
    w_mean = glm[glm.estimator == "fisher@mean"].sort_values(["replication", "index"]).weight.to_numpy()
    w_bm = glm[glm.estimator == "batch-means"].sort_values(["replication", "index"]).weight.to_numpy()
    w_last = glm[glm.estimator == "fisher"].sort_values(["replication", "index"]).weight.to_numpy()
    np.testing.assert_allclose(w_mean, w_bm, rtol=1e-6)
    assert not np.allclose(w_mean, w_last)
    with pytest.raises(ValueError, match="records the trajectory itself"):
        Grid(designs=("logistic",), estimators=("batch-means@mean",))


def test_at_mean_is_the_estimator_refitted_at_the_window_mean():
    import torch

    from mustat.uncertainty import FitContext, make_estimator
    from validation.designs import get_design
    from validation.estimators import train_and_estimate
    design = get_design("logistic")
    X, y, _ = design.sample(7)
    X, y = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    model = design.model(0)
    fits, final, mean = train_and_estimate(model, design.loss(), X, y, Setting("adam", 0.01, epochs=4, window=3),
                                           seed=0, estimators=("fisher", "fisher@mean"))
    assert set(mean) == {n for n, _ in model.named_parameters()}
    ref = design.model(0)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(mean[n])
    expect = make_estimator("fisher", ref).fit(FitContext(X=X, y=y, loss=design.loss()))
    for n in expect.se():
        torch.testing.assert_close(fits["fisher@mean"][1][n], expect.se()[n])
        torch.testing.assert_close(fits["fisher@mean"][0][n], mean[n])
        assert not torch.allclose(fits["fisher"][1][n], expect.se()[n])      # the last iterate's differs


def test_curvature_fitted_apart_equals_curvature_of_the_stack():
    """The study fits ``curvature`` on each replicate GLM apart (validation.estimators.APART_FOR_SPEED,
    the linear-layer rule instead of per-sample products over the stack's R outputs): the same SEs."""
    import torch

    from mustat.uncertainty import FitContext, make_estimator
    from validation.designs import get_design
    from validation.estimators import fit_replicates, per_replicate

    assert per_replicate("curvature") and not per_replicate("batch-means") and not per_replicate("bootstrap")
    design = get_design("linear")
    stack = design.stacked_model([3, 4, 5])
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 3, stack.linear.in_features, generator=g)
    y = torch.randn(300, 3, generator=g)
    setting = Setting(weight_decay=1e-3)
    apart = fit_replicates(stack, lambda: design.model(0), design.loss(), X, y, setting, ("curvature",))["curvature"]
    whole = make_estimator("curvature", stack).fit(FitContext(X=X, y=y, loss=design.stacked_loss(),
                                                              weight_decay=1e-3))
    torch.testing.assert_close(apart[1]["linear.weight"], whole.se()["linear.weight"], rtol=1e-5, atol=0)
    torch.testing.assert_close(apart[0]["linear.weight"], stack.linear.weight.detach())
    # and against the closed form of a linear GLM: se_j = 1 / sqrt(sum_i x_ij^2 + n lambda)
    closed = (X.square().sum(0) + 300 * 1e-3).rsqrt()
    torch.testing.assert_close(apart[1]["linear.weight"], closed, rtol=1e-5, atol=0)
