"""results.json and the shared results table (CSV + Markdown), including concurrent appends."""

import json
import multiprocessing as mp

import pytest
from results_worker import append, record

from neco.errors import ConfigError
from neco.eval.results import append_to_table, read_table, render_markdown, write_results_json
from neco.eval.runner import selected_protocols


def test_results_json_is_plain_json(tmp_path):
    rec = record() | {"metrics": {"miou": float("nan")}, "extra": {"per_class": (0.5, 1.0)}}
    path = write_results_json(tmp_path / "results.json", [rec])
    back = json.loads(path.read_text())
    assert back[0]["metrics"]["miou"] is None  # NaN is not JSON
    assert back[0]["extra"]["per_class"] == [0.5, 1.0]


def test_table_rows_and_markdown(tmp_path):
    csv_path, md_path = append_to_table(tmp_path, [record()])
    rows = read_table(csv_path)
    assert [(r["metric"], r["value"]) for r in rows] == [("k6/miou", "12.5000"), ("k50/miou", "40.0000")]
    assert json.loads(rows[0]["options"]) == {"ks": [6, 50], "seeds": [0]}
    md = md_path.read_text()
    assert md.count("\n") == 4 and "last.pt (student)" in md
    assert render_markdown(rows) == md


def test_concurrent_appends_lose_nothing(tmp_path):
    with mp.get_context("spawn").Pool(4) as pool:
        pool.map(append, [(str(tmp_path), i) for i in range(12)])
    rows = read_table(tmp_path / "results.csv")
    assert len(rows) == 24
    assert sorted({r["run_dir"] for r in rows}) == sorted(f"/runs/{i}" for i in range(12))
    # One header only, and the Markdown table holds every row.
    assert (tmp_path / "results.csv").read_text().count("date,model") == 1
    assert (tmp_path / "results.md").read_text().count("\n") == 26


def test_protocol_selection():
    assert list(selected_protocols({"overcluster": {}, "linear": {"epochs": 2}})) == ["overcluster", "linear"]
    assert selected_protocols({"quick": {"image_size": 96}}) == {"quick": {"image_size": 96}}
    with pytest.raises(ConfigError, match="unknown protocol"):
        selected_protocols({"hummingbrd": {}})
    with pytest.raises(ConfigError, match="no evaluation protocol"):
        selected_protocols({})
    # A training monitor setting under eval is named as such, with where it belongs.
    with pytest.raises(ConfigError, match=r"eval.image_size: not an evaluation protocol; .* monitor.image_size"):
        selected_protocols({"quick": {}, "image_size": 96})
    with pytest.raises(ConfigError, match="eval.k"):
        selected_protocols({"overcluster": {}, "k": 3})
