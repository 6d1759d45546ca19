"""Every code block of the README runs.

Each ```python block is self-contained and runs as written (the blocks are kept small and fast
for this), in a fresh namespace inside a temporary folder, with the package as installed. Each
```bash block's commands are checked without running them: a `mustat ...` line must parse with
the command's own parser (so a renamed subcommand or option fails here), a `python some/file.py`
line must name a file in the repository, a `make X` line a target of the Makefile.
"""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced block of ``lang`` in the README."""
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == lang]


def commands(code: str) -> list[list[str]]:
    """The commands of a shell block: comments dropped, backslash continuations joined."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(shlex.split(line))
    return out


PYTHON = blocks("python")
BASH = blocks("bash")


def test_readme_has_blocks():
    assert len(PYTHON) >= 5, "the quick starts lost their Python blocks"
    first = BASH[0][1]
    assert [c[:2] for c in commands(first)] == [["make", "run"], ["make", "test"]], \
        "the README must start with the two set-up commands"
    assert README.read_text().index("```bash") < README.read_text().index("\n## "), \
        "the set-up commands come before the first section"


@pytest.mark.parametrize("line,code", PYTHON, ids=[f"line{n}" for n, _ in PYTHON])
def test_python_block_runs(line, code, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # the blocks' own warnings are the library's business
            namespace = {"__name__": "__readme__"}
            exec(compile(code + "\n__ran_to_the_end__ = True\n", f"README.md:{line}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    assert namespace.get("__ran_to_the_end__") is True


def _parser():
    from mustat.cli import build_parser

    return build_parser()


@pytest.mark.parametrize("line,code", BASH, ids=[f"line{n}" for n, _ in BASH])
def test_shell_block_commands_exist(line, code):
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    for argv in commands(code):
        prog = Path(argv[0]).name
        if prog == "make":
            assert argv[1] in targets, f"README.md:{line}: make {argv[1]} is not a Makefile target"
        elif prog == "python":
            assert (ROOT / argv[1]).is_file(), f"README.md:{line}: {argv[1]} does not exist"
        elif prog in ("mustat", "torchrun"):
            args = argv[argv.index("mustat") + 1:] if prog == "torchrun" else argv[1:]
            try:
                ns = _parser().parse_args(args)
            except SystemExit as err:
                pytest.fail(f"README.md:{line}: `mustat {' '.join(args)}` does not parse ({err})")
            assert ns.command == args[0]
        else:
            pytest.fail(f"README.md:{line}: no check for the command {argv[0]!r}; add one to this test")
