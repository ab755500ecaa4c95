"""Co-occurrence graph, Infomap merging, matching and tuning of the community detection (METHOD.md §6.5.6-8)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.feature import graycomatrix

from neco.eval.primitives.metrics import confusion_matrix
from neco.eval.unsupervised.community import (
    FIXED_ANGLES,
    REFERENCE_ANGLES,
    TrialRejected,
    cooccurrence_counts,
    cooccurrence_matrix,
    glcm_offsets,
    graph_edges,
    infomap_modules,
    module_lookup,
    score_merged,
    tune,
)

TINY = torch.tensor([[0, 0, 1], [0, 2, 1], [2, 2, 1]])


def test_offsets_follow_graycomatrix_rounding():
    ref = glcm_offsets([1, 2], REFERENCE_ANGLES)
    fixed = glcm_offsets([1, 2], FIXED_ANGLES)
    assert ref[:2] == [(0, 1), (0, 2)]  # angle 0: same row, columns to the right
    assert ref[10:12] == [(-1, -1), (-2, -1)]  # 4*pi/3: sin -0.87, cos -0.5(000000000000004)
    assert fixed[10:12] == [(-1, -1), (-1, -1)]  # 5*pi/4
    assert [r for r, f in zip(ref, fixed, strict=True) if r != f] == [(-2, -1)]


def test_cooccurrence_counts_by_hand_for_one_offset():
    counts = cooccurrence_counts(TINY[None], 3, [(0, 1)])[0]  # distance 1, angle 0: right neighbour
    expected = torch.zeros(3, 3, dtype=torch.long)
    expected[0, 0] = expected[0, 1] = expected[0, 2] = expected[2, 2] = 1
    expected[2, 1] = 2
    assert torch.equal(counts, expected)


def test_cooccurrence_counts_match_graycomatrix():
    g = np.random.default_rng(0)
    img = g.integers(0, 6, (9, 11))
    for angles in (REFERENCE_ANGLES, FIXED_ANGLES):
        oracle = graycomatrix(img.astype(np.uint8), distances=[1, 2], angles=list(angles), levels=6).sum(axis=(2, 3))
        ours = cooccurrence_counts(torch.from_numpy(img)[None], 6, glcm_offsets([1, 2], angles))[0]
        assert np.array_equal(ours.numpy(), oracle)


def test_angle_quirk_changes_the_counts_as_computed_by_hand():
    ref = cooccurrence_counts(TINY[None], 3, glcm_offsets([1, 2], REFERENCE_ANGLES))[0]
    fixed = cooccurrence_counts(TINY[None], 3, glcm_offsets([1, 2], FIXED_ANGLES))[0]
    # Only the distance-2 offset differs: (-2, -1) gives pairs (2, 0) and (1, 0); (-1, -1) gives (2, 0) twice,
    # (1, 0) and (1, 2).
    diff = torch.zeros(3, 3, dtype=torch.long)
    diff[2, 0] = -1
    diff[1, 2] = -1
    assert torch.equal(ref - fixed, diff)


def test_cooccurrence_matrix_normalisation_by_hand():
    labels = torch.tensor([[[0, 1, 1]], [[0, 2, 2]], [[0, 0, 1]]])
    a = cooccurrence_matrix(labels, 3, distances=[1], angles=[0.0])
    # Right neighbours: image 0: (0, 1) and (1, 1), the diagonal dropped; image 1: (0, 2), (2, 2); image 2:
    # (0, 0) dropped, (0, 1). Row 0 is non-zero in all three images, rows 1 and 2 in none.
    assert np.allclose(a, [[0, 2 / 3, 1 / 3], [0, 0, 0], [0, 0, 0]])


def _reference_create_matrix(clusters: np.ndarray, num_clusters: int) -> np.ndarray:
    """The reference's create_matrix, with graycomatrix as the counting oracle."""
    total = np.zeros((num_clusters, num_clusters))
    appearances = np.zeros(num_clusters)
    for img in clusters:
        counts = graycomatrix(img.astype(np.uint8), distances=[1, 2], levels=num_clusters,
                              angles=list(REFERENCE_ANGLES)).sum(axis=(2, 3)).astype(float)
        np.fill_diagonal(counts, 0)
        row = counts.sum(axis=1)
        total += np.divide(counts, row[:, None], out=np.zeros_like(counts), where=row[:, None] != 0)
        appearances += row > 0
    return np.divide(total, appearances[:, None], out=np.zeros_like(total), where=appearances[:, None] != 0)


def test_cooccurrence_matrix_matches_the_reference_loop():
    clusters = np.random.default_rng(1).integers(0, 7, (5, 10, 10))
    clusters[3] = 6  # an image with a single cluster: no row of it counts as an appearance
    ours = cooccurrence_matrix(torch.from_numpy(clusters), 7, chunk=2)
    assert np.allclose(ours, _reference_create_matrix(clusters, 7))


