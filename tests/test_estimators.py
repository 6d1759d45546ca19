"""The estimator protocol and registry: every registered estimator honours the same
contract, and a new one plugs into the pipeline and the study without other changes."""

import pandas as pd
import pytest
import torch
from conftest import train_steps
from torch import nn

import mustat
from mustat.cli import main
from mustat.uncertainty import (
    ESTIMATORS,
    DegenerateSEWarning,
    Estimator,
    FitContext,
    NotFittedError,
    get_estimator,
    make_estimator,
    register_estimator,
)

#: options that make each built-in estimator cheap (and wald well-posed) on the tiny MLP
OPTIONS = {"batch-means": dict(batch_steps=3), "bootstrap": dict(B=4, epochs=2, gtol=1e3), "wald": dict(damping=50.0)}  # far from a minimum after 12 steps


def _context(model, batch, opt):
    X, y = batch
    return FitContext(X=X, y=y, loss=nn.functional.cross_entropy, optimizer=opt, batch_size=len(y))


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_honours_the_contract(name, mlp, batch):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.05, weight_decay=1e-3)
    est = make_estimator(name, mlp, **OPTIONS.get(name, {}))
    assert est.name == name and est.trajectory is get_estimator(name).trajectory
    names = ["0.weight", "2.weight", "4.weight"]
    assert est.names == names
    if est.trajectory:
        est.attach(opt)
        est.reset()
    train_steps(mlp, opt, batch, 12)
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    mode = mlp.training
    est.fit(_context(mlp, batch, opt))
    se, estimate = est.se(), est.estimate()
    assert list(se) == names and list(estimate) == names
    for n in names:
        w = mlp.get_parameter(n)
        assert se[n].shape == w.shape and estimate[n].shape == w.shape
        assert not se[n].requires_grad and not torch.isnan(se[n]).any() and (se[n] >= 0).all()
    assert isinstance(est.diagnostics(), dict)
    # the user's model is untouched: parameters, buffers and mode
    assert all(torch.equal(v, mlp.state_dict()[k]) for k, v in before.items()) and mlp.training == mode
    # it plugs into the criteria
    scores = mustat.score(mlp, "mu", se=se, weights=estimate)
    assert set(scores) == set(names)
    # state round-trip: a fresh estimator loaded from the state gives the same answer
    fresh = make_estimator(name, mlp, **OPTIONS.get(name, {}))
    fresh.load_state_dict(est.state_dict())
    if est.trajectory:
        fresh.fit(_context(mlp, batch, opt))
        for n in names:
            torch.testing.assert_close(fresh.se()[n], se[n], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(set(ESTIMATORS) - {"pseudo"}))
def test_reading_before_fit_says_what_to_do(name, mlp):
    est = make_estimator(name, mlp, **OPTIONS.get(name, {}))
    with pytest.raises(NotFittedError, match="fit"):
        est.se()


@pytest.mark.parametrize("name, need", [("calibrated", "optimizer"), ("batch-means", "batch_size"),
                                        ("curvature", "X=.*y=.*loss="), ("wald", "X="), ("bootstrap", "X=.*loss=")])
def test_missing_context_names_the_fields(name, need, mlp, batch):
    opt = torch.optim.SGD(mlp.parameters(), lr=0.05)
    est = make_estimator(name, mlp, **OPTIONS.get(name, {}))
    if est.trajectory:
        est.attach(opt)
    train_steps(mlp, opt, batch, 8)
    with pytest.raises(ValueError, match=f"needs FitContext\\({need}"):
        est.fit(FitContext())


def test_unknown_estimator_lists_the_valid_ones(mlp):
    with pytest.raises(ValueError, match="se=.oracle. is not valid; choose one of: batch-means, block, bootstrap, calibrated"):
        make_estimator("oracle", mlp)
    with pytest.raises(TypeError, match="Estimator subclasses"):
        register_estimator("x")(object)
    with pytest.raises(ValueError, match="already registered"):
        register_estimator("pseudo")(type("Other", (Estimator,), {"se": lambda self: {}}))


def test_penalty_read_from_the_optimizer(mlp):
    assert FitContext(optimizer=torch.optim.SGD(mlp.parameters(), lr=0.1, weight_decay=0.01)).penalty() == 0.01
    groups = [{"params": mlp[0].parameters(), "weight_decay": 0.1}, {"params": mlp[2].parameters()}]
    with pytest.raises(ValueError, match="different weight_decay"):
        FitContext(optimizer=torch.optim.SGD(groups, lr=0.1)).penalty()
    with pytest.raises(ValueError, match="AdamW's decoupled"):
        FitContext(optimizer=torch.optim.AdamW(mlp.parameters(), weight_decay=0.01)).penalty()
    with pytest.raises(ValueError, match="X has 3 rows but y has 2"):
        FitContext(X=torch.zeros(3, 8), y=torch.zeros(2))


class Constant(Estimator):
    """se = 1 everywhere: mu with it is magnitude pruning."""

    def se(self):
        return {n: torch.ones_like(w) for n, w in self._current_weights().items()}


@pytest.fixture
def toy():
    register_estimator("toy-constant")(Constant)
    try:
        yield "toy-constant"
    finally:
        ESTIMATORS.pop("toy-constant")


