"""Feature preparation and k-means of the unsupervised segmentation protocol (METHOD.md §6.5.2-5), with its own
parameters for the shared primitives (neco.eval.primitives.pca, neco.eval.primitives.kmeans).

Features of train and val are standardised together (population std, constant dimensions left unscaled by the
``threshold`` rule) in float64 and projected on 50 principal components with faiss's ``PCAMatrix`` fitted on the
rows faiss itself samples from all of them. k-means is faiss's with the reference's settings, including faiss's
own subsampling to 256 points per centroid for training.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
import torch

from neco.errors import ConfigError
from neco.eval.primitives.kmeans import TooFewPoints, assign, train_kmeans
from neco.eval.primitives.labels import nearest_source_indices
from neco.eval.primitives.pca import standardise_and_project

__all__ = ["UNSUP_PCA", "project_tokens", "fit_kmeans", "ForegroundClustering"]

# METHOD.md §6.5.2; pca_dim equal to the feature dimension still fits the PCA (a rotation), as this protocol always has.
UNSUP_PCA = dict(constant_dims="threshold", precision="float64", full_rank_pca=True)


def project_tokens(parts: Sequence[torch.Tensor], dim: int, chunk: int = 262_144) -> torch.Tensor:
    """Standardise the ``(N_i, h, w, D)`` feature tensors jointly, then PCA: ``float32 (sum N_i, h, w, dim)``.

    Statistics are float64 sums over chunks (the reference fits its scaler incrementally on chunks of 100k; the
    result is the same up to rounding).
    """
    n_img = sum(p.shape[0] for p in parts)
    h, w, d = parts[0].shape[1:]
    if dim > d:
        raise ConfigError(f"eval.unsup_seg.pca_dim={dim} exceeds the feature dimension {d}")
    flats = [p.reshape(-1, d) for p in parts]

    def chunks():
        for f in flats:
            for s in range(0, f.shape[0], chunk):
                yield f[s:s + chunk].numpy()

    rows = sum(f.shape[0] for f in flats)
    out = standardise_and_project(chunks, rows, d, dim, **UNSUP_PCA, apply_rows=chunk)
    return torch.from_numpy(out).reshape(n_img, h, w, dim)


def fit_kmeans(x: np.ndarray, k: int, niter: int, nredo: int, seed: int, spherical: bool, option: str) -> faiss.Kmeans:
    """A trained ``faiss.Kmeans`` (best of ``nredo`` faiss restarts); ``option`` names the setting that sets ``k``."""
    try:
        return train_kmeans(x, k, niter=niter, nredo=nredo, seed=seed, spherical=spherical)
    except TooFewPoints as err:
        raise ConfigError(f"eval.unsup_seg.{option}={k}: {err}") from err


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
        km = fit_kmeans(self.train_x, k, self.niter, self.nredo, seed, spherical=False, option=option)
        token_labels = torch.from_numpy(assign(km, self.tokens)[0])
        out = torch.full(self.fg.shape, k, dtype=torch.long)
        out[self.fg] = token_labels[self.pixel_token]
        return out
