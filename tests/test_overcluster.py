"""Overclustering protocol (METHOD.md §6.2) end to end: known answers, quirk options, the synthetic split."""

import numpy as np
import pytest
import torch
from eval_helpers import make_context
from PIL import Image

from neco.errors import ConfigError
from neco.eval.overcluster import protocol as overcluster
from neco.eval.primitives.batches import evaluated_count

PATCH, GRID = 8, 4
SIZE = PATCH * GRID
PALETTE = np.array([[230, 30, 30], [30, 200, 40], [40, 60, 230], [240, 230, 40]], dtype=np.uint8)
FAST = {"image_size": SIZE, "mask_size": 10, "seeds": [0, 1], "kmeans_iters": 20, "faiss_threads": 1}


class ColourCells:
    """Images of 8x8-pixel cells, each a random class drawn in its class colour (plus noise), with masks.

    ``colours`` maps class -> palette row (two classes sharing a colour cannot be told apart); ``relabel``
    renames the mask labels (a permuted label space, same images); ``ignore_index`` as the datasets have it.
    """

    name, split = "cells", "val"
    class_names = ("a", "b", "c", "d")

    def __init__(self, n=12, seed=0, colours=(0, 1, 2, 3), relabel=None, num_classes=4, ignore_index=255,
                 labels=(0, 1, 2, 3)):
        rng = np.random.default_rng(seed)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        cells = rng.choice(np.asarray(labels), size=(n, GRID, GRID))
        cells[:, 0, : len(labels)] = labels  # every label in every image
        self.cells, self.colours = cells, np.asarray(colours)
        self.relabel = np.arange(256) if relabel is None else np.asarray(list(relabel) + list(range(len(relabel), 256)))
        self.noise = rng.integers(-12, 13, size=(n, SIZE, SIZE, 3))

    def __len__(self):
        return len(self.cells)

    def __getitem__(self, i):
        mask = self.cells[i].repeat(PATCH, 0).repeat(PATCH, 1)
        rgb = PALETTE[self.colours[mask]].astype(np.int64) + self.noise[i]
        return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)), torch.from_numpy(self.relabel[mask])


class PatchColour(torch.nn.Module):
    """Features = each patch's mean colour through a fixed random linear map: they encode the cell's colour."""

    def __init__(self, dim=8):
        super().__init__()
        self.proj = torch.nn.Linear(3, dim)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        return self.proj(torch.nn.functional.avg_pool2d(x, PATCH).permute(0, 2, 3, 1))


