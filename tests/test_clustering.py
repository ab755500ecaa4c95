"""Standardisation, PCA, k-means and cluster scoring (neco.eval.primitives) against brute force and hand values."""

import numpy as np
import pytest
import torch

from neco.eval.primitives.cluster_scoring import cluster_confusion, resolve_ks, score_clusters
from neco.eval.primitives.kmeans import faiss_threads, kmeans_assign
from neco.eval.primitives.labels import LABEL_RESIZE_MODES, resize_label_map, tokens_to_mask
from neco.eval.primitives.pca import Standardizer, pca_training_rows, standardise_and_project


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    with faiss_threads(1):
        yield


def _chunks(x, rows):
    return lambda: (x[s : s + rows] for s in range(0, len(x), rows))


def test_standardizer_matches_numpy_for_any_chunking():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(1003, 6)) * [1, 10, 0.1, 3, 1e3, 2] + [0, 5, -2, 1e4, 7, 0]).astype(np.float32)
    want = (x.astype(np.float64) - x.mean(0, dtype=np.float64)) / (x.astype(np.float64).std(0) + 1e-5)
    for chunk in (1003, 100, 7, 1):
        s = Standardizer("eps", 1e-5).fit(_chunks(x, chunk))
        np.testing.assert_allclose(s.mean, x.astype(np.float64).mean(0), rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(s.var, x.astype(np.float64).var(0), rtol=1e-6)
        np.testing.assert_allclose(s.transform(x), want, rtol=1e-5, atol=1e-5)


def test_standardizer_eps_by_hand():
    # A dimension alternating 0 and 2e-5: mean 1e-5, population std 1e-5.
    x = np.tile(np.array([[0.0, 1.0], [2e-5, 1.0]]), (50, 1))
    monitor = Standardizer("eps", 1e-5).fit(lambda: [x]).transform(x)  # (x - mean) / (std + 1e-5) = +-1e-5 / 2e-5
    np.testing.assert_allclose(monitor[:2, 0], [-0.5, 0.5], rtol=1e-4)
    np.testing.assert_allclose(monitor[:, 1], 0.0)
    # sklearn: (x - mean) / std; the constant column keeps scale 1
    sk = Standardizer("rounding").fit(lambda: [x]).transform(x)
    np.testing.assert_allclose(sk[:2, 0], [-1.0, 1.0], rtol=1e-4)
    np.testing.assert_allclose(sk[:, 1], 0.0)
    assert Standardizer("rounding").fit(lambda: [x]).scale[1] == 1.0


def test_pca_projection_matches_numpy_svd_up_to_sign():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(600, 12)) @ rng.normal(size=(12, 12)) * np.linspace(5, 0.1, 12)).astype(np.float32)
    got = standardise_and_project(_chunks(x, 128), len(x), 12, pca_dim=4, eps=1e-5)
    z = (x.astype(np.float64) - x.mean(0)) / (x.std(0) + 1e-5)
    zc = z - z.mean(0)
    _, _, vt = np.linalg.svd(zc, full_matrices=False)
    want = zc @ vt[:4].T
    signs = np.sign((got * want).sum(0))
    np.testing.assert_allclose(got, want * signs, rtol=1e-3, atol=1e-3)


def test_pca_is_skipped_when_not_reducing():
    x = np.random.default_rng(2).normal(size=(50, 3)).astype(np.float32)
    got = standardise_and_project(_chunks(x, 16), 50, 3, pca_dim=50, eps=1e-5)
    np.testing.assert_allclose(got, (x - x.mean(0)) / (x.std(0) + 1e-5), rtol=1e-5, atol=1e-5)


def test_pca_training_rows_slice_then_faiss_sample_size():
    assert np.array_equal(pca_training_rows(500, 4, max_points=None), np.arange(500))
    assert np.array_equal(pca_training_rows(500, 4, max_points=120), np.arange(120))
    rows = pca_training_rows(10_000, 4, max_points=9_000)  # 1000 * D = 4000 of the first 9000
    assert len(rows) == 4000 and rows.max() < 9000 and len(np.unique(rows)) == 4000


def _blobs(n_per=60, k=4, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, 5)) * 50
    labels = np.repeat(np.arange(k), n_per)
    return (centres[labels] + rng.normal(size=(k * n_per, 5))).astype(np.float32), labels


def test_kmeans_recovers_well_separated_blobs():
    x, labels = _blobs()
    assign, _ = kmeans_assign(x, 4, niter=20, nredo=5, seed=0)
    # The same partition up to renaming: each blob maps to one cluster and the clusters are distinct.
    pairs = set(zip(labels.tolist(), assign.tolist(), strict=True))
    assert len(pairs) == 4 and len({a for _, a in pairs}) == 4


def test_kmeans_seeds_and_restarts_are_deterministic():
    x = np.random.default_rng(3).normal(size=(400, 4)).astype(np.float32)  # no cluster structure: init matters
    a1, o1 = kmeans_assign(x, 8, niter=10, nredo=1, seed=0)
    a2, o2 = kmeans_assign(x, 8, niter=10, nredo=1, seed=0)
    assert np.array_equal(a1, a2) and o1 == o2
    b, _ = kmeans_assign(x, 8, niter=10, nredo=1, seed=1)
    assert not np.array_equal(a1, b)
    # faiss's first restart is the single run; keeping the best of five can only lower the objective.
    _, o5 = kmeans_assign(x, 8, niter=10, nredo=5, seed=0)
    assert o5 <= o1 + 1e-3
    a5b, o5b = kmeans_assign(x, 8, niter=10, nredo=5, seed=0)
    assert o5b == o5


