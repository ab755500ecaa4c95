"""Exact nearest-neighbour search (METHOD.md §6.3): one top-k search and the indexes built on it.

One exact top-k search, ``knn_search``: queries against the memory in blocks, a running top-k list per query
merged block after block, so the largest temporary is one ``query block x (memory block + k)`` similarity block
whatever the sizes. Its options are the behaviours its callers differ in:

* ``similarity``: ``dot`` (inner product of the rows as given) or ``cosine`` (both sides L2-normalised first).
* ``ties``: ``topk`` leaves equal similarities in whatever order ``torch.topk`` and the block merges leave them,
  which depends on the block sizes; ``lowest_index`` puts the lower memory row first, the same for any blocks.
* block sizes (``query_block``, ``memory_block``, ``block_elements``): they change no ranking except among
  ties and in the last bits of a similarity (a matmul's rounding depends on its shape), so every caller keeps
  the sizes its numbers were made with.
* ``compute_dtype`` and ``rescore``: the dtype of the ranking matmul, and whether the winners' similarities are
  then recomputed in float32 from the stored rows and re-sorted (as the Hummingbird evaluator recomputes them
  from the retrieved keys).
* ``k`` above the memory size returns every row (``min(k, rows)`` columns), best first.

Indexes filled row block by row block into storage sized once (the Hummingbird memory is never held twice):
``TorchIndex`` (the memory on the evaluation device in float16 or float32, searched by ``knn_search``) and
``FaissIndex`` (faiss ``IndexFlatIP``, or ``GpuIndexFlatIP`` on CUDA with faiss-gpu; a ``k`` above its size
returns index -1 and similarity -3.4e38 in the missing places). ``resolve_search`` picks the backend:
``auto`` is faiss where faiss runs on the device and torch elsewhere.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from neco.errors import ConfigError

try:  # faiss is a dependency, but the torch search must keep working without it
    import faiss
except ImportError:  # pragma: no cover
    faiss = None

SIMILARITIES = ("dot", "cosine")
TIE_ORDERS = ("topk", "lowest_index")
SEARCHES = ("auto", "torch", "faiss")
DTYPES = {"float16": torch.float16, "float32": torch.float32}
# Rough cap on the (query block x memory block) similarity block: the search's peak memory stays bounded.
SIM_BLOCK_ELEMENTS = 1 << 24


def _top(s: torch.Tensor, n: int, ties: str) -> tuple[torch.Tensor, torch.Tensor]:
    if ties == "topk":
        return s.topk(n, dim=1)
    # A stable sort keeps equal values in column order, and columns run in memory-row order.
    values, pos = s.sort(dim=1, descending=True, stable=True)
    return values[:, :n], pos[:, :n]


def _search_block(q, memory, k, rows, ties, compute_dtype):
    """Running top-k of the query block ``q`` over ``memory`` taken ``rows`` rows at a time."""
    qc = q.to(compute_dtype)
    best_s = best_i = None
    for ms in range(0, memory.shape[0], rows):
        s = qc @ memory[ms : ms + rows].to(compute_dtype).T
        s, i = _top(s, min(k, s.shape[1]), ties)
        i = i + ms
        if best_s is not None:
            # Best-so-far first: with ties="lowest_index" the earlier (lower) rows stay ahead of equal new ones.
            s, pos = _top(torch.cat([best_s, s], dim=1), min(k, best_s.shape[1] + s.shape[1]), ties)
            i = torch.cat([best_i, i], dim=1).gather(1, pos)
        best_s, best_i = s, i
    return best_s, best_i


def _rescore(q, memory, idx, ties):
    """float32 similarities of the winners, recomputed from the stored rows, best first."""
    sims = torch.einsum("qd,qkd->qk", q.float(), memory[idx].float())
    if ties == "lowest_index":
        idx, pos = idx.sort(dim=1, stable=True)
        sims = sims.gather(1, pos)
        sims, order = sims.sort(dim=1, descending=True, stable=True)
    else:
        sims, order = sims.sort(dim=1, descending=True)
    return sims, idx.gather(1, order)


def knn_search(
    queries: torch.Tensor,
    memory: torch.Tensor,
    k: int,
    *,
    similarity: str = "dot",
    ties: str = "topk",
    query_block: int | None = None,
    memory_block: int | None = None,
    block_elements: int = SIM_BLOCK_ELEMENTS,
    compute_dtype: torch.dtype | None = None,
    rescore: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` search; returns ``(similarities (Q, k'), indices int64 (Q, k'))``, best first.

    ``k' = min(k, rows)``. Block sizes: ``query_block`` queries at a time
    (default ``block_elements // memory_block``); ``memory_block`` rows at a time (default, with ``query_block``
    given: ``max(k, block_elements // queries in the block)``, so a shorter last query block takes larger memory
    blocks; with neither given: ``min(rows, block_elements // 1024)``). ``compute_dtype`` (default: the inputs'
    common dtype) is the dtype of the ranking matmul; see the module docstring for the other options.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if ties not in TIE_ORDERS:
        raise ValueError(f"ties must be one of {TIE_ORDERS}, got {ties!r}")
    if similarity == "cosine":
        queries, memory = F.normalize(queries.float(), dim=-1), F.normalize(memory.float(), dim=-1)
    q_total, m_total = queries.shape[0], memory.shape[0]
    k = max(min(k, m_total), 0)
    if k == 0:
        return queries.new_empty(q_total, 0), torch.empty(q_total, 0, dtype=torch.long, device=queries.device)
    if query_block is None:
        if memory_block is None:
            memory_block = max(min(m_total, block_elements // 1024), 1)
        query_block = max(block_elements // max(min(memory_block, m_total), 1), 1)
    compute_dtype = compute_dtype or torch.promote_types(queries.dtype, memory.dtype)
    sims_out, idx_out = [], []
    for qs in range(0, q_total, query_block):
        q = queries[qs : qs + query_block]
        rows = memory_block or max(k, block_elements // q.shape[0])
        s, i = _search_block(q, memory, k, rows, ties, compute_dtype)
        if rescore:
            s, i = _rescore(q, memory, i, ties)
        sims_out.append(s)
        idx_out.append(i)
    return torch.cat(sims_out), torch.cat(idx_out)


def faiss_has_gpu() -> bool:
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_search(search: str, device: torch.device, option: str = "search") -> str:
    """``auto`` -> faiss where faiss runs on ``device`` (CPU, or CUDA with faiss-gpu), otherwise torch.

    ``option`` names the setting in the errors (``eval.hummingbird.search``).
    """
    if search not in SEARCHES:
        raise ConfigError(f"{option} must be one of {', '.join(SEARCHES)}, got {search!r}")
    if search == "faiss" and faiss is None:
        raise ConfigError(f"{option}=faiss but faiss is not installed (pip install faiss-cpu), or set {option}=torch")
    if search != "auto":
        return search
    if faiss is None:
        return "torch"
    if device.type == "cuda":
        return "faiss" if faiss_has_gpu() else "torch"
    return "faiss"


class TorchIndex:
    """Preallocated ``(capacity, D)`` memory searched by ``knn_search`` (float32 similarities, rescored)."""

    def __init__(self, capacity: int, dim: int, device: torch.device, dtype: torch.dtype = torch.float16,
                 block_elements: int | None = None):
        self.device, self.dtype = torch.device(device), dtype
        self.data = torch.empty((capacity, dim), dtype=dtype, device=self.device)
        self.size = 0
        # Similarity block (query rows x memory rows): large blocks keep a GPU busy; a CPU gains little.
        self.block_elements = block_elements or (1 << 28 if self.device.type == "cuda" else SIM_BLOCK_ELEMENTS)

    def add(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        if self.size + n > self.data.shape[0]:
            raise RuntimeError(f"memory holds {self.data.shape[0]} rows; adding {n} more after {self.size}")
        self.data[self.size : self.size + n] = x.to(self.device, self.dtype)
        self.size += n

    def search(self, queries: torch.Tensor, k: int, ties: str = "topk") -> tuple[torch.Tensor, torch.Tensor]:
        # float16 matmul on a CPU is slow: its blocks are widened to float32 there. The ranking may be float16
        # on a GPU; the returned similarities are the exact float32 ones of the winners.
        compute = self.dtype if self.device.type == "cuda" else torch.float32
        q = queries.to(self.device, torch.float32)
        return knn_search(q, self.data[: self.size], k, ties=ties, query_block=max(q.shape[0], 1),
                          block_elements=self.block_elements, compute_dtype=compute, rescore=True)


class FaissIndex:
    """faiss flat inner-product index, filled block by block."""

    def __init__(self, dim: int, device: torch.device, fp16: bool = False):
        if faiss is None:
            raise ImportError("faiss is not installed")
        self.device = torch.device(device)
        if self.device.type == "cuda" and faiss_has_gpu():
            self._res = faiss.StandardGpuResources()
            cfg = faiss.GpuIndexFlatConfig()
            cfg.device = self.device.index or 0
            cfg.useFloat16 = fp16
            self.index = faiss.GpuIndexFlatIP(self._res, dim, cfg)
        else:
            self.index = faiss.IndexFlatIP(dim)

    @property
    def size(self) -> int:
        return self.index.ntotal

    def add(self, x: torch.Tensor) -> None:
        self.index.add(np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy()))

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, i = self.index.search(np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy()), k)
        return torch.from_numpy(s).to(queries.device), torch.from_numpy(i).long().to(queries.device)


def make_index(search: str, capacity: int, dim: int, device: torch.device, memory_dtype: str = "float16"):
    """An empty ``torch`` or ``faiss`` index (``search`` as ``resolve_search`` returns it)."""
    if memory_dtype not in DTYPES:
        raise ValueError(f"memory_dtype must be float16 or float32, got {memory_dtype!r}")
    if search == "faiss":
        return FaissIndex(dim, device, fp16=memory_dtype == "float16")
    return TorchIndex(capacity, dim, device, DTYPES[memory_dtype])


def search_blocks(index, queries: torch.Tensor, k: int, query_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``index.search`` over ``queries`` in blocks of ``query_block`` rows (bounds the per-call temporaries)."""
    out_s, out_i = [], []
    for qs in range(0, queries.shape[0], query_block):
        s, i = index.search(queries[qs : qs + query_block], k)
        out_s.append(s)
        out_i.append(i)
    return torch.cat(out_s), torch.cat(out_i)
