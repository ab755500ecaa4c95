"""Per-dimension standardisation, then PCA projection, of feature rows: the one implementation every clustering
evaluation uses.

The protocols differ in named parameters; each caller passes the values below, which reproduce what it has
always computed (its reference's behaviour):

============================  =====================  =========  ===========
caller                        ``constant_dims``      ``eps``    precision
============================  =====================  =========  ===========
overclustering, METHOD §6.2   ``rounding`` [#]_      —          ``float32``
k-means monitor, METHOD §6.1  ``eps``                1e-5       ``float32``
unsupervised seg, §6.5.2      ``threshold``          —          ``float64``
quick k-means (§6.1 reduced)  ``eps``                1e-5       ``float64``
============================  =====================  =========  ===========

.. [#] ``eval.overcluster.std_eps > 0`` selects ``eps`` with that epsilon instead.

Which rows train the PCA: the first ``pca_max_points`` (the monitor: 4M, the others: all), then faiss's sample.
The unsupervised protocol also passes ``full_rank_pca`` and ``apply_rows=262144`` (see
:func:`standardise_and_project`).

``constant_dims``, the scale of a dimension from its population std (every caller uses the population std):

* ``eps``: ``std + eps`` for every dimension, the monitor's ``(x - mean) / (std + 1e-5)`` (METHOD.md §6.1). A
  constant dimension becomes ``(x - mean) / eps``: zero up to the rounding of the mean.
* ``rounding``: ``std``, and 1 where the variance is within float64 rounding of zero given the mean and the
  row count (scikit-learn's ``StandardScaler`` with its ``_is_constant_feature`` test), as the overclustering
  script (METHOD.md §6.2).
* ``threshold``: ``std``, and 1 where ``std < 10 * float64 eps`` (scikit-learn's ``_handle_zeros_in_scale``
  without that test), as the unsupervised protocol has computed it (METHOD.md §6.5.2).

``precision``: ``float32`` is one pass over the rows (float32 deviations, float64 sums merged across chunks as
``StandardScaler.partial_fit`` does) and a float32 transform with the mean split in two float32 parts, within
about 1e-6 of float64 at half the memory traffic; it is what the 1.5M-6.4M-row sets of §6.1/§6.2 use.
``float64`` is two passes of float64 sums (torch's, per chunk) and a float64 transform rounded once to float32.

The PCA sample: faiss's ``PCAMatrix`` fits on at most ``1000 * D`` rows, drawn with faiss's own permutation
(seed 1234) from the rows it is handed. Those rows are drawn here, in that order, before standardising, so the
projection is bit for bit the one faiss fits when given every row (what every reference script does) while only
the sample is held.

A chunk source is a zero-argument callable returning an iterable of ``(rows, D)`` arrays, always the same rows
in the same order: feature sets (VOC val at 448 px: 1.5M tokens; the monitor: 6.4M upsampled pixels) are read
as a stream and only the projection is held whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import faiss
import numpy as np
import torch

__all__ = [
    "CONSTANT_DIMS",
    "PRECISIONS",
    "SCALER_CHUNK",
    "Standardizer",
    "pca_training_rows",
    "standardise_and_project",
]

CONSTANT_DIMS = ("eps", "rounding", "threshold")
PRECISIONS = ("float32", "float64")
SCALER_CHUNK = 100_000  # rows per partial fit: the reference fits sklearn's StandardScaler in chunks of 100k
PCA_SUBSAMPLE_SEED = 1234  # the seed faiss itself uses when it subsamples a PCA training set

ChunkSource = Callable[[], Iterable[np.ndarray]]


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


class Standardizer:
    """Per-dimension ``(x - mean) / scale`` with the population variance; see the module notes for the parameters."""

    def __init__(self, constant_dims: str = "eps", eps: float = 1e-5, precision: str = "float32"):
        _check("constant_dims", constant_dims, CONSTANT_DIMS)
        _check("precision", precision, PRECISIONS)
        if eps < 0 or (constant_dims == "eps" and eps == 0):
            raise ValueError(f"eps must be > 0 for constant_dims='eps' (>= 0 otherwise), got {eps}")
        self.constant_dims, self.eps, self.precision = constant_dims, float(eps), precision
        self.n = 0
        self.mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None  # sum of squared deviations from the mean

    # ------------------------------------------------------------------------------------------ fitting
    def fit(self, chunks: ChunkSource) -> Standardizer:
        """Statistics over every row of the chunk source (one pass in float32 precision, two in float64)."""
        if self.precision == "float32":
            for c in chunks():
                for start in range(0, c.shape[0], SCALER_CHUNK):
                    self._partial_fit32(c[start : start + SCALER_CHUNK])
        else:
            self._fit64(chunks)
        if self.n == 0:
            raise ValueError("Standardizer: the chunk source yielded no rows")
        return self

    def _partial_fit32(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        n_new = x.shape[0]
        if n_new == 0:
            return
        new_mean = x.sum(axis=0, dtype=np.float64) / n_new
        # Deviations in float32 from the float32-rounded mean, squares summed in float64; the second term
        # removes what that rounding adds (the correction sklearn's _incremental_mean_and_var applies too).
        dev = np.asarray(x, dtype=np.float32) - new_mean.astype(np.float32)
        new_m2 = np.square(dev).sum(axis=0, dtype=np.float64) - dev.sum(axis=0, dtype=np.float64) ** 2 / n_new
        if self.n == 0:
            self.mean, self._m2 = new_mean, new_m2
        else:  # the pairwise update of Chan et al., as StandardScaler.partial_fit: independent of the chunking
            total = self.n + n_new
            delta = new_mean - self.mean
            self.mean = self.mean + delta * (n_new / total)
            self._m2 = self._m2 + new_m2 + delta**2 * (self.n * n_new / total)
        self.n += n_new

    def _fit64(self, chunks: ChunkSource) -> None:
        total, rows = None, 0
        for c in chunks():
            part = torch.as_tensor(c).double().sum(dim=0)
            total = part if total is None else total + part
            rows += c.shape[0]
        if rows == 0:
            return
        mean = total / rows
        m2 = torch.zeros_like(mean)
        for c in chunks():
            m2 += (torch.as_tensor(c).double() - mean).square().sum(dim=0)
        self.n, self.mean, self._m2 = rows, mean.numpy(), m2.numpy()

    # ----------------------------------------------------------------------------------------- applying
    @property
    def var(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("Standardizer: fit it before use")
        return self._m2 / self.n

    @property
    def scale(self) -> np.ndarray:
        var = self.var
        std = np.sqrt(var)
        if self.constant_dims == "eps":
            return std + self.eps
        eps64 = np.finfo(np.float64).eps
        if self.constant_dims == "rounding":
            constant = var <= self.n * eps64 * var + (self.n * self.mean * eps64) ** 2
        else:
            constant = std < 10 * eps64
        return np.where(constant, 1.0, std)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """float32 ``(x - mean) / scale``."""
        if self.precision == "float64":
            return ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale).astype(np.float32)
        # float32 with the mean split in two float32 parts (its rounding error subtracted separately), so a mean
        # far larger than the spread costs no accuracy.
        hi = self.mean.astype(np.float32)
        lo = (self.mean - hi).astype(np.float32)
        out = np.subtract(np.asarray(x, dtype=np.float32), hi)
        out -= lo
        out *= (1.0 / self.scale).astype(np.float32)
        return out


def pca_training_rows(n_rows: int, dim: int, max_points: int | None) -> np.ndarray:
    """Indices, in training order, of the rows a PCA of ``dim``-dimensional rows is fitted on.

    The first ``max_points`` rows (all when None) are the candidates, as the reference slices them; above faiss's
    ``max_points_per_d * dim`` (1000 * D), faiss's own draw of that many (module notes).
    """
    n = n_rows if max_points is None else min(n_rows, max_points)
    cap = faiss.PCAMatrix(dim, 1).max_points_per_d * dim
    if n <= cap:
        return np.arange(n)
    perm = np.empty(n, dtype=np.int32 if n < 2**31 else np.int64)
    faiss.rand_perm(faiss.swig_ptr(perm), n, PCA_SUBSAMPLE_SEED)  # faiss's fvecs_maybe_subsample draw
    return perm[:cap].astype(np.int64)


def _gather(chunks: ChunkSource, rows: np.ndarray, scaler: Standardizer, dim: int) -> np.ndarray:
    """The standardised ``rows`` (any order) of the chunk source, scanning it once in order."""
    order = np.argsort(rows, kind="stable")
    wanted = rows[order]
    out = np.empty((len(rows), dim), dtype=np.float32)
    start = 0
    for c in chunks():
        lo, hi = np.searchsorted(wanted, [start, start + len(c)])
        if hi > lo:
            out[order[lo:hi]] = scaler.transform(c[wanted[lo:hi] - start])
        start += len(c)
        if len(wanted) == 0 or start > wanted[-1]:
            break
    return out


def standardise_and_project(
    chunks: ChunkSource,
    n_rows: int,
    dim: int,
    pca_dim: int | None = 50,
    *,
    constant_dims: str = "eps",
    eps: float = 1e-5,
    precision: str = "float32",
    pca_max_points: int | None = None,
    full_rank_pca: bool = False,
    apply_rows: int | None = None,
) -> np.ndarray:
    """Standardise every dimension, then project on the top ``pca_dim`` principal components (faiss's
    ``PCAMatrix``, eigen_power 0: centring and projection, no whitening).

    Returns float32 ``(n_rows, pca_dim)``; ``(n_rows, dim)`` standardised rows when ``pca_dim`` is None or not
    below ``dim`` (with ``full_rank_pca``, ``pca_dim == dim`` still fits the PCA: a rotation, as the
    unsupervised protocol has always done). Parameters: module notes.

    ``apply_rows``: the projection runs on consecutive blocks of this many rows (None: one block per chunk).
    The BLAS product rounds a row differently depending on the block it is in (measured on 716,800 rows: 22 %
    of them differ, by up to 1.4e-6, between 262,144-row blocks and per-chunk blocks), so a caller keeps the
    blocks its numbers were computed with; one block of ``apply_rows * dim`` floats is staged.
    """
    scaler = Standardizer(constant_dims, eps, precision).fit(chunks)
    if scaler.n != n_rows:
        raise ValueError(f"chunk source yielded {scaler.n} rows, expected {n_rows}")
    project = pca_dim is not None and (pca_dim < dim or (full_rank_pca and pca_dim == dim))
    pca = None
    if project:
        train = _gather(chunks, pca_training_rows(n_rows, dim, pca_max_points), scaler, dim)
        pca = faiss.PCAMatrix(dim, pca_dim)
        pca.train(train)
        del train
    out = np.empty((n_rows, pca_dim if project else dim), dtype=np.float32)
    if pca is None or apply_rows is None:
        start = 0
        for c in chunks():
            x = np.ascontiguousarray(scaler.transform(c))
            out[start : start + len(c)] = pca.apply(x) if pca is not None else x
            start += len(c)
        return out
    stage = np.empty((min(apply_rows, n_rows), dim), dtype=np.float32)
    filled = written = 0
    for c in chunks():
        x = scaler.transform(c)
        at = 0
        while at < len(x):
            take = min(len(stage) - filled, len(x) - at)
            stage[filled : filled + take] = x[at : at + take]
            filled, at = filled + take, at + take
            if filled == len(stage):
                out[written : written + filled] = pca.apply(stage)
                written, filled = written + filled, 0
    if filled:
        out[written : written + filled] = pca.apply(np.ascontiguousarray(stage[:filled]))
    return out
