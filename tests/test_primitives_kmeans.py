"""faiss k-means (neco.eval.primitives.kmeans): each restart scheme against the faiss calls it stands for, and
the refusals of combinations that cannot mean what they say."""

import faiss
import numpy as np
import pytest

from neco.eval.primitives.kmeans import (
    TooFewPoints,
    assign,
    faiss_threads,
    kmeans_assign,
    kmeans_plus_plus,
    train_kmeans,
)


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    with faiss_threads(1):
        yield


def _rows(seed=0, n=600, d=5):
    # Overlapping blobs: different seeds and restarts end in different local optima.
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, d)) * 1.5
    return (centres[rng.integers(8, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("spherical", [False, True])
def test_faiss_restarts_are_faiss_nredo(spherical):
    x = _rows()
    km = faiss.Kmeans(5, 6, niter=10, nredo=3, seed=4, spherical=spherical, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=50)
    km.train(x)
    want_dist, want_ids = km.index.search(x, 1)
    ids, obj = kmeans_assign(x, 6, niter=10, nredo=3, seed=4, spherical=spherical, max_points_per_centroid=50)
    assert np.array_equal(ids, want_ids[:, 0])
    assert obj == float(want_dist.sum(dtype=np.float64))


@pytest.mark.parametrize("init", ["random", "k-means++"])
def test_reseeded_restarts_keep_the_lowest_total_distance_of_independent_runs(init):
    x = _rows(1)
    runs = []
    for r in range(4):  # the quick check's scheme: one run per restart, seeded seed * 1000 + r
        km = faiss.Kmeans(5, 6, niter=10, seed=2 * 1000 + r, verbose=False, min_points_per_centroid=1)
        km.train(x, init_centroids=kmeans_plus_plus(x, 6, 2 * 1000 + r) if init == "k-means++" else None)
        dist, ids = km.index.search(x, 1)
        runs.append((float(dist.sum(dtype=np.float64)), ids[:, 0]))
    objectives = [o for o, _ in runs]
    assert len(set(objectives)) > 1  # the restarts differ, so which one is kept matters
    ids, obj = kmeans_assign(x, 6, niter=10, nredo=4, seed=2, init=init, restarts="reseeded")
    best = int(np.argmin(objectives))
    assert obj == objectives[best] and np.array_equal(ids, runs[best][1])


def test_kmeans_plus_plus_seeding_changes_the_result():
    x = _rows(2)
    a, _ = kmeans_assign(x, 6, niter=5, seed=0, init="random", restarts="reseeded")
    b, _ = kmeans_assign(x, 6, niter=5, seed=0, init="k-means++", restarts="reseeded")
    assert not np.array_equal(a, b)


def test_assign_is_the_nearest_centroid():
    x = _rows(3)
    km = train_kmeans(x, 5, niter=10)
    ids, dist = assign(km, x)
    d2 = ((x[:, None, :] - km.centroids[None]) ** 2).sum(-1)
    assert np.array_equal(ids, d2.argmin(1))
    np.testing.assert_allclose(dist, d2.min(1), rtol=1e-4, atol=1e-4)


def test_refused_combinations_and_sizes():
    x = _rows(4, n=20)
    with pytest.raises(ValueError, match="k-means\\+\\+ seeding needs restarts='reseeded'"):
        train_kmeans(x, 3, niter=5, init="k-means++")
    with pytest.raises(ValueError, match="spherical"):
        train_kmeans(x, 3, niter=5, spherical=True, restarts="reseeded")
    with pytest.raises(ValueError, match="init must be"):
        train_kmeans(x, 3, niter=5, init="kmeans++")
    with pytest.raises(TooFewPoints, match="k=21"):
        train_kmeans(x, 21, niter=5)
