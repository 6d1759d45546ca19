"""``mustat structured`` end to end on digits: rounds, resumption, saved models, argument checks."""

import subprocess
import sys

import pandas as pd
import pytest
import torch

from mustat.cli import main
from mustat.config import TrainConfig
from mustat.structured.schedule import COLUMNS, check_labels, run

ARGS = ["structured", "--dataset", "digits", "--model", "mlp", "--epochs", "2", "--retrain-epochs", "1",
        "--track-epochs", "1", "--rounds", "2", "--speedup", "2", "--quiet"]


def test_command_prunes_to_the_budget_measures_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*ARGS, "--importance", "wald[curvature],magnitude", "--seeds", "0", "--out", str(out), "--save-models"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "wald[curvature]" in printed and "results:" in printed
    df = pd.read_csv(out / "results.csv")
    assert list(df.columns) == COLUMNS
    assert set(df["label"]) == {"dense", "wald[curvature]", "magnitude"}
    last = df[df["round"] == 2]
    assert (last["flop_speedup"] >= 2.0).all() and (last["params"] < df[df["label"] == "dense"]["params"].iloc[0]).all()
    assert (last["speedup_b1"] > 0).all() and (last["dense_latency_b128"] > last["dense_latency_b1"]).all()
    first = df[df["round"] == 1]
    assert (first["flop_speedup"] >= 2 ** 0.5).all() and (first["flop_speedup"] < last["flop_speedup"].max()).all()
    # the saved model reloads with plain torch and classifies like the row says
    model = torch.export.load(str(out / "models" / "magnitude-seed0.pt2")).module()
    from mustat.data import load
    data = load("digits", seed=0)
    acc = float((model(data.X_test).argmax(1) == data.y_test).float().mean())
    assert acc == pytest.approx(float(last[last["label"] == "magnitude"]["test_accuracy"].iloc[0]), abs=1e-6)
    # rerun: every (seed, importance) is done, so nothing is recomputed and the rows stay
    assert main(argv) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), df)
    # the same folder with other settings is refused, not mixed in
    other = [a if a != "mlp" else "lenet5" for a in argv]
    with pytest.raises(SystemExit):
        main(other)
    assert "holds a structured run with other settings (model" in capsys.readouterr().err


def test_trajectory_estimators_track_each_architecture(tmp_path):
    train = TrainConfig(epochs=3, retrain_epochs=2, track_epochs=2, batch_size=32)
    df = run(dataset="digits", model="mlp", importances=["wald[batch-means]"], speedup=1.5, rounds=2, seeds=[1],
             train=train, out=tmp_path, quiet=True)
    rows = df[df["label"] == "wald[batch-means]"]
    assert list(rows["round"]) == [1, 2] and rows["flop_speedup"].iloc[-1] >= 1.5


def test_bad_arguments_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="needs an estimator: write wald\\[NAME\\]"):
        check_labels(["wald"])
    with pytest.raises(ValueError, match="'magnitude' is Torch-Pruning's and takes no estimator"):
        check_labels(["magnitude[kfac]"])
    with pytest.raises(ValueError, match="se='nope' is not valid"):
        check_labels(["wald[nope]"])
    with pytest.raises(ValueError, match="importance='obd' is not valid; choose one of"):
        check_labels(["obd"])
    with pytest.raises(ValueError, match="repeat a label"):
        check_labels(["lamp", "lamp"])
    with pytest.raises(ValueError, match=r"speedup must be in \(1.0, inf\), got 1.0"):
        run(importances=["lamp"], speedup=1.0, out=tmp_path)
    assert not (tmp_path / "results.csv").exists()


def test_cli_reports_errors_cleanly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mustat", *ARGS, "--importance", "wald", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "mustat structured: error: importance 'wald' needs an estimator" in proc.stderr


def test_round_to_reaches_the_schedule_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mustat", *ARGS, "--importance", "lamp", "--round-to", "0",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "round_to" in proc.stderr
    assert not (tmp_path / "results.csv").exists()
