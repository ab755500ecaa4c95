"""Noisy attention foreground and cluster-based foreground extraction (METHOD.md §6.5.2-4) on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.measure import label as sk_label
from torchvision.transforms import GaussianBlur

from neco.errors import ConfigError
from neco.eval.primitives.foreground import attention_maps, load_attention_masks
from neco.eval.primitives.labels import resize_label_map
from neco.eval.unsupervised.cbfe import (
    cluster_precisions,
    extract_foreground,
    foreground_jaccard,
    select_threshold,
)
from neco.loss.masks import attention_foreground, drop_small_components, keep_mass


def test_keep_mass_keeps_the_smallest_top_set_holding_65_percent():
    values = [0.40, 0.20, 0.12, 0.10, 0.08, 0.06, 0.04, 0.0, 0.0]
    grid = torch.tensor(values).reshape(1, 3, 3)
    for scale in (1.0, 3.0):  # the mass is normalised first
        kept = keep_mass(grid * scale, 0.65)
        assert kept.reshape(-1).tolist() == [True, True, True] + [False] * 6
    # 0.40 + 0.20 + 0.12 = 0.72 >= 0.65, while without the 0.12 cell only 0.60 would be kept.
    assert sum(values[:3]) >= 0.65 > sum(values[:2])


def test_small_components_removed_with_8_connectivity():
    m = torch.zeros(1, 7, 7, dtype=torch.bool)
    m[0, 0, 0] = True  # 1 cell: removed
    m[0, 0, 3:5] = True  # 2 cells side by side: removed
    m[0, 2, 0] = m[0, 3, 1] = True  # 2 cells touching by a corner: one component, removed
    m[0, 5:7, 5] = True
    m[0, 6, 6] = True  # an L of 3 cells: kept
    m[0, 2, 4] = m[0, 3, 5] = m[0, 4, 6] = True  # a diagonal chain of 3: one 8-connected component, kept
    out = drop_small_components(m, min_size=3)
    expected = torch.zeros_like(m)
    expected[0, 5:7, 5] = expected[0, 6, 6] = True
    expected[0, 2, 4] = expected[0, 3, 5] = expected[0, 4, 6] = True
    assert torch.equal(out, expected)


def _reference_process(attn: torch.Tensor) -> torch.Tensor:
    """The reference's process_attentions (blur, 65 % mass, components <= 2 cells) on head-averaged maps."""
    n, s = attn.shape[0], attn.shape[-1]
    a = GaussianBlur(7, sigma=0.6)(attn.mean(dim=1, keepdim=True)).reshape(n, 1, s * s)
    val, idx = torch.sort(a)
    val /= torch.sum(val, dim=-1, keepdim=True)
    th = torch.cumsum(val, dim=-1) > (1 - 0.65)
    th[:, 0] = torch.gather(th[:, 0], dim=1, index=torch.argsort(idx)[:, 0])
    th = th.reshape(n, 1, s, s).float()
    for j, t in enumerate(th):
        lab = sk_label(t.numpy())
        for c in range(1, lab.max() + 1):
            if (lab == c).sum() <= 2:
                th[j, 0][torch.from_numpy(lab[0] == c)] = 0
    return th[:, 0].bool()


def test_attention_foreground_matches_the_reference_pipeline():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(5, 3, 12, 12, generator=g) ** 4  # peaky maps, several heads
    # The parameters of METHOD.md §6.5.2 as conf/eval/unsup_seg.yaml sets them.
    fg = attention_foreground(attn, 0.65, kernel_size=7, sigma=0.6, min_size=3)
    assert torch.equal(fg, _reference_process(attn))


def test_attention_needs_the_model_hook_or_precomputed_masks():
    with pytest.raises(ConfigError, match="attention_masks"):
        attention_maps(torch.nn.Identity(), [], 32)


def test_load_attention_masks_file_and_reference_folder(tmp_path):
    train = torch.rand(4, 1, 6, 6) > 0.5
    val = np.random.default_rng(0).random((3, 6, 6)) > 0.5
    torch.save({"train_1464": train.float(), "val": torch.from_numpy(val)}, tmp_path / "masks.pt")
    assert torch.equal(load_attention_masks(tmp_path / "masks.pt", "train_1464", "train", 4), train[:, 0])
    np.savez(tmp_path / "masks.npz", train=train.numpy(), val=val)
    assert torch.equal(load_attention_masks(tmp_path / "masks.npz", "val", "val", 3), torch.from_numpy(val))
    folder = tmp_path / "ref"
    folder.mkdir()
    torch.save(train.float(), folder / "attn_train.pt")  # the reference's layout: (N, 1, h, w) floats
    assert torch.equal(load_attention_masks(folder, "train_1464", "train", 4), train[:, 0])
    with pytest.raises(ConfigError, match="4 train masks for 5 images"):
        load_attention_masks(folder, "train_1464", "train", 5)
    with pytest.raises(ConfigError, match="attn_val.pt"):
        load_attention_masks(folder, "val", "val", 3)