def test_a_new_estimator_runs_through_mustat_prune(toy, tmp_path, capsys):
    # se = 1 everywhere is degenerate by design, and the fit says so
    with pytest.warns(DegenerateSEWarning, match=r"mu\[toy-constant\] is magnitude pruning"):
        assert main(["prune", "--se", toy, "--criteria", "mu,magnitude", "--epochs", "2", "--retrain-epochs", "1",
                     "--target-sparsity", "0.8", "--quiet", "--out", str(tmp_path)]) == 0
    assert "mu[toy-constant]" in capsys.readouterr().out
    df = pd.read_csv(tmp_path / "results.csv")
    mu, mag = df[df.label == "mu[toy-constant]"], df[df.label == "magnitude"]
    # |w| / 1 ranks exactly as |w|: the same masks, hence the same accuracies and losses
    assert len(mu) == len(mag) > 0
    pd.testing.assert_series_equal(mu.test_loss.reset_index(drop=True), mag.test_loss.reset_index(drop=True))


def test_a_new_estimator_runs_through_a_study(toy, tmp_path):
    from validation.estimators import Setting
    from validation.study import Grid, run_study

    grid = Grid(designs=("logistic",), settings=(Setting("sgd", 0.05, epochs=2, window=1),), replications=2,
                bootstrap_B=4, estimators=("pseudo", toy))
    with pytest.warns(DegenerateSEWarning, match="every finite SE equals 1 "):   # se = 1: degenerate by design
        summary, cells = run_study(grid, tmp_path, scheduler="serial", quiet=True)
    row = summary[summary.estimator == toy].iloc[0]
    ref = cells[(cells.estimator == toy)]
    assert (ref.se == 1).all()
    # pooled over the replications' weights (a new estimator needs no study code of its own)
    assert row.se_ratio_median == pytest.approx((1 / ref.ref_se).median())


def test_decoupled_weight_decay_is_refused_where_an_l2_penalty_is_assumed(mlp):
    """Adam(decoupled_weight_decay=True) was taken for an L2 penalty (AdamW was recognised by its
    class name only), and calibrated accepted AdamW."""
    for opt in (torch.optim.Adam(mlp.parameters(), weight_decay=0.01, decoupled_weight_decay=True),
                torch.optim.AdamW(mlp.parameters(), weight_decay=0.01)):
        assert mustat.uncertainty.decoupled_decay(opt)
        with pytest.raises(ValueError, match="decoupled weight decay is not an L2 penalty"):
            FitContext(optimizer=opt).penalty()
    assert not mustat.uncertainty.decoupled_decay(torch.optim.Adam(mlp.parameters(), weight_decay=0.01))
    setup = mustat.TrainingSetup(optimizer="adam", n=100, batch_size=10, window_steps=100,
                                 decoupled_weight_decay=True)
    with pytest.raises(ValueError, match="'calibrated' needs weight decay as an L2 penalty"):
        make_estimator("calibrated", mlp, setup=setup)
    est = make_estimator("calibrated", mlp)
    opt = torch.optim.AdamW(mlp.parameters(), weight_decay=0.01)
    est.attach(opt)
    X, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(mlp(X), y).backward()
        opt.step()
    with pytest.raises(ValueError, match="supports SGD and Adam, not AdamW"):
        est.fit(FitContext(optimizer=opt, batch_size=16, n=16))


def test_declared_needs_are_checked_before_any_training(mlp):
    setup = mustat.TrainingSetup(optimizer="adadelta", n=100, batch_size=10, window_steps=100)
    with pytest.raises(ValueError, match="'calibrated' supports the optimizers sgd, adam, not 'adadelta'"):
        make_estimator("calibrated", mlp, setup=setup)
    with pytest.raises(ValueError, match="at least 2 optimizer steps, the run gives 1"):
        make_estimator("pseudo", mlp, setup=mustat.TrainingSetup("adam", n=10, batch_size=10, window_steps=1))
    with pytest.warns(UserWarning, match="assumes minibatches drawn with replacement"):
        make_estimator("batch-means", mlp, setup=mustat.TrainingSetup("adam", 100, 10, 100, sampler="shuffle"))
    # options derived from the training: batch means splits the window into its batches
    assert make_estimator("batch-means", mlp, setup=mustat.TrainingSetup("adam", 100, 10, 400)).batch_steps == 20


def test_registration_checks_the_declarations():
    class NoState(Estimator):
        trajectory = True

        def se(self):
            return {}

    with pytest.raises(TypeError, match="must implement state_dict"):
        register_estimator("no-state")(NoState)
    bad = type("Bad", (Estimator,), {"se": lambda self: {}, "needs": ("labels",)})
    with pytest.raises(ValueError, match="needs has \\['labels'\\]"):
        register_estimator("bad-needs")(bad)
    assert "no-state" not in ESTIMATORS and "bad-needs" not in ESTIMATORS


@pytest.mark.parametrize("name", ["curvature", "wald", "bootstrap"])
def test_post_hoc_estimators_read_a_dataloader_as_they_read_tensors(name, mlp, batch):
    """Batches in, not whole datasets: the same SEs from a DataLoader (read batch by batch; the
    bootstrap gathers its rows) as from the tensors."""
    from torch.utils.data import DataLoader, TensorDataset

    X, y = batch
    loss = nn.functional.cross_entropy
    options = {"wald": dict(damping=50.0), "bootstrap": dict(B=3, epochs=2, gtol=1e3)}.get(name, {})
    a = make_estimator(name, mlp, **options).fit(FitContext(X=X, y=y, loss=loss, weight_decay=1e-3)).se()
    loader = DataLoader(TensorDataset(X, y), batch_size=24)  # 64 rows: 24 + 24 + 16
    b = make_estimator(name, mlp, **options).fit(FitContext(data=loader, loss=loss, weight_decay=1e-3)).se()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    assert FitContext(data=loader).n == 64
