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
