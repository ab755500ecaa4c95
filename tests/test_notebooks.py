"""The notebooks run top to bottom on tiny data (the results table and the starter model)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from results_worker import record

from neco.eval.results import append_to_table

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _execute(name: str, tmp_path: Path, env: dict) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env | {"OMP_NUM_THREADS": "1"})
    try:
        client = NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def _outputs(nb) -> str:
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.slow
def test_results_notebook(tmp_path):
    append_to_table(tmp_path / "results", [record(0), record(1) | {"checkpoint": None}])
    nb = _execute("results.ipynb", tmp_path, {"NECO_RESULTS_CSV": str(tmp_path / "results" / "results.csv")})
    text = _outputs(nb)
    assert "4 rows from" in text
    # The latest value of each (model, checkpoint, metric) is listed: k6 mIoU of the pretrained row is 13.5.
    assert "pretrained" in text and "13.50" in text and "last.pt (student)" in text
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.slow
def test_feature_tour_notebook(tmp_path):
    nb = _execute("feature_tour.ipynb", tmp_path, {"NECO_TOUR_SIZE": "64"})
    text = _outputs(nb)
    assert "vit_tiny: patch 8" in text and "NN retrieval mIoU on 8 images" in text
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                 if "image/png" in o.get("data", {}))
    assert images == 3  # crops, neighbour ordering, retrieval maps
