"""Data-parallel training on 2 gloo ranks (CPU) reproduces the single-process run."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from mustat.cli import main

ARGS = ["prune", "--criteria", "mu,magnitude,random", "--se", "pseudo,calibrated", "--epochs", "2",
        "--retrain-epochs", "1", "--target-sparsity", "0.8", "--seeds", "0", "--device", "cpu", "--quiet"]


def _torchrun(out, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mustat", *ARGS, "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_gloo_ranks_match_one_process(tmp_path):
    assert main([*ARGS, "--out", str(tmp_path / "one")]) == 0
    printed = _torchrun(tmp_path / "two").stdout
    assert printed.count("test accuracy (digits") == 1  # only rank 0 reports
    one = pd.read_csv(tmp_path / "one" / "results.csv")
    two = pd.read_csv(tmp_path / "two" / "results.csv")
    pd.testing.assert_frame_equal(one.drop(columns=["test_accuracy", "test_loss", "val_accuracy"]),
                                  two.drop(columns=["test_accuracy", "test_loss", "val_accuracy"]))
    # the same predictions up to float32 reduction order: accuracies within one test sample
    n_test = 450
    assert np.abs(one.test_accuracy - two.test_accuracy).max() <= 1 / n_test + 1e-12
    np.testing.assert_allclose(two.test_loss, one.test_loss, rtol=1e-4)
    for label in ["mu-pseudo", "mu-calibrated", "magnitude", "random"]:
        a = torch.load(tmp_path / "one" / "checkpoints" / f"seed0-{label}.pt")["model"]
        b = torch.load(tmp_path / "two" / "checkpoints" / f"seed0-{label}.pt")["model"]
        for key in a:
            if key.endswith(".mask"):
                assert torch.equal(a[key], b[key]), (label, key)  # identical masks
            else:
                # gradients summed over 2 shards instead of 1 batch: float32 rounding (~1e-7
                # relative per step) carried through ~60 Adam steps
                torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow   # 33 s; resuming is covered in one process by test_faults and test_pipeline
def test_resume_under_two_ranks(tmp_path):
    _torchrun(tmp_path / "run")
    first = pd.read_csv(tmp_path / "run" / "results.csv")
    (tmp_path / "run" / "checkpoints" / "seed0-random.pt").unlink()  # lose one finished criterion
    _torchrun(tmp_path / "run")
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "run" / "results.csv"), first)


@pytest.mark.parametrize("n", [1, 3])
def test_shard_covers_the_batch_once(n, monkeypatch):
    from mustat import distributed

    idx = torch.arange(10)
    parts = []
    for r in range(n):
        monkeypatch.setattr(distributed, "rank_world", lambda r=r: (r, n))
        parts.append(distributed.shard(idx))
    assert sorted(torch.cat(parts).tolist()) == list(range(10))


SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from torch import nn
from mustat.training import seeded, train_epochs

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.unused = nn.Linear(3, 2), nn.Linear(2, 2)  # `unused` never gets a gradient

    def forward(self, x):
        return self.body(x)


g = torch.Generator().manual_seed(0)
X, y = torch.randn(9, 3, generator=g), torch.randint(0, 2, (9,), generator=g)
torch.manual_seed(0)
model = Net()
opt = torch.optim.Adam(model.parameters(), lr=0.1)
# 9 rows in batches of 4: the last batch has one row, so rank 1's shard of it is empty
train_epochs(model, opt, (X, y), epochs=3, batch_size=4, sampler="shuffle", generator=torch.Generator().manual_seed(1))
out = {"weights": model.body.weight.flatten().tolist(), "unused_grad_is_none": model.unused.weight.grad is None}
with seeded(model, 5):
    out["dropout_draw"] = torch.rand(3).tolist()
bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
try:
    train_epochs(bn, torch.optim.SGD(bn.parameters(), lr=0.1), (X, y), epochs=1, batch_size=4,
                 generator=torch.Generator().manual_seed(1), loss=lambda o, t: o.square().mean())
    out["batchnorm"] = "trained"
except ValueError as err:
    out["batchnorm"] = str(err)
json.dump(out, open(sys.argv[1] + f"/rank{rank}.json", "w"))
"""


def test_uneven_shards_unused_parameters_dropout_and_batchnorm_under_two_ranks(tmp_path):
    """An empty shard and a parameter no rank reaches used to make ranks all-reduce different
    sizes (a hang); dropout was seeded alike on every rank; BatchNorm normalised by shard."""
    import json

    from mustat.training import seeded, train_epochs

    (tmp_path / "script.py").write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(tmp_path / "script.py"), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # one process, same data and batches
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(9, 3, generator=g), torch.randint(0, 2, (9,), generator=g)
    torch.manual_seed(0)
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.unused = nn.Linear(3, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.body(x)

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    train_epochs(model, opt, (X, y), epochs=3, batch_size=4, sampler="shuffle", generator=torch.Generator().manual_seed(1))
    for r in ranks:
        np.testing.assert_allclose(r["weights"], model.body.weight.detach().flatten().tolist(), rtol=1e-5, atol=1e-6)
        assert r["unused_grad_is_none"]
        assert "BatchNorm" in r["batchnorm"] and "SyncBatchNorm" in r["batchnorm"]
    assert ranks[0]["dropout_draw"] != ranks[1]["dropout_draw"]  # independent dropout streams
    with seeded(model, 5):
        assert torch.rand(3).tolist() == ranks[0]["dropout_draw"]  # rank 0 draws what one process draws
