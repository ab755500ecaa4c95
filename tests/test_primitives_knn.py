"""The one exact top-k search (neco.eval.primitives.knn) against brute force: ties, blocks, options, backends."""

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neco.errors import ConfigError
from neco.eval.primitives import knn
from neco.eval.primitives.knn import TorchIndex, knn_search, make_index, resolve_search, search_blocks

HAS_FAISS = importlib.util.find_spec("faiss") is not None
# (query_block, memory_block): one shot, many small blocks, memory blocks below k, uneven last blocks
BLOCKS = [(None, None), (1000, 1000), (7, 13), (5, 2), (64, 3), (3, 1)]


def _brute(q, m, k):
    """float64 similarities; order by similarity, then lower memory row first (a stable sort)."""
    s = q.double().numpy() @ m.double().numpy().T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


def _integer_rows(n, d, seed):
    # Entries in {-1, 0, 1}: few distinct similarities (many exact ties), all exact in float16 and float32.
    return torch.randint(-1, 2, (n, d), generator=torch.Generator().manual_seed(seed)).float()


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.mark.parametrize("query_block,memory_block", BLOCKS)
def test_lowest_index_ties_equal_brute_force_for_any_blocks(query_block, memory_block):
    q, m = _integer_rows(40, 4, 0), _integer_rows(90, 4, 1)
    want_s, want_i = _brute(q, m, 12)
    s, i = knn_search(q, m, 12, ties="lowest_index", query_block=query_block, memory_block=memory_block)
    assert np.array_equal(i.numpy(), want_i)
    assert np.array_equal(s.double().numpy(), want_s)


@pytest.mark.parametrize("query_block,memory_block", BLOCKS)
def test_topk_ties_give_the_brute_force_similarities(query_block, memory_block):
    # Which of several equal rows comes first is left to torch.topk here: the similarities are exact, and
    # every returned row really has the similarity reported for it.
    q, m = _integer_rows(40, 4, 0), _integer_rows(90, 4, 1)
    want_s, _ = _brute(q, m, 12)
    s, i = knn_search(q, m, 12, query_block=query_block, memory_block=memory_block)
    assert np.array_equal(s.double().numpy(), want_s)
    assert torch.equal(s, (q[:, None, :] * m[i]).sum(-1))
    assert all(len(set(row)) == 12 for row in i.tolist())  # no row twice


@pytest.mark.parametrize("query_block,memory_block", BLOCKS)
def test_random_data_without_ties_matches_brute_force(query_block, memory_block):
    q, m = _unit(37, 24, 0), _unit(101, 24, 1)
    want_s, want_i = _brute(q, m, 5)
    s, i = knn_search(q, m, 5, query_block=query_block, memory_block=memory_block)
    assert np.array_equal(i.numpy(), want_i)
    assert np.allclose(s.numpy(), want_s, atol=1e-6)


def test_k_above_the_memory_returns_every_row_best_first():
    q, m = _unit(9, 8, 2), _unit(3, 8, 3)
    s, i = knn_search(q, m, 5, memory_block=2)
    want_s, want_i = _brute(q, m, 3)
    assert s.shape == (9, 3) and np.array_equal(i.numpy(), want_i)
    s, i = knn_search(q, m[:0], 5)  # an empty memory: no neighbours, no error
    assert s.shape == (9, 0) and i.shape == (9, 0) and i.dtype == torch.long


def test_a_memory_row_searched_for_itself_is_its_own_nearest_neighbour():
    m = _unit(50, 6, 4)
    _, plain = knn_search(m, m, 4)
    assert torch.equal(plain[:, 0], torch.arange(50))


def test_cosine_ranks_by_angle_dot_by_inner_product():
    q = torch.tensor([[1.0, 0.0]])
    m = torch.tensor([[10.0, 10.0], [1.0, 0.0]])
    assert knn_search(q, m, 1)[1].item() == 0  # inner product 10 beats 1
    s, i = knn_search(q, m, 1, similarity="cosine")
    assert i.item() == 1 and s.item() == pytest.approx(1.0)  # cosine 1 beats 0.707
    # cosine is the inner product of the L2-normalised rows, bit for bit.
    g = torch.Generator().manual_seed(5)
    u, v = 3 * torch.randn(20, 8, generator=g), torch.randn(60, 8, generator=g)
    for a, b in zip(knn_search(F.normalize(u, dim=-1), F.normalize(v, dim=-1), 7),
                    knn_search(u, v, 7, similarity="cosine")):
        assert torch.equal(a, b)


def test_float16_ranking_with_rescore_returns_float32_similarities_of_the_winners():
    q, m = _unit(30, 16, 7), _unit(400, 16, 8).half()
    s, i = knn_search(q, m, 10, memory_block=64, compute_dtype=torch.float32, rescore=True)
    assert s.dtype == torch.float32
    assert torch.equal(s, torch.einsum("qd,qkd->qk", q, m[i].float()))
    assert (s[:, :-1] >= s[:, 1:]).all()  # best first after the recomputation
    full = q @ m.float().T
    assert torch.allclose(s, full.topk(10, dim=1).values, atol=1e-6)


