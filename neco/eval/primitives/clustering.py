"""Standardisation, PCA, faiss k-means and cluster scoring shared by the clustering evaluations (METHOD.md §6.1, §6.2).

The feature sets are large (VOC val at 448 px: 1.5M tokens of dimension 384; the in-training monitor upsamples
640 images to 100x100: 6.4M vectors), so every stage reads its input as a stream of row chunks and only the
50-dimensional projection is ever held whole. A chunk source is a zero-argument callable returning an iterable
of float32 ``(rows, D)`` arrays, always the same rows in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import faiss
import numpy as np
import torch

from neco.eval.primitives.labels import LEGACY_NEAREST, tokens_to_mask
from neco.eval.primitives.metrics import (
    confusion_matrix,
    hungarian_match,
    iou_from_confusion,
    many_to_one_match,
    remap_confusion,
)

__all__ = [
    "SCALER_CHUNK",
    "Standardizer",
    "faiss_threads",
    "pca_training_rows",
    "standardise_and_project",
    "kmeans_assign",
    "kmeans_plus_plus",
    "resolve_ks",
    "cluster_confusion",
    "score_clusters",
]

SCALER_CHUNK = 100_000  # rows per partial fit: the reference fits sklearn's StandardScaler in chunks of 100k
PCA_SUBSAMPLE_SEED = 1234  # the seed faiss itself uses when it subsamples a PCA training set

ChunkSource = Callable[[], Iterable[np.ndarray]]


@contextlib.contextmanager
def faiss_threads(threads: int | None):
    """Temporarily cap faiss's OpenMP threads (``None`` leaves them alone), restoring the previous value."""
    if threads is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


