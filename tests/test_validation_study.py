import pandas as pd
import pytest

from mustat.cli import main
from validation.estimators import Setting
from validation.study import SUMMARY_COLUMNS, Grid, load_grid, run_study

TINY = Grid(designs=("logistic", "teacher-mlp"),
            settings=(Setting("sgd", 0.05, epochs=3, window=2), Setting("adam", 0.01, epochs=3, window=2, sampler="shuffle")),
            replications=2, bootstrap_B=8)


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
    pd.testing.assert_frame_equal(summary, full_summary)
    pd.testing.assert_frame_equal(cells, full_cells)


def test_outputs_and_columns(tmp_path):
    summary, cells = run_study(TINY, tmp_path, scheduler="serial", quiet=True)
    assert list(summary.columns) == SUMMARY_COLUMNS
    for name in ("params.json", "cells.csv", "summary.csv", "report.md", "loglog_se.png", "qq_null_pvalues.png", "coverage.png"):
        assert (tmp_path / name).stat().st_size > 100, name
    glm = summary[summary.design == "logistic"]
    mlp = summary[summary.design == "teacher-mlp"]
    # truth metrics only where the truth is known and there are replications (bootstrap: one dataset)
    assert glm[glm.estimator != "bootstrap"].coverage95.notna().all() and mlp.coverage95.isna().all()
    assert glm[glm.estimator == "bootstrap"].coverage95.isna().all()
    assert set(glm.estimator) >= {"pseudo", "calibrated", "wald", "bootstrap"}
    wald = glm[glm.estimator == "wald"]
    assert (wald.se_ratio_median == 1).all() and (wald.loglog_slope.round(9) == 1).all()  # the reference itself
    assert len(cells[(cells.design == "logistic") & (cells.estimator == "pseudo")]) == 2 * 2 * 8  # settings x reps x weights
    report = (tmp_path / "report.md").read_text()
    assert "![log-log SE](loglog_se.png)" in report and "| design" in report


def test_other_grid_in_same_folder_refused(tmp_path):
    run_study(Grid(designs=("logistic",), settings=(Setting(epochs=2, window=1),), replications=1, bootstrap_B=4),
              tmp_path, scheduler="serial", quiet=True)
    with pytest.raises(ValueError, match="another grid"):
        run_study(Grid(designs=("linear",), settings=(Setting(epochs=2, window=1),), replications=1, bootstrap_B=4),
                  tmp_path, scheduler="serial", quiet=True)


def test_dask_local_cluster_gives_the_serial_tables(tmp_path):
    grid = Grid(designs=("logistic",), settings=(Setting(epochs=2, window=1), Setting("sgd", 0.05, epochs=2, window=1)),
                replications=2, bootstrap_B=4)
    serial, _ = run_study(grid, tmp_path / "a", scheduler="serial", quiet=True)
    parallel, _ = run_study(grid, tmp_path / "b", scheduler="local", workers=2, quiet=True)
    pd.testing.assert_frame_equal(parallel, serial, rtol=1e-6)


def test_load_grid(tmp_path):
    p = tmp_path / "grid.toml"
    p.write_text('designs = ["linear"]\nreplications = 3\n[[setting]]\noptimizer = "sgd"\nlr = [0.01, 0.05]\n'
                 'sampler = ["replacement", "shuffle"]\nepochs = 10\nwindow = 5\n[[setting]]\noptimizer = "adam"\n')
    g = load_grid(p)
    assert g.designs == ("linear",) and g.replications == 3 and len(g.settings) == 5
    assert {s.lr for s in g.settings[:4]} == {0.01, 0.05}
    p.write_text('[[setting]]\nlearning_rate = 0.1\n')
    with pytest.raises(ValueError, match="unknown setting keys \\['learning_rate'\\]"):
        load_grid(p)
    p.write_text('designz = ["x"]\n')
    with pytest.raises(ValueError, match="unknown keys"):
        load_grid(p)
    p.write_text('designs = ["imagenet"]\n')
    with pytest.raises(ValueError, match="design='imagenet' is not valid"):
        load_grid(p)
    with pytest.raises(FileNotFoundError):
        load_grid(tmp_path / "none.toml")


def test_cli_calibrate(tmp_path, capsys):
    p = tmp_path / "grid.toml"
    p.write_text('designs = ["logistic"]\nreplications = 2\nbootstrap_B = 4\n[[setting]]\nepochs = 2\nwindow = 1\n')
    assert main(["calibrate", "--grid", str(p), "--out", str(tmp_path / "o"), "--scheduler", "serial", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "calibrated" in out and "report.md" in out
    assert (tmp_path / "o" / "summary.csv").exists()


def test_digits_design_runs(tmp_path):
    grid = Grid(designs=("digits",), settings=(Setting(epochs=2, window=1),), replications=1, bootstrap_B=4)
    summary, cells = run_study(grid, tmp_path, scheduler="serial", quiet=True)
    assert set(summary.estimator) >= {"pseudo", "calibrated", "bootstrap"}
    assert len(cells[cells.estimator == "pseudo"]) == 64 * 16 + 16 * 10
    # constant-zero pixels give weights that never move (reference SE 0): skipped, not NaN
    assert (cells[cells.estimator == "bootstrap"].se == 0).any()
    assert summary[["se_ratio_median", "loglog_slope", "spearman_z"]].notna().all().all()


def test_a_code_level_change_of_a_reference_setting_recomputes_its_cells(tmp_path, monkeypatch):
    import validation.study as study

    grid = Grid(designs=("logistic",), settings=(Setting("sgd", 0.05, epochs=2, window=1, weight_decay=1e-3),),
                replications=2, bootstrap_B=4, estimators=("pseudo", "curvature"))
    first = []
    summary, _ = run_study(grid, tmp_path, scheduler="serial", quiet=True, on_cell=first.append)
    assert summary.weight_decay.eq(1e-3).all() and summary.bootstrap_epochs.eq(200).all()
    assert set(summary.reference) == {"wald-sandwich"}  # a penalised fit: the sandwich is the reference
    again = []
    run_study(grid, tmp_path, scheduler="serial", quiet=True, on_cell=again.append)
    assert again == []  # nothing changed: nothing recomputed
    # someone edits a reference default in the code: the grid the user wrote is the same,
    # but every cell the change shapes is recomputed instead of mixed with stale ones
    monkeypatch.setattr(study, "REFERENCES", study.References(glm_bootstrap_epochs=7))
    changed = Grid(designs=grid.designs, settings=grid.settings, replications=2, bootstrap_B=4,
                   estimators=grid.estimators)
    redone = []
    summary, _ = run_study(changed, tmp_path, scheduler="serial", quiet=True, on_cell=redone.append)
    assert len(redone) == 1 and redone != first
    assert summary.bootstrap_epochs.eq(7).all()