class RandomTokens(torch.nn.Module):
    """Features that know nothing about the image."""

    def __init__(self, dim=8):
        super().__init__()
        self.gen = torch.Generator().manual_seed(0)
        self.dim = dim

    def forward(self, x):
        b, _, h, w = x.shape
        return torch.randn(b, h // PATCH, w // PATCH, self.dim, generator=self.gen)


def _run(tmp_path, dataset, model=None, name="cells", figures=0, **options):
    # Figures cost seconds of matplotlib layout each: only the tests that check them ask for them.
    ctx = make_context(tmp_path, model=model or PatchColour(), get_dataset=lambda split: dataset,
                       dataset_name=name, cache=False, num_figures=figures)
    return overcluster.run(ctx, {**FAST, **options})


@pytest.mark.parametrize("pca_dim", [3, None])
def test_class_encoding_features_score_100_at_k_classes_and_above(tmp_path, pca_dim):
    res = _run(tmp_path, ColourCells(), ks=["classes", 12], pca_dim=pca_dim, figures=2 if pca_dim else 0)
    assert res.metrics["k4/miou"] == pytest.approx(100.0)
    assert res.metrics["k12/miou"] == pytest.approx(100.0)  # many-to-one, precision-based
    assert res.metrics["k12_iou/miou"] == pytest.approx(100.0)
    assert res.metrics["k4/miou_std"] == 0.0
    assert res.extra["k4"]["matching"] == "hungarian" and res.extra["k12"]["matching"] == "precision"
    assert res.extra["k12_iou"]["per_class"]["iou"] == pytest.approx({c: 1.0 for c in "abcd"})
    assert 0.0 < res.metrics["k12/bg_fraction"] < 1.0
    assert len(res.figures) == (2 if pca_dim else 0) and all(tmp_path.joinpath(f).is_file() for f in res.figures)


def test_random_features_score_about_chance(tmp_path):
    res = _run(tmp_path, ColourCells(n=64), model=RandomTokens(), ks=["classes"], seeds=[0])
    # Four balanced classes and four clusters independent of them: IoU ~ (1/16) / (2/4 - 1/16) = 1/7.
    assert 9.0 < res.metrics["k4/miou"] < 22.0


def test_permuted_label_space_is_undone_by_matching(tmp_path):
    merged = dict(colours=(0, 1, 2, 2), n=24)  # classes 2 and 3 look alike: the score is not trivially 100
    base = _run(tmp_path / "a", ColourCells(**merged), ks=["classes"], seeds=[0])
    perm = (2, 0, 3, 1)
    permuted = _run(tmp_path / "b", ColourCells(**merged, relabel=perm), ks=["classes"], seeds=[0])
    assert base.metrics["k4/miou"] < 90.0
    assert permuted.metrics["k4/miou"] == pytest.approx(base.metrics["k4/miou"])
    iou_base, iou_perm = base.extra["k4"]["per_class"]["iou"], permuted.extra["k4"]["per_class"]["iou"]
    names = ColourCells.class_names
    for c in range(4):
        assert iou_perm[names[perm[c]]] == pytest.approx(iou_base[names[c]])


def test_drop_last_batch_counts(tmp_path):
    assert evaluated_count(1449, 32, True) == 1440  # VOC val in the reference (METHOD.md §10.13)
    assert evaluated_count(1449, 32, False) == 1449
    data = ColourCells(n=12)
    dropped = _run(tmp_path / "a", data, ks=["classes"], seeds=[0], batch_size=5, drop_last_batch=True)
    assert dropped.extra["num_images"] == 10 and dropped.extra["num_images_in_split"] == 12
    kept = _run(tmp_path / "b", data, ks=["classes"], seeds=[0], batch_size=5)  # default: as the reference
    assert kept.extra["num_images"] == 12 and kept.options["drop_last_batch_resolved"] is False
    voc = _run(tmp_path / "c", data, name="voc", ks=["classes"], seeds=[0], batch_size=5)
    assert voc.extra["num_images"] == 10 and voc.options["drop_last_batch_resolved"] is True


def test_miou_over_all_class_ids_counts_the_ignored_label_as_zero(tmp_path):
    # ADE20K-like: label 0 is the ignore index and never a valid pixel, yet one of the num_classes ids.
    data = ColourCells(labels=(1, 2, 3), ignore_index=0)
    every = _run(tmp_path / "a", data, ks=[6], seeds=[0])
    excl = _run(tmp_path / "b", data, ks=[6], seeds=[0], miou_classes="exclude_ignore")
    assert every.metrics["k6/miou"] == pytest.approx(100.0 * 3 / 4)  # 151 ids: x 150/151 for ADE20K
    assert excl.metrics["k6/miou"] == pytest.approx(100.0)


def test_bad_options_fail_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="miou_classes"):
        _run(tmp_path, ColourCells(), miou_classes="present")
    with pytest.raises(ConfigError, match="ks"):
        _run(tmp_path, ColourCells(), ks=["clases"])
    with pytest.raises(ConfigError, match="kmeans_iter"):
        _run(tmp_path, ColourCells(), kmeans_iter=3)


def test_end_to_end_on_the_synthetic_split(tmp_path):
    ctx = make_context(tmp_path, num_figures=0)
    cfg = {"per_dataset": {"synthetic": {"image_size": 48, "mask_size": 24, "ks": ["classes", 12], "seeds": [0, 1],
                                         "kmeans_iters": 20, "faiss_threads": 1}}}
    res = overcluster.run(ctx, cfg)
    for key in ("k7/miou", "k7/miou_std", "k7/pixel_acc", "k12/miou", "k12/bg_fraction", "k12_iou/miou"):
        assert 0.0 <= res.metrics[key] <= 100.0, key
    assert res.options["ks"] == ["classes", 12] and res.options["image_size"] == 48
    assert res.extra["num_images"] == 12 and res.extra["token_grid"] == [6, 6]
    assert len(res.extra["k7"]["miou_per_seed"]) == 2
    assert set(res.extra["k7"]["per_class"]["precision"]) == set(ctx.dataset("val").class_names)
    assert res.figures == []
