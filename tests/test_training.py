"""The training loop and device handling: tensors in, callbacks out; device-safe state."""

import pytest
import torch
from torch import nn

from mustat.pipeline import TrainConfig, _load, dense_phase
from mustat.training import Callback, evaluate, resolve_device, train_epochs


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
    train_epochs(model, opt, X, y, epochs=2, batch_size=16, generator=torch.Generator().manual_seed(1), callbacks=[Log()])
    assert seen == [("start", 0, 2), ("end", 0, 2), ("start", 1, 2), ("end", 1, 2)]
    assert not model.training


def test_bf16_autocast_branch_runs_on_cpu():
    X, y = _data()
    runs = {}
    for amp in (False, True):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        before = evaluate(model, X, y)[1]
        train_epochs(model, opt, X, y, epochs=5, batch_size=16, generator=torch.Generator().manual_seed(1), amp=amp)
        runs[amp] = model[0].weight.detach().clone()
        assert evaluate(model, X, y)[1] < before  # it learns
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
    state, _ = dense_phase("mlp", data, TrainConfig(epochs=1, retrain_epochs=1, track_epochs=1), seed=0,
                           estimators=("pseudo",))
    path = tmp_path / "c.pt"
    torch.save(state, path)
    loaded = _load(path)
    assert loaded["generator"].device.type == "cpu" and loaded["generator"].dtype == torch.uint8
    assert all(t.device.type == "cpu" for t in loaded["model"].values())
    torch.Generator().set_state(loaded["generator"])  # restorable as it is


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_on_cuda(tmp_path):
    from mustat.pipeline import run

    cfg = TrainConfig(epochs=2, retrain_epochs=1, track_epochs=1)
    kw = dict(criteria=["mu", "magnitude"], se=["pseudo"], target_sparsity=0.8, config=cfg, quiet=True, device="cuda")
    full = run(out=tmp_path / "a", **kw)
    (tmp_path / "a" / "checkpoints" / "seed0-magnitude.pt").unlink()
    again = run(out=tmp_path / "a", **kw)
    assert (full.test_accuracy.values == again.test_accuracy.values).all()
