"""Cluster-based foreground extraction (CBFE, METHOD.md §6.5.4).

Token clusters (spherical k-means over train+val) are scored by how much of each cluster the noisy attention
foreground covers; the clusters scoring above a threshold are foreground. The threshold is found on the
train split: sort clusters by score, try every cut that leaves 55-75 % of them in the background, keep the cut
whose foreground best matches the train ground truth (mean per-image Jaccard, boundary counted as
foreground), and round its score to the nearest multiple of 0.05. Val uses the same threshold on scores
recomputed from val. Everything happens at the evaluation size (100x100): cluster maps, attention masks and
ground truth are brought there with torch's legacy ``nearest`` resize, as the reference does
(neco.eval.primitives.labels); every map is sampled at the top-left corner of each output cell, so all three stay
aligned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from neco.errors import ConfigError

__all__ = [
    "cluster_counts",
    "cluster_precisions",
    "foreground_jaccard",
    "select_threshold",
    "CBFEResult",
    "extract_foreground",
]


def cluster_counts(clusters: torch.Tensor, weights: torch.Tensor | None, k: int) -> torch.Tensor:
    """``(N, k)`` float64: per image and cluster id, the number of pixels (or the sum of ``weights`` over them)."""
    n = clusters.shape[0]
    codes = (torch.arange(n).view(n, 1) * k + clusters.reshape(n, -1).long()).reshape(-1)
    w = None if weights is None else weights.reshape(-1).double()
    return torch.bincount(codes, weights=w, minlength=n * k).double().reshape(n, k)


def cluster_precisions(clusters: torch.Tensor, noisy_fg: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Attention precision of every cluster: mean over the images containing it of |cluster & fg| / |cluster|.

    Returns ``(precisions (k,), present (k,) bool)``. The reference asserts that every cluster occurs in the
    split; a cluster that does not gets precision 0 here (it then sorts first, i.e. background).
    """
    pixels = cluster_counts(clusters, None, k)
    fg = cluster_counts(clusters, noisy_fg, k)
    occurs = pixels > 0
    per_image = torch.where(occurs, fg / pixels.clamp_min(1), torch.zeros_like(fg))
    count = occurs.sum(dim=0)
    prec = torch.where(count > 0, per_image.sum(dim=0) / count.clamp_min(1), torch.zeros(k, dtype=torch.float64))
    return prec.numpy(), (count > 0).numpy()


def _jaccard_of_sets(pixels: torch.Tensor, gt_fg: torch.Tensor, fg_ids: np.ndarray) -> float:
    """Mean per-image Jaccard of the union of clusters ``fg_ids`` against the GT foreground (counts form)."""
    sel = torch.as_tensor(fg_ids, dtype=torch.long)
    inter = gt_fg[:, sel].sum(dim=1)
    pred = pixels[:, sel].sum(dim=1)
    union = pred + gt_fg.sum(dim=1) - inter
    # 0/0 (no foreground in truth nor prediction) is a perfect match; the reference would produce NaN.
    jac = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))
    return float(jac.mean())


def foreground_jaccard(pred_fg: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean over images of the Jaccard of a boolean foreground ``(N, H, W)`` against ``gt != 0``.

    The boundary label (255) counts as foreground, as in the reference (``with_boundary=True``).
    """
    gt_fg = gt != 0
    inter = (pred_fg & gt_fg).flatten(1).sum(dim=1).double()
    union = (pred_fg | gt_fg).flatten(1).sum(dim=1).double()
    return float(torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter)).mean())


def select_threshold(
    precisions: np.ndarray,
    clusters: torch.Tensor,
    gt: torch.Tensor,
    k: int,
    cut_low: float = 0.55,
    cut_high: float = 0.75,
    step: float = 0.05,
) -> tuple[float, dict]:
    """The CBFE precision threshold from the train split (METHOD.md §6.5.4).

    Cuts ``start`` in ``range(int(cut_low * k), int(cut_high * k))`` put the ``start`` lowest-precision clusters
    in the background; the best cut (highest mean per-image Jaccard; ties -> the later cut, as the reference's
    stable sort then ``[-1]``) gives its precision ``sorted_precisions[start]``, rounded to the nearest value of
    ``np.arange(0, 1, step)`` (ties -> the lower one). Returns ``(threshold, details)``.
    """
    starts = range(int(cut_low * k), int(cut_high * k))
    if len(starts) == 0:
        raise ConfigError(f"eval.unsup_seg.k_fg={k} is too small: no cut between {cut_low:.0%} and {cut_high:.0%} "
                          "of the clusters")
    # A stable sort: the reference's np.argsort default (introsort) orders equal precisions arbitrarily.
    order = np.argsort(precisions, kind="stable")
    sorted_prec = precisions[order]
    pixels = cluster_counts(clusters, None, k)
    gt_fg = cluster_counts(clusters, gt != 0, k)
    jaccards = [_jaccard_of_sets(pixels, gt_fg, order[s:]) for s in starts]
    best = max(range(len(jaccards)), key=lambda i: (jaccards[i], i))
    best_start = starts[best]
    grid = np.arange(0, 1, step)
    best_prec = float(sorted_prec[best_start])
    threshold = float(min(grid, key=lambda x: abs(x - best_prec)))
    return threshold, {"best_cut": best_start, "best_cut_precision": best_prec, "best_cut_jaccard": jaccards[best],
                       "cuts": list(starts), "cut_jaccards": jaccards}


@dataclass
class CBFEResult:
    threshold: float
    fg_train: torch.Tensor  # bool (N_train, S, S)
    fg_val: torch.Tensor  # bool (N_val, S, S)
    details: dict


def extract_foreground(
    clusters_train: torch.Tensor,
    clusters_val: torch.Tensor,
    noisy_train: torch.Tensor,
    noisy_val: torch.Tensor,
    gt_train: torch.Tensor,
    gt_val: torch.Tensor,
    k: int,
    cut_low: float = 0.55,
    cut_high: float = 0.75,
    step: float = 0.05,
) -> CBFEResult:
    """CBFE on maps already at the evaluation size: threshold from train, foreground masks of both splits."""
    prec_train, present_train = cluster_precisions(clusters_train, noisy_train, k)
    threshold, details = select_threshold(prec_train, clusters_train, gt_train, k, cut_low, cut_high, step)
    prec_val, present_val = cluster_precisions(clusters_val, noisy_val, k)
    # Same threshold, precisions recomputed on val (the val images' own attention).
    fg_ids_train = torch.as_tensor(prec_train >= threshold)
    fg_ids_val = torch.as_tensor(prec_val >= threshold)
    fg_train = fg_ids_train[clusters_train.long()]
    fg_val = fg_ids_val[clusters_val.long()]
    details.update(
        threshold=threshold,
        fg_clusters_train=int(fg_ids_train.sum()),
        fg_clusters_val=int(fg_ids_val.sum()),
        absent_clusters_train=int((~present_train).sum()),
        absent_clusters_val=int((~present_val).sum()),
        fg_fraction_train=float(fg_train.float().mean()),
        fg_fraction_val=float(fg_val.float().mean()),
        fg_jaccard_train=foreground_jaccard(fg_train, gt_train),
        fg_jaccard_val=foreground_jaccard(fg_val, gt_val),
        precisions_train=prec_train.tolist(),
    )
    return CBFEResult(threshold, fg_train, fg_val, details)
