import json
import os

import pandas as pd
import pytest
import torch

import mustat
from mustat.cli import main
from mustat.config import TrainConfig, expand, schedule
from mustat.models import build
from mustat.pipeline import run
from mustat.results import RESULT_COLUMNS
from mustat.uncertainty import DegenerateSEWarning

TINY = ["--epochs", "2", "--retrain-epochs", "1", "--target-sparsity", "0.8", "--quiet"]
LABELS = ["mu[pseudo]", "mu[calibrated]", "mu[batch-means]", "mu[curvature]", "magnitude", "random"]


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    # the trajectory and diagonal estimators (not the defaults): the window check below needs them
    assert main(["prune", "--out", str(out), "--seeds", "0,1", "--se", "pseudo,calibrated,batch-means,curvature", *TINY]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert all(lab in printed for lab in LABELS) and "dense" in printed and "±" in printed
    # one-epoch windows are far too short: the CLI says so per estimator, from the warnings' data
    assert "window check (calibrated)" in captured.err and "window check (batch-means)" in captured.err
    params = json.loads((out / "params.json").read_text())
    assert params["settings"]["seeds"] == [0, 1] and "torch" in params["versions"]
    df = pd.read_csv(out / "results.csv")
    assert list(df.columns) == RESULT_COLUMNS
    assert set(df.label) == {"dense", *LABELS}
    assert set(df[df.criterion == "mu"].se) == {"pseudo", "calibrated", "batch-means", "curvature"}
    assert len(df) == 2 * (1 + len(LABELS) * len(schedule("geometric", 0.8)))
    assert (out / "accuracy_vs_sparsity.png").stat().st_size > 10_000
    # reported sparsities are the real fraction of zeros in the saved models
    data = mustat.data.load("digits")
    for lab in LABELS:
        state = torch.load(out / "checkpoints" / f"seed1-{lab.replace('[', '-').replace(']', '')}.pt")
        model = build("mlp", data.input_shape, 10)
        mustat.load_pruned_state_dict(model, state["model"])
        last = df[(df.label == lab) & (df.seed == 1)].iloc[-1]
        zeros = sum(int((p == 0).sum()) for n, p in mustat.finalize(model).named_parameters() if n.endswith("weight"))
        total = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
        assert last.sparsity == pytest.approx(zeros / total, abs=1e-12)
        assert last.sparsity == pytest.approx(0.8, abs=1e-4)


class Stop(Exception):
    pass


def test_resume_gives_identical_results(tmp_path):
    cfg = TrainConfig(epochs=2, retrain_epochs=1, track_epochs=1)
    kw = dict(criteria=["mu", "random"], se=["calibrated", "batch-means"], target_sparsity=0.9, train=cfg, quiet=True)
    full = run(out=tmp_path / "full", **kw)
    seen = []

    def stop_after_two(row):
        seen.append(row)
        if len(seen) == 2:
            raise Stop

    with pytest.raises(Stop):
        run(out=tmp_path / "cut", on_round=stop_after_two, **kw)
    partial = pd.read_csv(tmp_path / "cut" / "results.csv") if (tmp_path / "cut" / "results.csv").exists() else None
    assert partial is None or len(partial) < len(full)
    done_after = []
    resumed = run(out=tmp_path / "cut", on_round=done_after.append, **kw)
    assert len(done_after) == len(full) - 1 - 2  # neither the dense phase nor finished rounds rerun
    pd.testing.assert_frame_equal(resumed, full, check_exact=True)


def test_other_settings_in_same_folder_refused(tmp_path):
    cfg = TrainConfig(epochs=1, retrain_epochs=1, track_epochs=1)
    run(out=tmp_path, criteria=["magnitude"], target_sparsity=0.5, train=cfg, quiet=True)
    with pytest.raises(ValueError, match="other settings"):
        run(out=tmp_path, criteria=["magnitude"], target_sparsity=0.6, train=cfg, quiet=True)


@pytest.mark.parametrize("args, match", [
    (["--dataset", "imagenet"], "dataset=.imagenet. is not valid; choose one of: .*digits"),
    (["--model", "resnet50"], "model=.resnet50. is not valid; choose one of: .*lenet5"),
    (["--criteria", "mu,psychic"], "criterion=.psychic. is not valid; choose one of: gradient-weight, lamp, magnitude, mu, obs, random"),
    (["--se", "pseudo,oracle"], "se=.oracle. is not valid; choose one of: batch-means, block, bootstrap, calibrated, curvature, ekfac, fisher, kfac, pseudo, wald, woodfisher, batch-means-balanced, .*kfac-layer"),
    (["--criteria", "magnitude[pseudo]"], "uses no standard errors"),
    (["--criteria", "mu[wald]"], "full 50610 x 50610 Hessian.*use se='curvature'"),
    (["--track-epochs", "0"], "track_epochs must be in"),
    (["--device", "cuda:7"], "(not available|does not exist).*available: cpu"),
    (["--target-sparsity", "1.0"], r"target_sparsity must be in \(0.0, 1.0\)"),
    (["--target-sparsity", "-0.5"], "target_sparsity must be in"),
    (["--dataset", "mnist", "--data-dir", "EMPTY"], "lacks the mnist IDX files"),
    (["--model", "lenet5"], "lenet5 needs images .* H, W >= 12"),
    (["--lr", "0"], "lr must be in"),
    # combinations refused before any training (they used to fail after the dense phase or mid-run)
    (["--optimizer", "adadelta", "--se", "calibrated"], "'calibrated' supports the optimizers sgd, adam, not 'adadelta'"),
    (["--model", "glm", "--dataset", "synthetic-logistic", "--target-sparsity", "0.95"],
     "the cap allows at most 0.8333"),
    (["--batch-size", "10000"], "batch_size=10000 is larger than the 1212 training samples"),
    (["--criteria", ""], "criteria is empty"),
    (["--se", "", "--criteria", "mu"], "needs standard errors"),
])
def test_cli_bad_input(tmp_path, capsys, args, match):
    args = [a.replace("EMPTY", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--out", str(tmp_path / "o"), *TINY, *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert __import__("re").search(match, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "o" / "checkpoints").exists()  # nothing trained, nothing written


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_an_unwritable_out_is_a_clear_error(tmp_path, capsys, where):
    target = tmp_path / "x"
    if where == "a file":
        target.write_text("")
    elif where == "under a file":
        (tmp_path / "f").write_text("")
        target = tmp_path / "f" / "run"
    else:
        target.mkdir()
        target.chmod(0o500)
        if os.access(target, os.W_OK):  # root writes anywhere
            pytest.skip("running as root: a read-only folder is writable")
    with pytest.raises(SystemExit):
        main(["prune", "--out", str(target), *TINY])
    err = capsys.readouterr().err
    assert "cannot write the run folder" in err and "Traceback" not in err


def test_a_changed_setting_is_named(tmp_path):
    cfg = TrainConfig(epochs=1, retrain_epochs=1, track_epochs=1)
    run(out=tmp_path, criteria=["magnitude"], target_sparsity=0.5, train=cfg, quiet=True)
    with pytest.raises(ValueError, match=r"train.lr: 0.001 there, 0.002 here"):
        run(out=tmp_path, criteria=["magnitude"], target_sparsity=0.5, train=TrainConfig(
            lr=2e-3, epochs=1, retrain_epochs=1, track_epochs=1), quiet=True)


def test_frozen_layers_are_left_out_and_the_rest_prunes_well():
    """A digits MLP with its first layer frozen, mu[pseudo] at 90%: the frozen layer scored +inf
    everywhere and the trainable ones were cut to the cap (train accuracy 0.10)."""
    from mustat.training import evaluate, train_epochs

    data = mustat.data.load("digits")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build("mlp", data.input_shape, 10)
    model[1].requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-3)
    est = mustat.make_estimator("pseudo", model)
    assert est.names == ["3.weight", "5.weight"]
    train_epochs(model, opt, (data.X_train, data.y_train), epochs=20, batch_size=64,
                 generator=torch.Generator().manual_seed(0), estimators=[est], track_epochs=10)
    rep = mustat.prune(model, mustat.score(model, "mu", se=est.se()), sparsity=0.9)
    assert rep.names == ("3.weight", "5.weight") and rep.sparsity == pytest.approx(0.9, abs=1e-3)
    assert int((model[1].weight == 0).sum()) == 0
    train_epochs(model, opt, (data.X_train, data.y_train), epochs=10, batch_size=64,
                 generator=torch.Generator().manual_seed(1))
    # 0.88 here (magnitude: 0.99; trajectory M&U trails it, docs/REPRODUCTION.md), where it was 0.10
    assert evaluate(model, (data.X_train, data.y_train))[0] > 0.8


def test_schedules():
    assert schedule("geometric", 0.95) == [0.5, 0.75, 0.875, 0.9375, 0.95]
    assert schedule("oneshot", 0.9) == [0.9]
    g = schedule("gradual", 0.9, rounds=4)
    assert g[-1] == pytest.approx(0.9) and all(a < b for a, b in zip(g, g[1:]))
    assert g[0] == pytest.approx(0.9 * (1 - 0.75**3))


def test_models_build_and_run():
    assert build("lenet5", (1, 28, 28), 10)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert build("vgg", (3, 32, 32), 10)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert build("glm", (5,), 1, task="regression")(torch.zeros(3, 5)).shape == (3,)
    assert build("glm", (5,), 3)(torch.zeros(3, 5)).shape == (3, 3)
    with pytest.raises(ValueError, match="vgg expects 32x32"):
        build("vgg", (1, 28, 28), 10)


def test_expand_pairs_criteria_with_estimators():
    assert expand(["mu", "magnitude"], ["pseudo", "curvature"]) == [("mu", "pseudo"), ("mu", "curvature"), ("magnitude", None)]
    assert expand(["mu[wald]", "random"], []) == [("mu", "wald"), ("random", None)]
    with pytest.raises(ValueError, match="needs standard errors"):
        expand(["mu"], [])
    with pytest.raises(ValueError, match="malformed"):
        expand(["mu[pseudo"], [])


def test_regression_dataset_reports_its_loss(tmp_path, capsys):
    # standardised inputs give a linear-Gaussian GLM the same curvature at every weight: the fit says so
    with pytest.warns(DegenerateSEWarning, match=r"mu\[curvature\] is magnitude pruning\. This is right"):
        assert main(["prune", "--dataset", "synthetic-linear", "--model", "glm", "--criteria", "magnitude,mu[curvature]",
                     "--out", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr().out
    assert "test loss (synthetic-linear" in out and "nan" not in out.lower()


def test_dropout_models_are_reproducible_and_global_rng_untouched(tmp_path, monkeypatch):
    def dropout_mlp(input_shape, n_outputs):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                   torch.nn.Dropout(0.5), torch.nn.Linear(32, n_outputs))

    monkeypatch.setitem(mustat.models.MODELS, "dropout-mlp", dropout_mlp)
    cfg = TrainConfig(epochs=2, retrain_epochs=1, track_epochs=1)
    kw = dict(model="dropout-mlp", criteria=["magnitude"], se=[], target_sparsity=0.8, train=cfg, quiet=True)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = run(out=tmp_path / "a", **kw)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is left alone
    torch.manual_seed(999)  # a different global state must not change the results
    b = run(out=tmp_path / "b", **kw)
    pd.testing.assert_frame_equal(a, b)


def test_parallel_workers_give_the_serial_numbers_at_one_thread(tmp_path):
    """--workers trains the dense models, then every (seed, criterion), in processes of one torch
    thread: the same results as a serial run at one thread, in the same order."""
    cfg = TrainConfig(epochs=2, retrain_epochs=1, track_epochs=1)
    kw = dict(criteria=["mu", "magnitude"], se=["pseudo"], seeds=(0, 1), target_sparsity=0.8, train=cfg, quiet=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = run(out=tmp_path / "serial", **kw)
    finally:
        torch.set_num_threads(threads)
    parallel = run(out=tmp_path / "parallel", workers=2, **kw)
    pd.testing.assert_frame_equal(parallel, serial, check_exact=True)
    assert (tmp_path / "parallel" / "results.csv").read_bytes() == (tmp_path / "serial" / "results.csv").read_bytes()
    with pytest.raises(ValueError, match="workers must be in"):
        run(out=tmp_path / "x", workers=0, **kw)


def test_the_figure_says_what_it_shows():
    """Title (dataset, model, scope, seeds), a chance line, and a log compression axis on which the
    high sparsities sit apart (0.9375 and 0.95 were crowded together on a linear one)."""
    import matplotlib.pyplot as plt

    from mustat.results import figure, title

    rows = [dict(label="dense", target_sparsity=0.0, test_accuracy=0.97, seed=0)]
    rows += [dict(label="magnitude", target_sparsity=s, test_accuracy=0.9, seed=0) for s in (0.5, 0.9375, 0.95)]
    fig = figure(pd.DataFrame(rows), title=title("digits", "mlp", "global", [0, 1, 2]), chance=0.1)
    ax = fig.axes[0]
    assert ax.get_title() == "digits / mlp / global scope; mean ± sd over seeds 0, 1, 2"
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["0.5", "0.9375", "0.95"]
    ticks = ax.get_xticks()
    assert ticks[2] / ticks[1] == pytest.approx(1.25)  # 16x to 20x compression
    assert any("chance" in line.get_label() and list(line.get_ydata()) == [0.1, 0.1] for line in ax.get_lines())
    plt.close(fig)


def test_a_finished_run_with_other_seeds_is_not_taken_over(tmp_path):
    cfg = TrainConfig(epochs=1, retrain_epochs=1, track_epochs=1)
    run(out=tmp_path, criteria=["magnitude"], target_sparsity=0.5, train=cfg, quiet=True, seeds=(0,))
    before = (tmp_path / "results.csv").read_bytes()
    with pytest.raises(ValueError, match="seeds"):
        run(out=tmp_path, criteria=["magnitude"], target_sparsity=0.5, train=cfg, quiet=True, seeds=(1,))
    assert (tmp_path / "results.csv").read_bytes() == before
