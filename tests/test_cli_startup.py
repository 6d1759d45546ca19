"""``mustat --help`` and every subcommand's help start without torch (issue 34): each runs in a fresh
process and the modules it imported are read back, which is deterministic where a timing is not
(benchmarks/cli_startup.py times them). Also: the package top imports its public names on first
use and every one still resolves; the static name lists the help prints equal the registries; the
estimators are listed by role, each name in exactly one role; names are checked after parsing;
and ``hf_progress_bars`` puts transformers' switches back."""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

import mustat
from mustat import _catalog
from mustat.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
#: modules that cost seconds together (torch alone about two) and that no help needs
HEAVY = ("torch", "numpy", "scipy", "pandas", "sklearn", "statsmodels", "transformers", "torch_pruning", "tqdm",
         "dask", "mustat.uncertainty", "mustat.criteria", "mustat.config", "mustat.data", "mustat.models")


def _subcommands() -> list[str]:
    return list(build_parser()._subparsers._group_actions[0].choices)


def _fresh(code: str, *args: str) -> subprocess.CompletedProcess:
    # the repository's packages first, as in the tests' own process; one thread: the box is shared
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


HELP = """
import json, sys
from mustat.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("\\n@@modules@@" + json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _heavy(modules) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_the_subcommands_are_all_there():
    # the parametrization below reads this list; a plugin command (calibrate) is in it too
    assert {"prune", "benchmark", "scale", "oneshot", "structured", "calibrate"} <= set(_subcommands())


@pytest.mark.parametrize("command", [None, *_subcommands()])
def test_help_prints_without_importing_torch(command):
    argv = [command, "--help"] if command else ["--help"]
    proc = _fresh(HELP, *argv)
    assert proc.returncode == 0, proc.stderr
    text, _, tail = proc.stdout.rpartition("\n@@modules@@")
    state = json.loads(tail)
    assert state["code"] == 0
    assert text.startswith(f"usage: mustat {command or ''}".rstrip())
    assert "mustat.cli" in state["modules"]  # the read-back itself works
    assert _heavy(state["modules"]) == [], f"mustat {' '.join(argv)} imported {_heavy(state['modules'])}"


def test_the_console_script_and_python_m_import_no_torch():
    """The installed entry point (``[project.scripts] mustat = "mustat.cli:main"``) and ``python -m
    mustat`` run through the package top, which must stay cheap: every import they make is listed
    by ``-X importtime`` and none is heavy."""
    script = Path(sys.executable).with_name("mustat")
    runs = [[sys.executable, "-X", "importtime", "-m", "mustat", "--help"]]
    if script.is_file():
        runs.append([str(script), "--help"])
    for argv in runs:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONPROFILEIMPORTTIME": "1"}
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("usage: mustat")
        modules = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
        assert "mustat.cli" in modules and "mustat" in modules
        assert _heavy(modules) == [], f"{argv[0]} imported {_heavy(modules)}"


# ------------------------------------------------------------------------------------ the package top
def test_importing_the_package_imports_no_torch_and_names_resolve_on_use():
    proc = _fresh("import sys, mustat\n"
                  "before = 'torch' in sys.modules\n"
                  "from mustat import prune, ESTIMATORS\n"
                  "print(before, 'torch' in sys.modules, prune.__module__, 'pseudo' in ESTIMATORS, mustat.wald.__module__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True", "mustat.pruning", "True", "mustat.stats"]


@pytest.mark.parametrize("name", mustat.__all__)
def test_every_public_name_resolves_to_its_definition(name):
    namespace: dict = {}
    exec(f"from mustat import {name} as value", namespace)  # the statement users write
    assert getattr(mustat, name) is namespace["value"]
    if name != "__version__":
        assert namespace["value"] is getattr(importlib.import_module(mustat._HOMES[name]), name)
    assert name in dir(mustat)


def test_the_lazy_table_matches_all_and_the_typing_imports():
    """``_HOMES`` (what runs) and the ``if TYPE_CHECKING:`` imports (what type checkers read) of
    ``mustat/__init__.py`` name the same modules for the same names, and together ``__all__``."""
    tree = ast.parse((ROOT / "mustat" / "__init__.py").read_text(encoding="utf-8"))
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    typed = {a.asname or a.name: node.module for node in block.body if isinstance(node, ast.ImportFrom)
             for a in node.names}
    assert typed == mustat._HOMES
    assert sorted(mustat.__all__) == sorted(["__version__", *mustat._HOMES])
    assert len(mustat.__all__) == len(set(mustat.__all__))


def test_submodules_and_unknown_names():
    assert mustat.models.MODELS is importlib.import_module("mustat.models").MODELS
    with pytest.raises(AttributeError, match=r"module 'mustat' has no attribute 'no_such_name'.*__all__"):
        mustat.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        exec("from mustat import no_such_name", {})


# ------------------------------------------------------------------------------------ static lists
def test_the_static_lists_equal_the_registries():
    from mustat import config
    from mustat.criteria import CRITERIA
    from mustat.data import DATASETS
    from mustat.layerwise.solve import METHODS, SCOPES
    from mustat.models import MODELS
    from mustat.structured.groups import BASELINES
    from mustat.uncertainty import default_estimators

    fix = "update mustat/_catalog.py, which the help reads so as not to import torch"
    assert _catalog.DATASETS == tuple(sorted(DATASETS)), fix
    assert _catalog.MODELS == tuple(sorted(MODELS)), fix
    assert _catalog.CRITERIA == tuple(sorted(CRITERIA)), fix
    assert _catalog.DEFAULT_CRITERIA == tuple(config.DEFAULT_CRITERIA), fix
    assert _catalog.DEFAULT_SE == tuple(config.DEFAULT_SE), fix
    assert _catalog.DEFAULT_MAX_TENSOR_SPARSITY == config.DEFAULT_MAX_TENSOR_SPARSITY, fix
    assert _catalog.DEFAULT_ESTIMATORS == tuple(default_estimators()), fix
    assert _catalog.TRAIN_DEFAULTS == asdict(config.TrainConfig()), fix
    assert _catalog.STRUCTURED_BASELINES == tuple(BASELINES), fix
    assert (_catalog.ONESHOT_METHODS, _catalog.ONESHOT_SCOPES) == (tuple(METHODS), tuple(SCOPES)), fix
    from mustat.layerwise.allocation import ALLOCATIONS
    from mustat.layerwise.solve import SIGMAS
    assert (_catalog.ONESHOT_SIGMAS, _catalog.ONESHOT_ALLOCATIONS) == (SIGMAS, ALLOCATIONS), fix


def _registered() -> list[str]:
    """Every name ``--se`` accepts from the built-in registry, in registration order."""
    from mustat.uncertainty import ESTIMATORS

    return [label for name, cls in ESTIMATORS.items() for label in (name, *cls.variants)]


def _role_of(label: str) -> str:
    """The role the registry implies: the pseudo bootstrap's family is the paper's statistic, every
    other name goes by the ``quantity`` its estimator reports with the variant's options."""
    from torch import nn

    from mustat.uncertainty import TrainingSetup, make_estimator, variant

    if variant(label)[0] == "pseudo":
        return "paper"
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    setup = TrainingSetup(optimizer="sgd", n=64, batch_size=8, window_steps=1000)
    return make_estimator(label, model, setup=setup).quantity


