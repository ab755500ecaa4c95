"""Feature preparation and faiss k-means for the unsupervised segmentation protocol (METHOD.md §6.5.2-5).

Features of train and val are standardised together (scikit-learn ``StandardScaler`` semantics: population
std, constant dimensions left unscaled) and projected on 50 principal components with faiss's ``PCAMatrix``
(centring and projection, no whitening). k-means is faiss's, with the reference's settings, including faiss's
own subsampling to 256 points per centroid for training.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
import torch

from neco.errors import ConfigError
from neco.eval.primitives.clustering import faiss_threads
from neco.eval.primitives.labels import nearest_source_indices

__all__ = ["faiss_threads", "standardise_pca", "faiss_kmeans", "assign", "ForegroundClustering"]


def standardise_pca(parts: Sequence[torch.Tensor], dim: int, chunk: int = 262_144) -> torch.Tensor:
    """Standardise the ``(N_i, h, w, D)`` feature tensors jointly, then PCA: ``float32 (sum N_i, h, w, dim)``.

    Statistics are exact float64 sums over chunks (the reference fits its scaler incrementally on chunks of
    100k; the result is the same up to rounding).
    """
    n_img = sum(p.shape[0] for p in parts)
    h, w, d = parts[0].shape[1:]
    if dim > d:
        raise ConfigError(f"eval.unsup_seg.pca_dim={dim} exceeds the feature dimension {d}")
    flats = [p.reshape(-1, d) for p in parts]
    rows = sum(f.shape[0] for f in flats)
    total = torch.zeros(d, dtype=torch.float64)
    for f in flats:
        for s in range(0, f.shape[0], chunk):
            total += f[s:s + chunk].double().sum(dim=0)
    mean = total / rows
    sq = torch.zeros(d, dtype=torch.float64)
    for f in flats:
        for s in range(0, f.shape[0], chunk):
            sq += (f[s:s + chunk].double() - mean).square().sum(dim=0)
    scale = (sq / rows).sqrt()
    scale[scale < 10 * np.finfo(np.float64).eps] = 1.0  # StandardScaler's rule for constant dimensions
    x = np.empty((rows, d), dtype=np.float32)
    at = 0
    for f in flats:
        for s in range(0, f.shape[0], chunk):
            block = f[s:s + chunk]
            x[at:at + len(block)] = ((block.double() - mean) / scale).float().numpy()
            at += len(block)
    pca = faiss.PCAMatrix(d, dim)  # eigen_power 0: projection only, as the reference
    pca.train(x)
    out = np.empty((rows, dim), dtype=np.float32)
    for s in range(0, rows, chunk):
        out[s:s + chunk] = pca.apply(x[s:s + chunk])
    return torch.from_numpy(out).reshape(n_img, h, w, dim)


def faiss_kmeans(x: np.ndarray, k: int, niter: int, nredo: int, seed: int, spherical: bool, option: str):
    """A trained ``faiss.Kmeans`` (best of ``nredo`` restarts); ``option`` names the setting that sets ``k``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] < k:
        raise ConfigError(f"eval.unsup_seg.{option}={k}: k-means needs at least {k} vectors, got {x.shape[0]}")
    # min_points_per_centroid only controls faiss's "too few points" warning; training is unchanged.
    km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, seed=seed, spherical=spherical, verbose=False,
                      min_points_per_centroid=1)
    km.train(x)
    return km


def assign(km, x: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """Nearest centroid of every row (inner product for spherical k-means, as faiss's own index)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape[0], dtype=np.int64)
    for s in range(0, x.shape[0], chunk):
        out[s:s + chunk] = km.index.search(x[s:s + chunk], 1)[1][:, 0]
    return out


class ForegroundClustering:
    """k-means of the foreground pixels of nearest-upsampled token features (METHOD.md §6.5.5).

    The reference upsamples the PCA features to the evaluation size, keeps the foreground pixels and clusters
    them: pixels are training points (so a token counts as often as it covers foreground pixels, and faiss
    subsamples among pixels). That training set is built once here; since all pixels of a token share its
    features, assignment is computed per token and copied to the pixels.
    """

    def __init__(self, tokens: torch.Tensor, fg: torch.Tensor, niter: int, nredo: int):
        n, h, w, d = tokens.shape
        size = fg.shape[-1]
        ry, rx = nearest_source_indices(h, size), nearest_source_indices(w, size)
        img, y, x = fg.nonzero(as_tuple=True)  # image-major, row-major: the reference's pixel order
        self.pixel_token = (img * h + ry[y]) * w + rx[x]
        self.tokens = tokens.reshape(-1, d).numpy()
        self.train_x = self.tokens[self.pixel_token.numpy()]
        self.fg, self.niter, self.nredo = fg, niter, nredo

    def labels(self, k: int, seed: int, option: str = "k_community") -> torch.Tensor:
        """``(N, S, S)`` int64 cluster ids of the foreground pixels, ``k`` for the background."""
        km = faiss_kmeans(self.train_x, k, self.niter, self.nredo, seed, spherical=False, option=option)
        token_labels = torch.from_numpy(assign(km, self.tokens))
        out = torch.full(self.fg.shape, k, dtype=torch.long)
        out[self.fg] = token_labels[self.pixel_token]
        return out
