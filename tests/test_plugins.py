"""A newcomer's estimator, in one file outside the package, appears in `mustat prune --se`, the
calibration study and the benchmark with no other edit (MUSTAT_PLUGINS names the file)."""

import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

PLUGIN = textwrap.dedent('''
    """se = 1 everywhere: mu with it ranks as magnitude does."""
    import torch

    from mustat.uncertainty import Estimator, register_estimator


    @register_estimator("plugin-constant")
    class Constant(Estimator):
        needs = ()

        def se(self):
            return {n: torch.ones_like(w) for n, w in self._current_weights().items()}
''')

GRID = textwrap.dedent("""
    criteria = ["magnitude", "mu"]
    se = ["plugin-constant"]
    seeds = [0]
    target_sparsity = 0.8
    [[experiment]]
    dataset = "digits"
    model = "mlp"
    epochs = 2
    retrain_epochs = 1
    track_epochs = 1
""")

STUDY = textwrap.dedent("""
    designs = ["logistic"]
    replications = 2
    bootstrap_B = 4
    estimators = ["pseudo", "plugin-constant"]
    [[setting]]
    optimizer = "sgd"
    lr = 0.05
    epochs = 2
    window = 1
""")


def _mustat(tmp_path, *args):
    env = dict(os.environ, MUSTAT_PLUGINS=str(tmp_path / "my_estimator.py"), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-m", "mustat", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture
def plugin(tmp_path):
    (tmp_path / "my_estimator.py").write_text(PLUGIN)
    return tmp_path


@pytest.mark.slow   # 49 s: three end-to-end commands; test_a_broken_plugin_is_named stays in the default suite
def test_a_plugin_estimator_runs_in_prune_benchmark_and_study(plugin):
    tmp = plugin
    printed = _mustat(tmp, "prune", "--se", "plugin-constant", "--criteria", "mu,magnitude", "--epochs", "2",
                      "--retrain-epochs", "1", "--target-sparsity", "0.8", "--quiet", "--out", str(tmp / "run"))
    assert "mu[plugin-constant]" in printed
    df = pd.read_csv(tmp / "run" / "results.csv")
    mu, mag = df[df.label == "mu[plugin-constant]"], df[df.label == "magnitude"]
    # |w| / 1 ranks as |w|: the same masks, hence the same losses
    assert len(mu) == len(mag) > 0
    assert list(mu.test_loss) == list(mag.test_loss)

    (tmp / "grid.toml").write_text(GRID)
    _mustat(tmp, "benchmark", "--grid", str(tmp / "grid.toml"), "--out", str(tmp / "bench"), "--scheduler", "serial",
            "--quiet")
    summary = pd.read_csv(tmp / "bench" / "summary.csv")
    assert "mu[plugin-constant]" in set(summary.label)

    (tmp / "study.toml").write_text(STUDY)
    _mustat(tmp, "calibrate", "--grid", str(tmp / "study.toml"), "--out", str(tmp / "study"), "--scheduler", "serial",
            "--quiet")
    study = pd.read_csv(tmp / "study" / "summary.csv")
    assert "plugin-constant" in set(study.estimator)


def test_a_broken_plugin_is_named(tmp_path):
    # the package top is lazy (PEP 562): plugins load with the estimator registry, on its first use
    (tmp_path / "my_estimator.py").write_text("raise RuntimeError('boom')\n")
    env = dict(os.environ, MUSTAT_PLUGINS=str(tmp_path / "my_estimator.py"))
    done = subprocess.run([sys.executable, "-c", "import mustat; mustat.make_estimator"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "MUSTAT_PLUGINS: could not load" in done.stderr and "my_estimator.py" in done.stderr