def test_rescore_with_lowest_index_orders_equal_similarities_by_row():
    q, m = _integer_rows(25, 3, 9), _integer_rows(70, 3, 10)
    want_s, want_i = _brute(q, m, 15)
    s, i = knn_search(q, m.half(), 15, ties="lowest_index", memory_block=9, compute_dtype=torch.float32,
                      rescore=True)
    assert np.array_equal(i.numpy(), want_i) and np.array_equal(s.double().numpy(), want_s)


def test_rescored_ties_put_the_lower_row_first_whatever_the_ranking_order():
    # A float16 ranking can hand over equal float32 similarities in any order; rows 1 and 3 are equal here.
    memory = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [1.0, 0.0]])
    q = torch.tensor([[1.0, 0.0]])
    s, i = knn._rescore(q, memory, torch.tensor([[3, 2, 1]]), "lowest_index")
    assert i.tolist() == [[1, 3, 2]] and s.tolist() == [[1.0, 1.0, 0.5]]


def test_unknown_options_are_rejected():
    q = _unit(2, 4, 0)
    with pytest.raises(ValueError, match="similarity"):
        knn_search(q, q, 1, similarity="euclidean")
    with pytest.raises(ValueError, match="ties"):
        knn_search(q, q, 1, ties="random")


def _filled(search, memory, dtype="float32"):
    index = make_index(search, memory.shape[0], memory.shape[1], torch.device("cpu"), dtype)
    for s in range(0, memory.shape[0], 64):  # filled block by block, as the Hummingbird memory is
        index.add(memory[s : s + 64])
    return index


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_torch_index_matches_brute_force_of_its_stored_rows(dtype):
    q, m = _unit(50, 12, 11), _unit(300, 12, 12)
    index = _filled("torch", m, dtype)
    s, i = search_blocks(index, q, 20, query_block=16)
    stored = m.to(knn.DTYPES[dtype])
    want_s, want_i = _brute(q, stored.float(), 20)
    assert np.array_equal(i.numpy(), want_i)
    assert np.allclose(s.numpy(), want_s, atol=1e-6)


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
def test_faiss_index_matches_the_torch_index_and_pads_a_short_memory():
    q, m = _unit(50, 12, 13), _unit(300, 12, 14)
    ts, ti = search_blocks(_filled("torch", m), q, 20, query_block=7)
    fs, fi = search_blocks(_filled("faiss", m), q, 20, query_block=50)
    assert torch.equal(ti, fi) and torch.allclose(ts, fs, atol=1e-5)
    # k above the size: torch truncates, faiss fills the missing places with row -1.
    assert search_blocks(_filled("torch", m[:4]), q, 6, 50)[1].shape == (50, 4)
    fs, fi = search_blocks(_filled("faiss", m[:4]), q, 6, 50)
    assert fi.shape == (50, 6) and (fi[:, 4:] == -1).all() and (fi[:, :4] >= 0).all()


def test_resolve_search_picks_faiss_only_where_it_runs(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_search("torch", cpu) == "torch"
    if HAS_FAISS:
        assert resolve_search("auto", cpu) == "faiss"
        monkeypatch.setattr(knn, "faiss_has_gpu", lambda: False)
        assert resolve_search("auto", cuda) == "torch"
        monkeypatch.setattr(knn, "faiss_has_gpu", lambda: True)
        assert resolve_search("auto", cuda) == "faiss"
    monkeypatch.setattr(knn, "faiss", None)
    assert resolve_search("auto", cpu) == "torch" and resolve_search("auto", cuda) == "torch"
    with pytest.raises(ConfigError, match="eval.hummingbird.search=faiss"):
        resolve_search("faiss", cpu, "eval.hummingbird.search")
    with pytest.raises(ConfigError, match="my.option"):
        resolve_search("scann", cpu, "my.option")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_float16_torch_index_on_the_gpu_returns_exact_float32_similarities():
    q, m = _unit(2000, 64, 15), _unit(50_000, 64, 16)
    index = TorchIndex(m.shape[0], 64, torch.device("cuda"), torch.float16, block_elements=1 << 20)
    index.add(m.cuda())
    s, i = search_blocks(index, q.cuda(), 30, query_block=512)
    s, i = s.cpu(), i.cpu()
    stored = m.half().float()
    assert torch.allclose(s, (q[:, None, :] * stored[i]).sum(-1), atol=1e-5)
    # float16 ranking: the same neighbours as float32 brute force but for near-ties at the k-th place.
    want = (q @ stored.T).topk(30, dim=1).indices
    agree = np.mean([len(set(a) & set(b)) / 30 for a, b in zip(i.tolist(), want.tolist())])
    assert agree > 0.99
