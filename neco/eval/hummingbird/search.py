"""Exact inner-product top-k search over the Hummingbird memory: streaming torch matmul or faiss IndexFlatIP.

Both indexes are filled row block by row block (``add``) into storage sized once, so building the memory never
holds it twice, and both return ``(similarities float32 (Q, k), indices int64 (Q, k))``, best first.

* ``torch``: the memory lives on the evaluation device in ``float16`` (default: the queries come from the
  float16 feature cache anyway) or ``float32``. Each query block is multiplied with memory blocks whose size
  bounds the similarity block, keeping a running top-k. The returned similarities are recomputed in float32 from
  the stored rows, as the reference recomputes them from the retrieved keys.
* ``faiss``: ``IndexFlatIP`` (float32) on the CPU, or ``GpuIndexFlatIP`` when faiss was built with GPU support
  and the device is CUDA (float16 storage when ``memory_dtype`` is float16). This is the reference's search.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

try:  # faiss is a dependency, but the torch search must keep working without it
    import faiss
except ImportError:  # pragma: no cover
    faiss = None

DTYPES = {"float16": torch.float16, "float32": torch.float32}


def faiss_has_gpu() -> bool:
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_search(search: str, device: torch.device) -> str:
    """``auto`` -> faiss where faiss runs on ``device`` (CPU, or CUDA with faiss-gpu), otherwise torch."""
    if search not in ("auto", "torch", "faiss"):
        raise ValueError(f"search must be auto, torch or faiss, got {search!r}")
    if search == "faiss" and faiss is None:
        raise ImportError("eval.hummingbird.search=faiss but faiss is not installed (pip install faiss-cpu)")
    if search != "auto":
        return search
    if faiss is None:
        return "torch"
    if device.type == "cuda":
        return "faiss" if faiss_has_gpu() else "torch"
    return "faiss"


class TorchIndex:
    """Preallocated ``(capacity, D)`` memory with a blockwise exact top-k search."""

    def __init__(self, capacity: int, dim: int, device: torch.device, dtype: torch.dtype = torch.float16,
                 block_elements: int | None = None):
        self.device, self.dtype = torch.device(device), dtype
        self.data = torch.empty((capacity, dim), dtype=dtype, device=self.device)
        self.size = 0
        # Similarity block (query rows x memory rows): large blocks keep a GPU busy; a CPU gains little.
        self.block_elements = block_elements or (1 << 28 if self.device.type == "cuda" else 1 << 24)

    def add(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        if self.size + n > self.data.shape[0]:
            raise RuntimeError(f"memory holds {self.data.shape[0]} rows; adding {n} more after {self.size}")
        self.data[self.size : self.size + n] = x.to(self.device, self.dtype)
        self.size += n

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        mem = self.data[: self.size]
        q = queries.to(self.device, torch.float32)
        # float16 matmul on a CPU is slow: its blocks are widened to float32 there.
        compute = self.dtype if self.device.type == "cuda" else torch.float32
        qc = q.to(compute)
        chunk = max(k, self.block_elements // max(q.shape[0], 1))
        best_s = best_i = None
        for ms in range(0, mem.shape[0], chunk):
            block = mem[ms : ms + chunk].to(compute)
            s = qc @ block.T
            s, i = s.topk(min(k, s.shape[1]), dim=1)
            i = i + ms
            if best_s is not None:
                s, pos = torch.cat([best_s, s], dim=1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
                i = torch.cat([best_i, i], dim=1).gather(1, pos)
            best_s, best_i = s, i
        # Exact float32 similarities of the winners (the ranking above may be float16 on a GPU).
        sims = torch.einsum("qd,qkd->qk", q, mem[best_i].float())
        sims, order = sims.sort(dim=1, descending=True)
        return sims, best_i.gather(1, order)


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CPU-GPU sync: the clock must see the finished kernels


def time_retrieval(
    num_memory: int,
    num_queries: int,
    dim: int = 384,
    k: int = 30,
    device: str | torch.device = "cpu",
    search: str = "torch",
    memory_dtype: str = "float16",
    slice_memory: int | None = None,
    slice_queries: int | None = None,
    query_block: int = 4096,
    seed: int = 0,
) -> dict:
    """Time the exact search of ``num_queries`` against ``num_memory`` rows of dimension ``dim``.

    With ``slice_memory`` / ``slice_queries`` smaller than the full sizes, only that slice is searched (random unit
    vectors) and the time is extrapolated linearly in both (the search cost is ``Q x M x D``); ``extrapolated`` in
    the result says so. Returns the measured seconds, the slice, and the estimated full time.
    """
    device = torch.device(device)
    search = resolve_search(search, device)
    m = min(slice_memory or num_memory, num_memory)
    q = min(slice_queries or num_queries, num_queries)
    g = torch.Generator(device).manual_seed(seed)  # random data made where it is searched: no transfer
    index = make_index(search, m, dim, device, memory_dtype)
    block = 1 << 18
    for s in range(0, m, block):  # filled block by block, as the real memory is
        x = torch.randn(min(block, m - s), dim, generator=g, device=device)
        index.add(torch.nn.functional.normalize(x, dim=1))
    queries = torch.nn.functional.normalize(torch.randn(q, dim, generator=g, device=device), dim=1)
    search_blocks(index, queries[: min(q, 64)], k, query_block)  # warm-up (kernels, thread pools)
    _sync(device)
    start = time.perf_counter()
    search_blocks(index, queries, k, query_block)
    _sync(device)
    seconds = time.perf_counter() - start
    factor = (num_memory / m) * (num_queries / q)
    return {
        "search": search, "device": str(device), "dim": dim, "k": k,
        # faiss on a CPU always stores float32
        "memory_dtype": "float32" if search == "faiss" and device.type != "cuda" else memory_dtype,
        "slice_memory": m, "slice_queries": q, "slice_seconds": seconds,
        "num_memory": num_memory, "num_queries": num_queries,
        "extrapolated": not math.isclose(factor, 1.0), "estimated_seconds": seconds * factor,
    }