class Standardizer:
    """Per-dimension ``(x - mean) / scale`` with mean and population variance accumulated over chunks.

    The accumulators are float64 and chunks are merged with the pairwise update of Chan et al., the update
    sklearn's ``StandardScaler.partial_fit`` uses, so the result does not depend on the chunking.

    ``eps > 0``: ``scale = std + eps`` (the in-training monitor's formula, METHOD.md §6.1). ``eps == 0``:
    ``scale = std`` with sklearn's rule for constant dimensions (variance within float64 rounding of zero
    -> scale 1), which is what the overclustering script gets from ``StandardScaler`` (METHOD.md §6.2).
    """

    def __init__(self, eps: float = 1e-5):
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = float(eps)
        self.n = 0
        self.mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None  # sum of squared deviations from the mean

    def partial_fit(self, x: np.ndarray) -> Standardizer:
        x = np.asarray(x)
        n_new = x.shape[0]
        if n_new == 0:
            return self
        new_mean = x.sum(axis=0, dtype=np.float64) / n_new
        # Deviations in float32 from the float32-rounded mean, squares summed in float64; the second term
        # removes what that rounding adds (the correction sklearn's _incremental_mean_and_var applies too).
        # float32 temporaries are half the memory traffic of float64 ones, which dominates here.
        dev = np.asarray(x, dtype=np.float32) - new_mean.astype(np.float32)
        new_m2 = np.square(dev).sum(axis=0, dtype=np.float64) - dev.sum(axis=0, dtype=np.float64) ** 2 / n_new
        if self.n == 0:
            self.mean, self._m2 = new_mean, new_m2
        else:
            total = self.n + n_new
            delta = new_mean - self.mean
            self.mean = self.mean + delta * (n_new / total)
            self._m2 = self._m2 + new_m2 + delta**2 * (self.n * n_new / total)
        self.n += n_new
        return self

    def fit(self, x: np.ndarray, chunk: int = SCALER_CHUNK) -> Standardizer:
        for start in range(0, x.shape[0], chunk):
            self.partial_fit(x[start : start + chunk])
        return self

    @property
    def var(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("Standardizer: fit it before use")
        return self._m2 / self.n

    @property
    def scale(self) -> np.ndarray:
        var = self.var
        if self.eps > 0:
            return np.sqrt(var) + self.eps
        eps64 = np.finfo(np.float64).eps
        constant = var <= self.n * eps64 * var + (self.n * self.mean * eps64) ** 2
        return np.where(constant, 1.0, np.sqrt(var))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """float32 ``(x - mean) / scale``.

        Computed in float32 but with the mean split in two float32 parts (its rounding error is subtracted
        separately), so a mean far larger than the spread costs no accuracy: within about 1e-6 of float64.
        """
        hi = self.mean.astype(np.float32)
        lo = (self.mean - hi).astype(np.float32)
        out = np.subtract(np.asarray(x, dtype=np.float32), hi)
        out -= lo
        out *= (1.0 / self.scale).astype(np.float32)
        return out


def pca_training_rows(n_rows: int, dim: int, max_points: int | None) -> np.ndarray:
    """Indices of the rows a PCA is fitted on: the first ``max_points`` rows, as the reference slices them.

    faiss's PCAMatrix itself trains on at most ``max_points_per_d * dim`` (1000 * D) of the rows it is given,
    drawn at random with seed 1234; drawing them here first means only that sample is ever standardised and
    held, not the whole (up to 4M x D) slice. Indices are sorted so that chunks can be scanned in order.
    """
    n = n_rows if max_points is None else min(n_rows, max_points)
    cap = faiss.PCAMatrix(dim, 1).max_points_per_d * dim
    if n <= cap:
        return np.arange(n)
    rng = np.random.default_rng(PCA_SUBSAMPLE_SEED)
    return np.sort(rng.choice(n, size=cap, replace=False))


def standardise_and_project(
    chunks: ChunkSource,
    n_rows: int,
    dim: int,
    pca_dim: int | None = 50,
    std_eps: float = 1e-5,
    pca_max_points: int | None = None,
) -> np.ndarray:
    """Standardise every dimension, then project on the top ``pca_dim`` principal components (no whitening).

    Three passes over ``chunks``: fit the standardisation, gather the PCA training rows, transform. Returns
    float32 ``(n_rows, pca_dim)`` (``(n_rows, dim)`` when ``pca_dim`` is None or not below ``dim``).
    """
    scaler = Standardizer(std_eps)
    for c in chunks():
        scaler.fit(c)
    if scaler.n != n_rows:
        raise ValueError(f"chunk source yielded {scaler.n} rows, expected {n_rows}")
    project = pca_dim is not None and pca_dim < dim
    out_dim = pca_dim if project else dim
    pca = None
    if project:
        wanted = pca_training_rows(n_rows, dim, pca_max_points)
        parts, start = [], 0
        for c in chunks():
            lo, hi = np.searchsorted(wanted, [start, start + len(c)])
            if hi > lo:
                parts.append(scaler.transform(c[wanted[lo:hi] - start]))
            start += len(c)
            if start >= (wanted[-1] + 1 if len(wanted) else 0):
                break
        pca = faiss.PCAMatrix(dim, pca_dim)  # eigen_power 0: centring + projection only, as the reference
        pca.train(np.ascontiguousarray(np.concatenate(parts)))
    out = np.empty((n_rows, out_dim), dtype=np.float32)
    start = 0
    for c in chunks():
        x = np.ascontiguousarray(scaler.transform(c))
        out[start : start + len(c)] = pca.apply(x) if pca is not None else x
        start += len(c)
    return out


def kmeans_plus_plus(x: np.ndarray, k: int, seed: int, max_points: int = 10_000) -> np.ndarray:
    """Greedy k-means++ seeding of ``k`` centroids from the rows of ``x``.

    faiss seeds with ``k`` uniformly drawn points, which with a single restart regularly puts two seeds in
    one cluster and merges two others; on the small, few-cluster sets of a quick evaluation that swings the
    score by tens of mIoU points between seeds. Plain D^2 sampling still does that now and then, so every
    step draws ``2 + log k`` candidates and keeps the one that lowers the potential most (the greedy variant
    used by scikit-learn). Seeding only needs a spread-out set, so it runs on at most ``max_points`` rows.
    """
    rng = np.random.default_rng(seed)
    if x.shape[0] > max(max_points, k):
        x = x[rng.choice(x.shape[0], max(max_points, k), replace=False)]
    n = x.shape[0]
    x64 = x.astype(np.float64)
    sq = (x64**2).sum(axis=1)
    trials = 2 + int(np.log(k))
    centers = np.empty((k, x.shape[1]), dtype=np.float32)
    first = rng.integers(n)
    centers[0] = x[first]
    d2 = np.maximum(sq + sq[first] - 2.0 * x64 @ x64[first], 0.0)
    for c in range(1, k):
        total = d2.sum()
        cand = rng.choice(n, size=trials, p=d2 / total) if total > 0 else rng.integers(n, size=trials)
        # |x - c|^2 through one matmul: (trials, n) without a (trials, n, dim) temporary.
        dist = np.maximum(sq[None] + sq[cand][:, None] - 2.0 * x64[cand] @ x64.T, 0.0)
        cand_d2 = np.minimum(d2[None], dist)
        best = int(np.argmin(cand_d2.sum(axis=1)))
        centers[c] = x[cand[best]]
        d2 = cand_d2[best]
    return centers


def kmeans_assign(
    x: np.ndarray,
    k: int,
    *,
    niter: int,
    nredo: int = 1,
    seed: int = 0,
    spherical: bool = False,
    max_points_per_centroid: int = 256,
) -> tuple[np.ndarray, float]:
    """faiss k-means as the reference calls it; returns the cluster id of every row and the summed distance
    (squared L2; inner product when ``spherical``) of the rows to their centroids.

    faiss keeps the best of ``nredo`` runs (restart ``r`` seeds its random initial centroids with
    ``seed + 1 + 15486557 r``) and trains on a random sample of ``max_points_per_centroid * k`` rows (its
    default, 256, is what the reference ran with); every row is then assigned to its nearest centroid.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] < k:
        raise ValueError(f"k-means with k={k} needs at least k vectors, got {x.shape[0]}")
    # min_points_per_centroid only sets when faiss warns about a small training set; small sets are expected.
    km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, seed=seed, spherical=spherical, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max_points_per_centroid)
    km.train(x)
    dist, assign = km.index.search(x, 1)
    return assign[:, 0].astype(np.int64), float(dist.sum(dtype=np.float64))


def resolve_ks(ks: Sequence, num_classes: int) -> list[int]:
    """``ks`` entries are ints or the string ``"classes"`` (the dataset's number of classes)."""
    out = []
    for k in ks:
        value = num_classes if k == "classes" else k
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"ks entries must be positive ints or 'classes', got {k!r}")
        out.append(int(value))
    return out


def cluster_confusion(
    assign: torch.Tensor,
    masks: torch.Tensor,
    k: int,
    num_classes: int,
    ignore_index: int | None,
    image_size: int | None = None,
    chunk: int = 64,
    label_resize: str = LEGACY_NEAREST,
) -> torch.Tensor:
    """``conf[class, cluster]`` over the valid pixels of ``(N, m, m)`` masks.

    ``assign`` holds cluster ids per token ``(N, g, g)`` (brought to the masks by
    :func:`neco.eval.primitives.labels.tokens_to_mask` with ``label_resize``, which needs the input ``image_size``)
    or already per mask pixel ``(N, m, m)``.
    """
    conf = torch.zeros(num_classes, k, dtype=torch.long)
    for start in range(0, assign.shape[0], chunk):
        a = assign[start : start + chunk]
        m = masks[start : start + chunk].long()
        if a.shape[-2:] != m.shape[-2:]:
            if image_size is None:
                raise ValueError("token-resolution clusters need image_size to be aligned with the masks")
            a = tokens_to_mask(a, image_size, m.shape[-1], label_resize)
        conf += confusion_matrix(a, m, k, num_classes, ignore_index)
    return conf


def score_clusters(
    conf: torch.Tensor,
    criterion: str,
    exclude_class: int | None = None,
    background: int = 0,
) -> dict:
    """Match clusters to classes and score them (METHOD.md §6.7).

    ``criterion``: ``hungarian`` (one-to-one on IoU, unmatched clusters -> class 0), ``precision`` or ``iou``
    (many-to-one). ``exclude_class``: a class id left out of the mIoU average (ADE20K's ignored label 0, spec
    §10.14); the matching itself is unchanged. Returns the mapping, per-class IoU / precision / recall
    (fractions), ``miou`` and ``pixel_acc`` in percent, and the fraction of clusters mapped to ``background``.
    """
    num_classes = conf.shape[0]
    if criterion == "hungarian":
        mapping = hungarian_match(conf)
    elif criterion in ("precision", "iou"):
        mapping = many_to_one_match(conf, criterion)
    else:
        raise ValueError(f"criterion must be hungarian, precision or iou, got {criterion!r}")
    square = remap_confusion(conf, mapping, num_classes).double()
    iou, miou, acc = iou_from_confusion(square)
    if exclude_class is not None and 0 <= exclude_class < num_classes:
        keep = torch.ones(num_classes, dtype=torch.bool)
        keep[exclude_class] = False
        miou = float(iou[keep].mean())
    tp = square.diagonal()
    # max(., 1e-8) as the reference: a class never predicted (or never present) scores 0, not NaN.
    precision = tp / square.sum(dim=0).clamp_min(1e-8)
    recall = tp / square.sum(dim=1).clamp_min(1e-8)
    return {
        "mapping": mapping,
        "miou": 100.0 * miou,
        "pixel_acc": 100.0 * acc,
        "iou": iou.tolist(),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "bg_fraction": float((mapping == background).double().mean()),
    }
