"""The main job (`make run`) and `mustat prune` compare the default criteria: the paper's
`mu[pseudo]`, the validated marginal `mu[kfac]`, magnitude and random."""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import pandas as pd

from mustat.config import DEFAULT_CRITERIA, DEFAULT_SE, RunConfig, TrainConfig, expand
from mustat.criteria import label

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LABELS = ["mu[pseudo]", "mu[kfac]", "magnitude", "random"]


def main_job() -> list[str]:
    """The arguments `make run` passes to `mustat`."""
    text = (ROOT / "Makefile").read_text()
    return shlex.split(re.search(r"^MAIN_JOB := (.*)$", text, re.M).group(1))


def test_the_defaults_are_the_papers_and_the_validated_marginal_criterion():
    assert DEFAULT_SE == ("pseudo", "kfac") and RunConfig().se == DEFAULT_SE
    assert [label(c, s) for c, s in expand(DEFAULT_CRITERIA, DEFAULT_SE)] == DEFAULT_LABELS


def test_make_run_runs_the_defaults_and_their_checks_pass():
    from mustat.cli import build_parser
    from mustat.uncertainty import ESTIMATORS, make_estimator

    argv = main_job()
    assert argv[0] == "prune" and "--se" not in argv and "--criteria" not in argv, "make run shows the defaults"
    args = build_parser().parse_args(argv)
    train = TrainConfig(epochs=args.epochs, retrain_epochs=args.retrain_epochs, track_epochs=args.track_epochs)
    from mustat.data import load

    setup = train.setup(len(load(args.dataset).y_train))
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(), torch.nn.Linear(300, 10))
    for name in DEFAULT_SE:
        assert setup.window_steps >= ESTIMATORS[name].min_window_steps
        with warnings.catch_warnings():
            warnings.simplefilter("error")             # no check of an estimator's own warns about this job
            make_estimator(name, model, setup=setup)


def test_prune_with_the_defaults_compares_four_criteria_and_warns_of_no_window(tmp_path, capsys):
    from mustat.cli import main

    out = tmp_path / "run"
    assert main(["prune", "--out", str(out), "--epochs", "2", "--retrain-epochs", "1",
                 "--target-sparsity", "0.8", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "window check" not in captured.err
    df = pd.read_csv(out / "results.csv")
    assert list(dict.fromkeys(df.label[df.label != "dense"])) == DEFAULT_LABELS
    assert all(lab in captured.out for lab in DEFAULT_LABELS)
