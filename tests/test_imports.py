"""The package's import graph, read statically: no circles, and no module reaches up to the package
top (``import mustat``, ``from mustat import prune``) that imports everything.

Every ``import`` and ``from ... import`` in every module under ``mustat/`` counts, at module level
and inside functions alike (the command's lazy imports included), so a circle cannot hide behind a
deferred import. ``from mustat import _masking`` names a submodule: it is an arrow to
``mustat/_masking.py``, not to the package top. Entering a submodule runs its package's
``__init__.py`` first; that implicit step is no arrow (otherwise every module would sit on a circle
through ``mustat/__init__.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mustat"

# What is known and not removed here, each with its reason. Remove an entry when its cause is gone;
# nothing may be added without one.
KNOWN_CIRCLES: dict[frozenset[str], str] = {}
KNOWN_UPWARD: dict[str, str] = {}


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(module: str) -> list[tuple[int, str, str | None]]:
    """``(line, imported module, name taken from it or None)`` for every import of ``module``,
    relative ones resolved."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out += [(node.lineno, base, alias.name) for alias in node.names]
    return out


def _ours(name: str) -> bool:
    return name == "mustat" or name.startswith("mustat.")


def _arrows(module: str) -> set[str]:
    """The modules of the package that ``module`` imports (a ``from P import M`` with M a submodule
    of P is an arrow to P.M)."""
    out = set()
    for _, base, name in _imports(module):
        if _ours(base):
            out.add(f"{base}.{name}" if name and f"{base}.{name}" in MODULES else base)
    return out - {module}


def _upward(module: str) -> list[str]:
    """``module``'s imports of the package top: ``import mustat`` or ``from mustat import X`` where
    X is a name of ``mustat/__init__.py``, not a submodule."""
    return [f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}"
            for line, base, name in _imports(module)
            if base == "mustat" and (name is None or f"mustat.{name}" not in MODULES)]


def _circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_reader_sees_what_it_must():
    """The graph reader itself: the modules are there, a submodule named by ``from mustat import``
    is an arrow to it, and the tools find a planted circle and a planted upward import."""
    assert {"mustat", "mustat.cli", "mustat._masking", "mustat.structured", "mustat.structured.command"} <= set(MODULES)
    assert "mustat._masking" in _arrows("mustat._params") and "mustat" not in _arrows("mustat._params")
    assert "mustat.pipeline" in _arrows("mustat.cli")  # a lazy import is an arrow too
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert _circles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module", sorted(set(MODULES) - {"mustat"}))
def test_no_module_imports_the_package_top(module):
    upward = _upward(module)
    if upward and module in KNOWN_UPWARD:
        pytest.xfail(KNOWN_UPWARD[module])
    assert not upward, (f"{', '.join(upward)} imports the package top: import the submodule that defines "
                        "the name (from mustat.pruning import prune)")


def test_no_import_circles():
    graph = {m: {a for a in _arrows(m) if a in MODULES} for m in MODULES}
    circles = _circles(graph)
    unknown = [sorted(c) for c in circles if c not in KNOWN_CIRCLES]
    assert not unknown, (f"import circles {unknown}: move what both sides need into a lower module, "
                         "or import it where it is defined")
    if circles:
        pytest.xfail("; ".join(f"{sorted(c)}: {KNOWN_CIRCLES[c]}" for c in circles))


def test_public_api_and_version_have_one_home():
    import mustat
    from mustat._version import __version__
    from mustat.runs import versions

    assert all(hasattr(mustat, name) for name in mustat.__all__)
    assert mustat.__version__ == __version__ == versions()["mustat"]