def test_graph_edges_need_both_directions_and_take_the_minimum():
    a = np.array([[0.0, 0.2, 0.05], [0.1, 0.0, 0.3], [0.5, 0.3, 0.0]])
    assert graph_edges(a, 0.1) == [(0, 1, 0.1), (1, 2, 0.3)]  # (0, 2): 0.05 < 0.1 in one direction
    assert graph_edges(a, 0.25) == [(1, 2, 0.3)]
    assert graph_edges(a, 0.6) == []


def test_infomap_merges_two_obvious_communities():
    clique = [(i, j, 1.0) for i in range(4) for j in range(i + 1, 4)]
    edges = clique + [(i + 4, j + 4, w) for i, j, w in clique] + [(3, 4, 0.01)]
    for seed in (1, 2, 3):
        modules = infomap_modules(edges, seed=seed, markov_time=1.0, preferred_modules=2)
        lut = module_lookup(modules, 10)  # clusters 8 and 9 have no edge
        assert len(set(lut[:4].tolist())) == 1 and len(set(lut[4:8].tolist())) == 1
        assert lut[0] != lut[4] and min(lut[:8].tolist()) >= 1
        assert lut[8:].tolist() == [0, 0]  # outside the graph: merged id 0, as the reference
    assert infomap_modules([], seed=1, markov_time=1.0, preferred_modules=2) == {}


def test_score_merged_undoes_a_permutation():
    g = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 4, (3, 8, 8), generator=g)
    perm = torch.tensor([2, 0, 3, 1])
    clusters = perm[gt]  # cluster ids 0..3 are a relabelling of the classes
    conf = confusion_matrix(clusters, gt, 4, 4, ignore_index=255)
    assert score_merged(conf, torch.arange(4), 4)["miou"] == pytest.approx(1.0)
    # Two clusters per class merged back by the lookup table: still exact.
    split = clusters + 4 * (torch.rand(clusters.shape, generator=g) > 0.5).long()
    conf8 = confusion_matrix(split, gt, 8, 4, ignore_index=255)
    assert score_merged(conf8, torch.arange(8) % 4 + 1, 4)["miou"] == pytest.approx(1.0)  # ids 1..4


def test_score_merged_with_more_module_ids_than_classes():
    # 3 classes; clusters 0..3 merged to ids 0, 1, 5, 5 (id 5 exceeds the classes: rectangular matching).
    conf = torch.tensor([[8, 0, 0, 2], [0, 6, 0, 0], [1, 0, 3, 0]])  # conf[class, cluster]
    res = score_merged(conf, torch.tensor([0, 1, 5, 5]), 3)
    # Merged columns: id 0 = (8, 0, 1), id 1 = (0, 6, 0), id 5 = (2, 0, 3). Hungarian: 0->0, 1->1, 5->2.
    # class 0: tp 8, fp 1, fn 2 -> 8/11; class 1: 6/6; class 2: tp 3, fp 2, fn 1 -> 3/6.
    assert res["per_class_iou"] == pytest.approx([8 / 11, 1.0, 0.5])
    assert res["mapping"][5] == 2 and res["mapping"][[2, 3, 4]].tolist() == [0, 0, 0]
    # With a fourth id competing for the classes, the unmatched one counts as background (class 0).
    res = score_merged(conf, torch.tensor([0, 1, 5, 7]), 3)
    # ids: 0 = (8, 0, 1), 1 = (0, 6, 0), 5 = (0, 0, 3), 7 = (2, 0, 0); matched 0, 1, 5; 7 -> class 0.
    assert res["per_class_iou"] == pytest.approx([10 / 11, 1.0, 3 / 4])


def test_tune_searches_the_grid_and_fails_rejected_trials():
    seen = []

    def objective(wt, mt, k):
        seen.append((wt, mt, k))
        if k == 16:
            raise TrialRejected("k=16")
        return -abs(wt - 0.05) - abs(mt - 1.0) - abs(k - 12) / 100

    study = tune(objective, 12, 1000, [0.01, 0.10, 0.01], [0.1, 2.0, 0.1], [8, 16, 4])
    assert len(study.trials) == 12
    for wt, mt, k in seen:
        assert k in (8, 12, 16)
        assert math.isclose(round(wt * 100), wt * 100, abs_tol=1e-6) and 0.01 - 1e-9 <= wt <= 0.1 + 1e-9
        assert math.isclose(round(mt * 10), mt * 10, abs_tol=1e-6) and 0.1 - 1e-9 <= mt <= 2.0 + 1e-9
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(failed) == sum(k == 16 for _, _, k in seen)
    assert study.best_params["k_community"] != 16
    again = tune(lambda wt, mt, k: wt + mt + k, 5, 1000, [0.01, 0.10, 0.01], [0.1, 2.0, 0.1], [8, 16, 4])
    first = tune(lambda wt, mt, k: wt + mt + k, 5, 1000, [0.01, 0.10, 0.01], [0.1, 2.0, 0.1], [8, 16, 4])
    assert [t.params for t in again.trials] == [t.params for t in first.trials]  # seeded TPE