def test_every_estimator_is_in_exactly_one_role_the_one_the_registry_implies():
    roles = dict(zip(("paper", "sampling", "saliency"), _catalog.ESTIMATOR_ROLES))
    assert len(roles) == len(_catalog.ESTIMATOR_ROLES) == 3
    listed = [n for r in _catalog.ESTIMATOR_ROLES for n in (*r.estimators, *r.variants)]
    registered = _registered()
    assert sorted(listed) == sorted(registered), "update mustat/_catalog.py ESTIMATOR_ROLES"
    assert len(listed) == len(set(listed))
    from mustat.uncertainty import ESTIMATORS

    for key, role in roles.items():
        assert set(role.estimators) <= set(ESTIMATORS) and not set(role.variants) & set(ESTIMATORS)
        for label in (*role.estimators, *role.variants):
            assert _role_of(label) == key, f"{label} is listed under {role.title!r}"
        # registration order within a role, so the help reads like the registry
        order = {n: i for i, n in enumerate(registered)}
        assert list(role.estimators) == sorted(role.estimators, key=order.get)
        assert list(role.variants) == sorted(role.variants, key=order.get)


def test_prune_help_lists_each_estimator_once_one_line_per_role(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # wide: no wrapping, one line per role
    text = _subparser("prune").format_help()
    epilog = text[text.index("standard-error estimators (--se) by role:"):]
    for name in _registered():
        hits = re.findall(rf"(?<![\w-]){re.escape(name)}(?![\w-])", epilog)
        assert len(hits) == 1, f"{name} appears {len(hits)} times in the roles of prune --help"
    for role in _catalog.ESTIMATOR_ROLES:
        assert f"  {role.title}: {' '.join(role.estimators)}\n" in epilog
        assert f"      variants: {' '.join(role.variants)}\n" in epilog
    # the list of 28 names in one row is gone from the option's own help
    se_help = text[text.index("\n  --se SE"):text.index("\n  --scope")]
    assert "woodfisher" not in se_help and "(default: ['pseudo', 'kfac'])" in " ".join(se_help.split())


def test_narrow_terminals_wrap_the_roles_without_splitting_names(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    text = _subparser("prune").format_help()
    epilog = text[text.index("standard-error estimators (--se) by role:"):]
    assert max(len(line) for line in epilog.splitlines()) <= 58
    words = set(epilog.split())
    assert set(_registered()) <= words  # woodfisher-row-sandwich stays whole
    # a wrapped line hangs four spaces under its own: variants (6) continue at 10
    assert any(re.match(r" {10}[a-z]", line) for line in epilog.splitlines())


def _subparser(name: str):
    return build_parser()._subparsers._group_actions[0].choices[name]


# ------------------------------------------------------------------------------------ names checked after parsing
@pytest.mark.parametrize(("argv", "message"), [
    (["structured", "--dataset", "no-such-set"], "--dataset='no-such-set' is not valid; choose one of: breast_cancer"),
    (["structured", "--model", "no-such-net"], "--model='no-such-net' is not valid; choose one of: cnn1d"),
    (["prune", "--dataset", "no-such-set"], "dataset='no-such-set' is not valid; choose one of:"),
    (["prune", "--model", "no-such-net"], "model='no-such-net' is not valid; choose one of:"),
    (["prune", "--se", "no-such-se"], "se='no-such-se' is not valid; choose one of: batch-means"),
    (["oneshot", "x", "--method", "no-such-method"], "argument --method: invalid choice: 'no-such-method'"),
])
def test_a_wrong_name_is_refused_before_any_work_naming_the_valid_ones(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and f"mustat {argv[0]}" in err
    assert not out.exists()


def test_a_name_a_plugin_registers_is_accepted_although_the_help_does_not_list_it(tmp_path, monkeypatch):
    """The datasets the help lists are a static copy; the check after parsing reads the live registry."""
    import mustat.structured.schedule as schedule
    from mustat.data import DATASETS

    seen = {}
    monkeypatch.setitem(DATASETS, "plugin-set", DATASETS["digits"])
    monkeypatch.setattr(schedule, "run", lambda **kw: seen.update(kw) or (_ for _ in ()).throw(ValueError("stop")))
    with pytest.raises(SystemExit):
        main(["structured", "--dataset", "plugin-set", "--out", str(tmp_path)])
    assert seen["dataset"] == "plugin-set"
    assert "plugin-set" not in _subparser("structured").format_help()


def test_scale_defaults_to_magnitude_and_mu_with_each_default_estimator(tmp_path, monkeypatch):
    """``mustat scale --criteria`` defaults to the registry's default estimators, read when it runs."""
    import mustat.scaling as scaling
    from mustat.uncertainty import default_estimators

    seen = {}
    monkeypatch.setattr(scaling, "scale_experiment",
                        lambda **kw: seen.update(kw) or (_ for _ in ()).throw(ValueError("stop")))
    with pytest.raises(SystemExit):
        main(["scale", "--out", str(tmp_path)])
    assert seen["labels"] == ["magnitude", *(f"mu[{e}]" for e in default_estimators())]
    assert " ".join(seen["labels"]) in " ".join(_subparser("scale").format_help().split())


# ------------------------------------------------------------------------------------ --quiet
def test_hf_progress_bars_off_inside_and_put_back_after():
    pytest.importorskip("transformers")
    from huggingface_hub import utils as hub
    from transformers.utils import logging as tf_logging

    from mustat.layerwise.command import hf_progress_bars

    assert tf_logging.is_progress_bar_enabled() and not hub.are_progress_bars_disabled()
    hub.disable_progress_bars("huggingface_hub.some_group")  # a per-group switch survives too
    try:
        with pytest.raises(RuntimeError), hf_progress_bars(False):
            assert not tf_logging.is_progress_bar_enabled() and hub.are_progress_bars_disabled()
            raise RuntimeError  # put back on the way out of an error as well
        assert tf_logging.is_progress_bar_enabled() and not hub.are_progress_bars_disabled()
        assert hub.are_progress_bars_disabled("huggingface_hub.some_group")
        with hf_progress_bars(True):
            assert tf_logging.is_progress_bar_enabled()
        tf_logging.disable_progress_bar()  # switched off by the caller: stays off
        with hf_progress_bars(False):
            pass
        assert not tf_logging.is_progress_bar_enabled()
    finally:
        tf_logging.enable_progress_bar()
    assert tf_logging.is_progress_bar_enabled() and not hub.are_progress_bars_disabled()
