"""The notebooks run top to bottom on tiny data (the results table and the starter model), executed as
`make notebooks` runs them (neco.notebooks.execute), from the repository root and from notebooks/ alike."""

from pathlib import Path

import pytest
from results_worker import record

from neco.eval.results import append_to_table
from neco.notebooks import execute

ROOT = Path(__file__).resolve().parents[1]


def _outputs(nb) -> str:
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.fixture
def quiet_env(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for var in ("NECO_RESULTS_CSV", "NECO_OUTPUT", "NECO_ROOT"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.slow
@pytest.mark.parametrize("start", [".", "notebooks"])
def test_results_notebook_finds_the_project_outputs_from_the_root_or_notebooks(tmp_path, quiet_env, start):
    # A project checkout: conf/train.yaml marks its root; the evaluations appended to outputs/results/.
    project = tmp_path / "project"
    (project / "conf").mkdir(parents=True)
    (project / "conf" / "train.yaml").write_text("defaults: []\n")
    (project / "notebooks").mkdir()
    append_to_table(project / "outputs" / "results", [record(0), record(1) | {"checkpoint": None}])
    nb = execute("results.ipynb", cwd=project / start, out_dir=tmp_path / "executed")
    text = _outputs(nb)
    assert f"4 rows from {project / 'outputs' / 'results' / 'results.csv'}" in text
    # The latest value of each (model, checkpoint, metric) is listed: k6 mIoU of the pretrained row is 13.5.
    assert "pretrained" in text and "13.50" in text and "last.pt (student)" in text
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert (tmp_path / "executed" / "results.ipynb").is_file()


@pytest.mark.slow
def test_feature_tour_notebook_from_the_repository_root(tmp_path, quiet_env):
    quiet_env.setenv("NECO_TOUR_SIZE", "64")
    nb = execute("feature_tour.ipynb", cwd=ROOT)
    text = _outputs(nb)
    assert "vit_tiny: patch 8" in text and "NN retrieval mIoU on 8 images" in text
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                 if "image/png" in o.get("data", {}))
    assert images == 3  # crops, neighbour ordering, retrieval maps


@pytest.mark.slow
def test_make_notebooks_names_a_failing_notebook_in_one_line(tmp_path, quiet_env):
    import subprocess
    import sys

    project = tmp_path / "project"  # no evaluation has run yet: no results table
    (project / "conf").mkdir(parents=True)
    (project / "conf" / "train.yaml").write_text("defaults: []\n")
    proc = subprocess.run([sys.executable, "-m", "neco.notebooks", "results.ipynb", "--cwd", str(project),
                           "--out", str(tmp_path / "executed")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    expected = project / "outputs" / "results" / "results.csv"
    assert proc.stderr.strip().splitlines() == [
        f"error: results.ipynb: FileNotFoundError: {expected}: no results yet; run `python -m neco.eval ...` first "
        "or set NECO_RESULTS_CSV"]
