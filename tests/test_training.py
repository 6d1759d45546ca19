"""The training loop and device handling: tensors or a DataLoader in, estimators and callbacks
out; divergence stops the run; device-safe state."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mustat.config import RunConfig, TrainConfig
from mustat.pipeline import dense_phase
from mustat.runs import load_checkpoint
from mustat.training import (
    Callback,
    DivergenceError,
    MinibatchSampler,
    evaluate,
    resolve_device,
    train_epochs,
)
from mustat.uncertainty import make_estimator


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _model():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def test_callbacks_see_every_epoch_and_mode_is_restored():
    X, y = _data()
    model = _model().eval()
    seen = []

    class Log(Callback):
        def on_epoch_start(self, epoch, epochs):
            seen.append(("start", epoch, epochs))

        def on_epoch_end(self, epoch, epochs):
            seen.append(("end", epoch, epochs))

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_epochs(model, opt, (X, y), epochs=2, batch_size=16, generator=torch.Generator().manual_seed(1), callbacks=[Log()])
    assert seen == [("start", 0, 2), ("end", 0, 2), ("start", 1, 2), ("end", 1, 2)]
    assert not model.training


def test_bf16_autocast_branch_runs_on_cpu():
    X, y = _data()
    runs = {}
    for amp in (False, True):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        before = evaluate(model, (X, y))[1]
        train_epochs(model, opt, (X, y), epochs=5, batch_size=16, generator=torch.Generator().manual_seed(1), amp=amp)
        runs[amp] = model[0].weight.detach().clone()
        assert evaluate(model, (X, y))[1] < before  # it learns
    # bf16 forward passes round differently, so the branch really ran
    assert not torch.equal(runs[True], runs[False])
    torch.testing.assert_close(runs[True], runs[False], rtol=0.1, atol=0.05)


def test_device_errors_name_what_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available here; available: cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="not supported .* float64"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="is not a device"):
        resolve_device("gpu0")
    assert resolve_device("auto").type == "cpu"


def test_checkpoints_load_on_the_cpu_and_generators_restore(tmp_path):
    """Generator states must come back as CPU ByteTensors whatever the training device was
    (torch.load(map_location=cuda) used to move them to the GPU and break every resume there)."""
    from mustat.data import load

    data = load("digits")
    config = RunConfig(criteria=["mu"], se=["pseudo"], train=TrainConfig(epochs=1, retrain_epochs=1, track_epochs=1))
    state = dense_phase(config, data, seed=0)
    path = tmp_path / "c.pt"
    torch.save(state, path)
    loaded = load_checkpoint(path)
    assert loaded["generator"].device.type == "cpu" and loaded["generator"].dtype == torch.uint8
    assert all(t.device.type == "cpu" for t in loaded["model"].values())
    torch.Generator().set_state(loaded["generator"])  # restorable as it is


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_on_cuda(tmp_path):
    from mustat.pipeline import run

    cfg = TrainConfig(epochs=2, retrain_epochs=1, track_epochs=1)
    kw = dict(criteria=["mu", "magnitude"], se=["pseudo"], target_sparsity=0.8, train=cfg, quiet=True, device="cuda")
    full = run(out=tmp_path / "a", **kw)
    (tmp_path / "a" / "checkpoints" / "seed0-magnitude.pt").unlink()
    again = run(out=tmp_path / "a", **kw)
    assert (full.test_accuracy.values == again.test_accuracy.values).all()


@pytest.mark.parametrize("sampler", ["shuffle", "replacement"])
def test_a_dataloader_trains_exactly_as_tensors_do(sampler):
    """The same batches in the same order give the same numbers (MinibatchSampler draws the
    tensor path's minibatches for a DataLoader); estimators see the same trajectory too."""
    X, y = _data(70)
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind in ("tensors", "loader"):
            model = _model()
            opt = torch.optim.Adam(model.parameters(), lr=0.01)
            est = make_estimator("pseudo", model)
            if kind == "tensors":
                train_epochs(model, opt, (X, y), epochs=3, batch_size=16, sampler=sampler,
                             generator=torch.Generator().manual_seed(4), estimators=[est], track_epochs=2)
            else:
                loader = DataLoader(TensorDataset(X, y), batch_sampler=MinibatchSampler(
                    70, 16, sampler, torch.Generator().manual_seed(4)))
                train_epochs(model, opt, loader, epochs=3, estimators=[est], track_epochs=2)
            runs[kind] = ({k: v.clone() for k, v in model.state_dict().items()}, est.se(), evaluate(model, loader_or(X, y)))
    finally:
        torch.set_num_threads(threads)
    (w1, se1, ev1), (w2, se2, ev2) = runs["tensors"], runs["loader"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert all(torch.equal(se1[k], se2[k]) for k in se1)
    assert ev1 == ev2
    assert not est._steps == 0 and len(opt._optimizer_step_post_hooks) == 0  # the estimator was detached


def loader_or(X, y):
    return DataLoader(TensorDataset(X, y), batch_size=13)


def test_evaluate_reads_a_dataloader_like_tensors():
    X, y = _data(70)
    model = _model()
    acc, loss = evaluate(model, (X, y))
    acc2, loss2 = evaluate(model, DataLoader(TensorDataset(X, y), batch_size=9))
    assert acc == pytest.approx(acc2, abs=1e-12)
    assert loss == pytest.approx(loss2, rel=1e-6)


@pytest.mark.parametrize("opt_kind", ["adam", "sgd"])
def test_divergence_stops_with_the_epoch_named(opt_kind):
    """Adam at lr 1e3 ends with a finite but enormous loss, SGD with NaN; both are errors
    naming the epoch, and the caller's model is left in train/eval mode as it was."""
    X, y = _data(128)
    model = _model()
    opt = (torch.optim.Adam(model.parameters(), lr=1e3) if opt_kind == "adam"
           else torch.optim.SGD(model.parameters(), lr=1e6))
    with pytest.raises(DivergenceError, match="diverged at epoch") as err:
        train_epochs(model, opt, (X, y), epochs=20, batch_size=16, generator=torch.Generator().manual_seed(1))
    assert err.value.epoch < 20
    assert model.training


def test_tensor_training_needs_a_generator_and_rejects_iterators():
    X, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="needs generator="):
        train_epochs(model, opt, (X, y), epochs=1, batch_size=8)
    with pytest.raises(TypeError, match="read only once"):
        train_epochs(model, opt, iter([(X, y)]), epochs=1)
