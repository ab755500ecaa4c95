"""faiss k-means, the one implementation every clustering evaluation uses (METHOD.md §6.1, §6.2, §6.5.3, §6.5.5).

Every caller runs faiss's Lloyd iterations on float32 rows with faiss's default training subsample
(``max_points_per_centroid`` 256 per centroid, what the reference ran with) and assigns every row to its
nearest centroid (squared L2; inner product for spherical k-means, as faiss's own index). They differ in two
named parameters:

* ``init``: ``random`` is faiss's own seeding (``k`` distinct rows drawn at random), the reference's in every
  protocol; ``k-means++`` is greedy k-means++ (:func:`kmeans_plus_plus`), the quick check's default.
* ``restarts``: ``faiss`` hands ``nredo`` to faiss, which seeds restart ``r`` with ``seed + 1 + 15486557 r`` and
  keeps the lowest training objective (on its subsample): overclustering, the monitor and the unsupervised
  protocol. ``reseeded`` runs ``nredo`` separate one-restart k-means seeded ``seed * 1000 + r`` and keeps the one
  with the lowest summed distance over all rows: the quick check's scheme, and the only one that can seed every
  restart with k-means++ (given initial centroids, faiss starts every restart from them).
"""

from __future__ import annotations

import contextlib

import faiss
import numpy as np

__all__ = [
    "INITS",
    "RESTARTS",
    "TooFewPoints",
    "faiss_threads",
    "kmeans_plus_plus",
    "train_kmeans",
    "assign",
    "kmeans_assign",
]

INITS = ("random", "k-means++")
RESTARTS = ("faiss", "reseeded")


class TooFewPoints(ValueError):
    """k-means asked for more clusters than there are rows."""


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


def _faiss_kmeans(d: int, k: int, niter: int, nredo: int, seed: int, spherical: bool, max_points_per_centroid: int):
    # min_points_per_centroid only sets when faiss warns about a small training set; small sets are expected.
    return faiss.Kmeans(d, k, niter=niter, nredo=nredo, seed=seed, spherical=spherical, verbose=False,
                        min_points_per_centroid=1, max_points_per_centroid=max_points_per_centroid)


def assign(km: faiss.Kmeans, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row (int64) and its distance (squared L2, or inner product when spherical)."""
    dist, ids = km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return ids[:, 0].astype(np.int64), dist[:, 0]


def train_kmeans(
    x: np.ndarray,
    k: int,
    *,
    niter: int,
    nredo: int = 1,
    seed: int = 0,
    spherical: bool = False,
    max_points_per_centroid: int = 256,
    init: str = "random",
    restarts: str = "faiss",
) -> faiss.Kmeans:
    """A trained ``faiss.Kmeans`` on the rows of ``x`` (``init`` and ``restarts``: module notes)."""
    if init not in INITS or restarts not in RESTARTS:
        raise ValueError(f"init must be one of {INITS} and restarts one of {RESTARTS}, got {init!r}, {restarts!r}")
    if init == "k-means++" and restarts != "reseeded":
        raise ValueError("k-means++ seeding needs restarts='reseeded' (faiss would restart from the same seeds)")
    if spherical and restarts == "reseeded":
        raise ValueError("restarts='reseeded' keeps the lowest summed L2 distance; spherical k-means needs 'faiss'")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] < k:
        raise TooFewPoints(f"k-means with k={k} needs at least k vectors, got {x.shape[0]}")
    d = x.shape[1]
    if restarts == "faiss":
        km = _faiss_kmeans(d, k, niter, nredo, seed, spherical, max_points_per_centroid)
        km.train(x)
        return km
    best, best_obj = None, np.inf
    for redo in range(nredo):
        run_seed = seed * 1000 + redo
        km = _faiss_kmeans(d, k, niter, 1, run_seed, spherical, max_points_per_centroid)
        km.train(x, init_centroids=kmeans_plus_plus(x, k, run_seed) if init == "k-means++" else None)
        obj = float(assign(km, x)[1].sum(dtype=np.float64))
        if obj < best_obj:
            best, best_obj = km, obj
    return best


def kmeans_assign(x: np.ndarray, k: int, **kwargs) -> tuple[np.ndarray, float]:
    """Train on the rows of ``x`` (:func:`train_kmeans` keywords) and return every row's cluster id and the
    summed distance of the rows to their centroids."""
    km = train_kmeans(x, k, **kwargs)
    ids, dist = assign(km, x)
    return ids, float(dist.sum(dtype=np.float64))
