"""The documentation site (mkdocs.yml) builds strictly: no warning, no broken link or anchor, no
docstring that mkdocstrings cannot parse, and every public name has its API entry."""

from __future__ import annotations

import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import mustat
import validation

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"


def _documented(package: str) -> set[str]:
    """Names rendered by a ``::: package.name`` directive in the API pages."""
    text = "\n".join(p.read_text() for p in API.glob("*.md"))
    return set(re.findall(rf"^::: {package}\.(\w+)\s*$", text, re.M))


def test_every_public_name_has_an_api_entry():
    missing = set(mustat.__all__) - {"__version__"} - _documented("mustat")
    assert not missing, f"add `::: mustat.NAME` to a page in docs/api/ for {sorted(missing)}"
    modules = {m.name for m in pkgutil.iter_modules(validation.__path__) if not m.name.startswith("_")}
    missing = modules - _documented("validation")
    assert not missing, f"add `::: validation.MODULE` to docs/api/validation.md for {sorted(missing)}"


def test_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                          "--site-dir", str(site)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 0, f"mkdocs build --strict failed (pip install -e '.[dev]' installs mkdocs):\n{log[-6000:]}"
    assert "WARNING" not in log, log[-6000:]
    # the API reference rendered each name, and the notebooks the guides link to were copied
    html = "\n".join(p.read_text() for p in (site / "api").rglob("index.html"))
    absent = [n for n in mustat.__all__ if n != "__version__" and f'id="mustat.{n}"' not in html]
    assert not absent, absent
    linked = {m for p in (ROOT / "docs").rglob("*.md") for m in re.findall(r"notebooks/(\w+\.ipynb)\)", p.read_text())}
    assert linked
    for name in linked:
        assert (site / "repo" / "notebooks" / name).is_file(), name
