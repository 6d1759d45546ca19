"""Every notebook runs headless, top to bottom, with small parameters."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

SMALL = {
    "01_prune_with_mu.ipynb": "EPOCHS = 3\nRETRAIN_EPOCHS = 1\nSPARSITIES = [0.5, 0.9]\nWEIGHT_DECAY = 1e-3\nSEED = 0",
    "02_wald_statistics.ipynb": "MLP_EPOCHS = 4\nWINDOW = 3\nSEED = 0",
    "03_calibration_study.ipynb": ('REPLICATIONS = 2\nEPOCHS = 4\nWINDOW = 3\nBOOTSTRAP_B = 8\nTEACHER_REPLICATES = 4\n'
                                   'MLP_EPOCHS = 3\nMLP_WINDOW = 2\nOUT = "calibration_study"'),
}


def test_all_notebooks_are_covered():
    assert {p.name for p in NOTEBOOKS} == set(SMALL)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "each notebook has one cell tagged 'parameters'"
    params[0].source = SMALL[path.name]
    # raises CellExecutionError, with the cell and traceback, on any error
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
