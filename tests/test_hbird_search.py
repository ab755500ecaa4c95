"""The Hummingbird memory indexes (torch and faiss) against brute force, and the search-cost benchmark."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neco.errors import ConfigError
from neco.eval.primitives.knn import FaissIndex, TorchIndex, make_index, resolve_search, search_blocks

HAS_FAISS = importlib.util.find_spec("faiss") is not None
BENCH = Path(__file__).resolve().parents[1] / "bench" / "hummingbird_cost.py"


def _bench():
    spec = importlib.util.spec_from_file_location("hummingbird_cost", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _data(m=500, q=60, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(m, d, generator=g), dim=1), F.normalize(torch.randn(q, d, generator=g), dim=1)


def _fill(index, memory, block=128):
    for s in range(0, memory.shape[0], block):  # filled block by block, as the memory builder does
        index.add(memory[s : s + block])
    return index


@pytest.mark.parametrize("block_elements", [None, 60 * 37])  # one memory block, or many merged top-k lists
def test_torch_index_matches_brute_force(block_elements):
    memory, queries = _data()
    index = _fill(TorchIndex(500, 16, torch.device("cpu"), torch.float32, block_elements=block_elements), memory)
    sims, idx = index.search(queries, 30)
    full = (queries.double() @ memory.double().T).numpy()
    want = np.argsort(-full, axis=1, kind="stable")[:, :30]
    assert np.array_equal(idx.numpy(), want)
    assert np.allclose(sims.numpy(), np.take_along_axis(full, want, 1), atol=1e-6)


def test_float16_memory_returns_exact_similarities_of_the_stored_rows():
    memory, queries = _data()
    index = _fill(TorchIndex(500, 16, torch.device("cpu"), torch.float16), memory)
    sims, idx = index.search(queries, 10)
    stored = memory.half().float()
    assert torch.allclose(sims, (queries[:, None, :] * stored[idx]).sum(-1), atol=1e-6)
    full = queries @ stored.T
    assert torch.allclose(sims, full.topk(10, dim=1).values, atol=1e-6)  # same top-10 values as brute force


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
def test_faiss_and_torch_agree():
    memory, queries = _data(seed=3)
    t = _fill(make_index("torch", 500, 16, torch.device("cpu"), "float32"), memory)
    f = _fill(make_index("faiss", 500, 16, torch.device("cpu")), memory)
    assert isinstance(f, FaissIndex) and f.size == 500
    ts, ti = search_blocks(t, queries, 30, query_block=7)
    fs, fi = search_blocks(f, queries, 30, query_block=25)
    assert torch.equal(ti, fi) and torch.allclose(ts, fs, atol=1e-5)


def test_resolve_search():
    cpu = torch.device("cpu")
    assert resolve_search("torch", cpu) == "torch"
    assert resolve_search("auto", cpu) == ("faiss" if HAS_FAISS else "torch")
    with pytest.raises(ConfigError, match="eval.hummingbird.search"):
        resolve_search("scann", cpu, "eval.hummingbird.search")


def test_time_retrieval_extrapolates_linearly():
    time_retrieval = _bench().time_retrieval
    res = time_retrieval(40_000, 3_000, dim=8, k=5, slice_memory=4_000, slice_queries=300, query_block=128)
    assert res["extrapolated"] and res["slice_memory"] == 4_000 and res["slice_queries"] == 300
    assert res["estimated_seconds"] == pytest.approx(res["slice_seconds"] * 100)
    full = time_retrieval(2_000, 100, dim=8, k=5)
    assert not full["extrapolated"] and full["estimated_seconds"] == full["slice_seconds"]


def test_bench_script_prints_an_extrapolation(capsys):
    res = _bench().main(["--memory", "20000", "--queries", "400", "--dim", "8", "--slice-memory", "2000",
                    "--slice-queries", "100", "--device", "cpu"])
    assert res["extrapolated"] and "EXTRAPOLATED" in capsys.readouterr().out