def test_unsup_seg_resize_is_torch_legacy_nearest():
    labels = torch.randint(0, 200, (2, 32, 32))
    for size in (100, 24):
        expected = F.interpolate(labels[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
        assert torch.equal(resize_label_map(labels, size), expected)
    gt = torch.randint(0, 21, (2, 448, 448), dtype=torch.uint8)
    expected = F.interpolate(gt[:, None].float(), size=(100, 100), mode="nearest")[:, 0].to(torch.uint8)
    assert torch.equal(resize_label_map(gt, 100), expected)


def test_cluster_precisions_average_over_images_where_the_cluster_occurs():
    clusters = torch.tensor([[[0, 0], [1, 1]], [[0, 2], [2, 2]]])
    fg = torch.tensor([[[1, 0], [1, 1]], [[1, 1], [0, 0]]], dtype=torch.bool)
    prec, present = cluster_precisions(clusters, fg, 4)
    # cluster 0: image 0 -> 1/2, image 1 -> 1/1; cluster 1: 2/2 (image 0 only); cluster 2: 1/3 (image 1 only).
    assert prec.tolist() == pytest.approx([0.75, 1.0, 1 / 3, 0.0])
    assert present.tolist() == [True, True, True, False]


def test_foreground_jaccard_counts_the_boundary_as_foreground():
    gt = torch.tensor([[[0, 255], [1, 0]]], dtype=torch.uint8)
    pred = torch.tensor([[[False, True], [False, False]]])
    assert foreground_jaccard(pred, gt) == pytest.approx(0.5)  # gt foreground: the 255 and the 1


def _one_row_case(gt_fg_clusters):
    """20 clusters of one pixel each in one 1x20 image; ground-truth foreground on ``gt_fg_clusters``."""
    clusters = torch.arange(20).view(1, 1, 20)
    gt = torch.zeros(1, 1, 20, dtype=torch.uint8)
    gt[0, 0, list(gt_fg_clusters)] = 3
    return clusters, gt


def test_select_threshold_picks_the_best_cut_and_rounds_its_precision():
    prec = np.linspace(0.02, 0.97, 20)  # cluster c has precision 0.02 + 0.05 c, already sorted
    clusters, gt = _one_row_case(range(13, 20))
    threshold, info = select_threshold(prec, clusters, gt, 20)
    assert info["cuts"] == [11, 12, 13, 14]  # int(0.55 * 20) .. int(0.75 * 20) - 1
    assert info["cut_jaccards"] == pytest.approx([7 / 9, 7 / 8, 1.0, 6 / 7])
    assert info["best_cut"] == 13 and info["best_cut_precision"] == pytest.approx(0.67)
    assert threshold == pytest.approx(0.65)  # 0.67 -> nearest multiple of 0.05
    assert (prec >= threshold).sum() == 7  # exactly the clusters of the best cut


def test_select_threshold_ties_go_to_the_later_cut():
    prec = np.linspace(0.02, 0.97, 20)
    clusters, gt = _one_row_case(range(14, 20))
    clusters = clusters.clone()
    clusters[clusters == 11] = 19  # clusters 11-13 absent: cuts 11..14 give the same foreground
    clusters[clusters == 12] = 19
    clusters[clusters == 13] = 19
    _, info = select_threshold(prec, clusters, gt, 20)
    assert len(set(info["cut_jaccards"])) == 1
    assert info["best_cut"] == 14  # the reference sorts by Jaccard (stable) and takes the last


def test_select_threshold_needs_a_cut():
    with pytest.raises(ConfigError, match="k_fg=2"):
        select_threshold(np.array([0.1, 0.9]), torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2), 2)


def test_extract_foreground_recomputes_precisions_on_val():
    prec_target = np.linspace(0.02, 0.97, 20)
    clusters, gt = _one_row_case(range(13, 20))
    # Train attention: 100 pixels per cluster-image so that cluster c's precision is prec_target[c].
    n = 100
    train_clusters = clusters.expand(n, 1, 20).clone()
    train_noisy = torch.zeros(n, 1, 20, dtype=torch.bool)
    for c, p in enumerate(prec_target):
        train_noisy[: int(round(p * n)), 0, c] = True
    train_gt = gt.expand(n, 1, 20).clone()
    # Val: cluster 19 is never attended, cluster 0 always.
    val_clusters = clusters.clone()
    val_noisy = torch.zeros(1, 1, 20, dtype=torch.bool)
    val_noisy[0, 0, 13:19] = True
    val_noisy[0, 0, 0] = True
    res = extract_foreground(train_clusters, val_clusters, train_noisy, val_noisy, train_gt, gt, 20)
    assert res.threshold == pytest.approx(0.65)
    assert res.fg_train[0, 0].tolist() == [False] * 13 + [True] * 7
    assert res.fg_val[0, 0].tolist() == [True] + [False] * 12 + [True] * 6 + [False]
    assert res.details["fg_jaccard_train"] == pytest.approx(1.0)
    assert res.details["fg_jaccard_val"] == pytest.approx(6 / 8)
