"""The per-pair NeCo loss: soft neighbour orderings of aligned patches and their cross-entropy (METHOD.md §3.5-3.7)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from neco.loss.sorting import diff_sort, diff_sort_dense


def _triton_sort(*args, **kwargs):
    # Imported on first use: the other sorters need no Triton, and TRITON_INTERPRET is read at that import.
    from neco.loss.triton_sort import triton_diff_sort

    return triton_diff_sort(*args, **kwargs)


# triton raises a ValueError naming loss.sorter where it cannot run (no Triton, a CPU tensor): no silent fallback.
SORTERS = {"sparse": diff_sort, "dense": diff_sort_dense, "triton": _triton_sort}

SIMILARITIES = ("cosine", "euclidean")


def similarities(query: torch.Tensor, refs: torch.Tensor, similarity: str = "cosine") -> torch.Tensor:
    """Rows to sort: for each query cell of each image, its similarity to the image's k*k references.

    `query`, `refs`: aligned maps `(B, d, k, k)`. Returns `(B*k*k, k*k)`, row `b*k*k + 7y + x`, column = reference.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"loss.similarity={similarity!r}: expected one of {SIMILARITIES}")
    q = query.flatten(2).transpose(1, 2)  # (B, n, d), n = k*k cells in row-major (y, x) order
    r = refs.flatten(2).transpose(1, 2)
    if similarity == "cosine":
        # Aligned vectors are averages of unit vectors, not unit length themselves: re-normalise (METHOD.md §3.2).
        sim = F.normalize(q, dim=-1) @ F.normalize(r, dim=-1).transpose(1, 2)
    else:
        sim = torch.cdist(q, r)
    return sim.reshape(-1, sim.shape[-1])


def soft_permutation(
    query: torch.Tensor,
    refs: torch.Tensor,
    steepness: float,
    network: str = "bitonic",
    distribution: str = "cauchy",
    similarity: str = "cosine",
    art_lambda: float = 0.25,
    sorter: str = "sparse",
) -> torch.Tensor:
    """`X[row, i, j]`: mass of reference i at rank j for each query cell, shape `(B*k*k, k*k, k*k)`."""
    # The objective runs in at least fp32 even when the backbone runs under bf16/fp16 autocast.
    dtype = torch.promote_types(query.dtype, torch.float32)
    with torch.autocast(device_type=query.device.type, enabled=False):
        if sorter not in SORTERS:
            raise ValueError(f"loss.sorter={sorter!r}: expected one of {tuple(SORTERS)}")
        rows = similarities(query.to(dtype), refs.to(dtype), similarity)
        _, perm = SORTERS[sorter](rows, network=network, steepness=steepness, distribution=distribution,
                            art_lambda=art_lambda)
    return perm


def permutation_cross_entropy(
    target: torch.Tensor, pred: torch.Tensor, cell_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """`-sum Q log P` averaged over query cells and references (METHOD.md §3.7), or over masked cells (METHOD.md §3.8).

    `target`, `pred`: `(B*n, n, n)`. `cell_mask`: optional `(B*n,)` boolean of the query cells that count.
    `log P` is clamped at the dtype's smallest normal number: equal to the reference wherever the reference
    is finite, and finite where the reference would give -inf or NaN (METHOD.md §10.8).
    """
    log_p = pred.clamp_min(torch.finfo(pred.dtype).tiny).log()
    per_cell = -(target * log_p).sum(dim=(1, 2))  # (B*n,)
    n = pred.shape[-1]
    if cell_mask is None:
        return per_cell.sum() / (per_cell.numel() * n)
    weights = cell_mask.to(per_cell.dtype)
    count = weights.sum()
    # An empty mask gives 0 (the pair is skipped but still counts in the mean over pairs, as the reference).
    return (per_cell * weights).sum() / (count * n).clamp_min(1.0)


def pair_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    refs: torch.Tensor,
    student_steepness: float,
    teacher_steepness: float,
    network: str = "bitonic",
    similarity: str = "cosine",
    distribution: str = "cauchy",
    art_lambda: float = 0.25,
    cell_mask: Optional[torch.Tensor] = None,
    sorter: str = "sparse",
) -> torch.Tensor:
    """Cross-entropy between the teacher's (no gradient) and the student's soft permutations for one crop pair.

    `student`, `teacher`, `refs`: aligned feature maps `(B, d, k, k)`. Normalised by `B*k*k*k*k` (no mask), so
    identical inputs give the entropy of the teacher's permutations, the minimum over student inputs.
    """
    with torch.no_grad():
        target = soft_permutation(teacher, refs, teacher_steepness, network, distribution, similarity, art_lambda,
                                  sorter)
    pred = soft_permutation(student, refs, student_steepness, network, distribution, similarity, art_lambda, sorter)
    return permutation_cross_entropy(target, pred, cell_mask)