@pytest.mark.parametrize("mode", LABEL_RESIZE_MODES)
@pytest.mark.parametrize("grid,patch,mask_size", [(4, 8, 10), (32, 14, 100), (28, 16, 100), (12, 8, 48)])
def test_tokens_to_mask_reproduces_token_constant_masks_exactly(grid, patch, mask_size, mode):
    from neco.eval.primitives.labels import resize_mask

    tokens = torch.arange(grid * grid).view(1, grid, grid)
    # A mask constant on the patches of the input, shrunk with the same rule as the evaluation masks, is the
    # same map, exact ties included (448 -> 100 px puts output pixel 12 exactly on a token border).
    mask = tokens[0].repeat_interleave(patch, 0).repeat_interleave(patch, 1).numpy()
    want = resize_mask(mask, grid * patch, mask_size, label_resize=mode)
    assert np.array_equal(tokens_to_mask(tokens, grid * patch, mask_size, mode)[0].numpy(), want)


@pytest.mark.parametrize("mode", LABEL_RESIZE_MODES)
def test_integer_upsampling_is_the_same_for_both_rules(mode):
    assert resize_label_map(torch.tensor([[[0, 1], [2, 3]]]), 4, mode)[0].tolist() == [
        [0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_resolve_ks():
    assert resolve_ks(["classes", 500, 300], 21) == [21, 500, 300]
    with pytest.raises(ValueError):
        resolve_ks(["class"], 21)
    with pytest.raises(ValueError):
        resolve_ks([0], 21)


def test_cluster_confusion_upsamples_and_drops_ignored_pixels():
    assign = torch.tensor([[[0, 1], [1, 0]]])
    masks = torch.tensor([[[0, 0, 1, 1], [0, 255, 1, 1], [1, 1, 0, 0], [1, 1, 0, 255]]], dtype=torch.uint8)
    conf = cluster_confusion(assign, masks, k=2, num_classes=2, ignore_index=255, image_size=4)
    assert conf.tolist() == [[6, 0], [0, 8]]


# A confusion (rows: classes 0, 1; columns: clusters 0, 1, 2) where the matchings disagree on cluster 2:
# its majority is class 0 (60 of 100 px) but its IoU is higher with the small class 1 (40/110 vs 60/1100).
CONF = torch.tensor([[1000, 0, 60], [0, 10, 40]])


def test_many_to_one_precision_and_iou_by_hand():
    prec = score_clusters(CONF, "precision")
    assert prec["mapping"].tolist() == [0, 1, 0]
    # Merged: [[1060, 0], [40, 10]] -> IoU 1060/1100 and 10/50.
    assert prec["miou"] == pytest.approx(100 * (1060 / 1100 + 10 / 50) / 2)
    assert prec["bg_fraction"] == pytest.approx(2 / 3)
    assert prec["precision"] == pytest.approx([1060 / 1100, 1.0])
    assert prec["recall"] == pytest.approx([1.0, 10 / 50])
    assert prec["pixel_acc"] == pytest.approx(100 * 1070 / 1110)
    iou = score_clusters(CONF, "iou")
    assert iou["mapping"].tolist() == [0, 1, 1]
    # Merged: [[1000, 60], [0, 50]] -> IoU 1000/1060 and 50/110.
    assert iou["miou"] == pytest.approx(100 * (1000 / 1060 + 50 / 110) / 2)
    assert iou["bg_fraction"] == pytest.approx(1 / 3)


def test_hungarian_undoes_a_permutation_and_unmatched_clusters_go_to_background():
    conf = torch.tensor([[0, 5, 0, 0], [0, 0, 7, 1], [9, 0, 0, 0]])
    out = score_clusters(conf, "hungarian")
    assert out["mapping"].tolist() == [2, 0, 1, 0]
    # Cluster 3's pixel of class 1 becomes a class-0 prediction: IoU 5/6 (class 0) and 7/8 (class 1).
    assert out["miou"] == pytest.approx(100 * (5 / 6 + 7 / 8 + 1) / 3)


def test_excluding_the_ignored_class_rescales_by_classes_over_classes_minus_one():
    # ADE20K-like: label 0 is the ignore index but still one of the class ids; it never occurs.
    conf = torch.tensor([[0, 0, 0], [0, 8, 0], [0, 0, 5]])
    every = score_clusters(conf, "hungarian")
    excl = score_clusters(conf, "hungarian", exclude_class=0)
    assert every["miou"] == pytest.approx(100 * 2 / 3)
    assert excl["miou"] == pytest.approx(100.0)
    assert excl["miou"] / every["miou"] == pytest.approx(3 / 2)  # 151/150 for ADE20K
    assert score_clusters(conf, "hungarian", exclude_class=255)["miou"] == every["miou"]  # VOC: no-op
