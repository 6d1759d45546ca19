"""Fault injection: a run killed (SIGKILL) during the dense phase, mid-round or while writing
resumes to results identical to an uninterrupted run; damaged files are named, with what to do,
before anything is overwritten; one folder, one run at a time; a diverging run stops cleanly."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from mustat.cli import main
from mustat.runs import FolderLock

ARGS = ["prune", "--criteria", "magnitude,mu", "--se", "pseudo", "--epochs", "2", "--retrain-epochs", "1",
        "--track-epochs", "1", "--target-sparsity", "0.8", "--seeds", "0", "--device", "cpu", "--quiet"]

#: runs mustat in a child process that SIGKILLs itself at a chosen point
KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    point, count = sys.argv[1], int(sys.argv[2])
    seen = [0]

    def hit():
        seen[0] += 1
        if seen[0] == count:
            os.kill(os.getpid(), signal.SIGKILL)

    if point == "step":      # the count-th optimizer step (dense phase or retraining)
        from torch.optim.optimizer import register_optimizer_step_post_hook
        register_optimizer_step_post_hook(lambda *a: hit())
    elif point == "write":   # after the count-th file is written, before it is renamed into place
        real = os.replace
        def replace(src, dst):
            hit()
            return real(src, dst)
        os.replace = replace
    from mustat.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def _run(tmp_path, out, point="none", count=0):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(script), point, str(count), *ARGS, "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    done = _run(tmp, tmp / "ref")
    assert done.returncode == 0, done.stderr[-2000:]
    return (tmp / "ref" / "results.csv").read_bytes()


# digits: 1293 training rows, batch 64 -> 21 steps an epoch: step 5 is in the dense phase, step 50
# in the first retraining round of the first criterion; the 3rd write is a criterion's checkpoint
@pytest.mark.parametrize("point, count", [("step", 5), pytest.param("step", 50, marks=pytest.mark.slow),
                                          ("write", 3)])
def test_sigkill_then_resume_gives_identical_results(tmp_path, reference, point, count):
    out = tmp_path / "run"
    killed = _run(tmp_path, out, point, count)
    assert killed.returncode == -signal.SIGKILL
    resumed = _run(tmp_path, out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "results.csv").read_bytes() == reference


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_checkpoint_is_named_and_nothing_is_overwritten(tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert main([*ARGS, "--out", str(out)]) == 0
    before = (out / "results.csv").read_bytes()
    victim = out / "checkpoints" / ("seed0-magnitude.pt" if damage == "truncate" else "seed0-dense.pt")
    data = victim.read_bytes()
    victim.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 10, "empty": b""}[damage])
    with pytest.raises(SystemExit) as exit_:
        main([*ARGS, "--out", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert str(victim) in err and "delete it" in err and "weights_only" not in err
    assert (out / "results.csv").read_bytes() == before
    victim.unlink()  # as the message says: the part is redone, the rest kept
    assert main([*ARGS, "--out", str(out)]) == 0
    assert (out / "results.csv").read_bytes() == before


def test_damaged_settings_and_results_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*ARGS, "--out", str(out)]) == 0
    before = (out / "results.csv").read_bytes()
    (out / "results.csv").write_text("garbage,\n\x00\x01")  # derived from the checkpoints: rewritten
    assert main([*ARGS, "--out", str(out)]) == 0
    assert (out / "results.csv").read_bytes() == before
    (out / "params.json").write_text("{not json")
    with pytest.raises(SystemExit):
        main([*ARGS, "--out", str(out)])
    assert str(out / "params.json") in capsys.readouterr().err


def test_a_second_run_on_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with FolderLock(out):  # as a first run would hold it
        with pytest.raises(SystemExit):
            main([*ARGS, "--out", str(out)])
    assert "another mustat run is using" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()
    assert main([*ARGS, "--out", str(out)]) == 0  # released: the folder is usable again


def test_a_diverging_run_stops_with_the_epoch_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main([*ARGS, "--lr", "1000", "--out", str(out)])
    assert exit_.value.code == 2
    assert "training diverged at epoch" in capsys.readouterr().err
    assert not (out / "checkpoints").exists() and not (out / "results.csv").exists()
    # the failed run finished nothing, so the corrected settings may use the folder
    assert main([*ARGS, "--out", str(out)]) == 0
