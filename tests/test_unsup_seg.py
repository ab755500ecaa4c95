"""The CBFE + community detection protocol end to end (METHOD.md §6.5) on small synthetic data, on CPU."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from eval_helpers import make_context
from omegaconf import OmegaConf
from PIL import Image

from neco.errors import ConfigError
from neco.eval.primitives.features import IMAGENET_MEAN, IMAGENET_STD
from neco.eval.primitives.kmeans import assign
from neco.eval.unsupervised import protocol as unsup_seg
from neco.eval.unsupervised.clustering import ForegroundClustering, fit_kmeans, project_tokens

CONF = Path(__file__).resolve().parents[1] / "conf" / "eval" / "unsup_seg.yaml"


def _cfg(**overrides):
    """The shipped config with ``overrides`` (also over its synthetic block, which typed_options applies last)."""
    return OmegaConf.merge(OmegaConf.load(CONF), overrides, {"per_dataset": {"synthetic": overrides}})


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unsup_seg")
    ctx = make_context(tmp, num_figures=2)
    return ctx, unsup_seg.run(ctx, _cfg())


def test_end_to_end_on_the_synthetic_split(synthetic_run):
    ctx, res = synthetic_run
    assert set(res.metrics) == {"miou", "miou_std", "pixel_acc", "fg_jaccard", "cbfe/miou"}
    assert all(0.0 <= v <= 100.0 for v in res.metrics.values())
    assert res.options["k_fg"] == 20 and res.options["train_split"] == "train"  # the synthetic block applied
    assert len(res.extra["miou_per_run"]) == 3 and res.extra["infomap_seeds"] == [1, 2, 3]
    assert res.metrics["miou"] == pytest.approx(np.mean(res.extra["miou_per_run"]))
    assert len(res.extra["per_class_iou"]) == 7
    assert res.extra["hyperparameters"] == {"weight_threshold": 0.09, "markov_time": 2.0, "k_community": 12}
    cbfe = res.extra["cbfe"]
    assert cbfe["cuts"] == [11, 12, 13, 14] and cbfe["threshold"] in np.arange(0, 1, 0.05)
    assert Path(res.figures[0]).is_file()
    masks = torch.load(res.extra["attention_masks_file"], weights_only=True)
    assert masks["train"].shape == (24, 12, 12) and masks["val"].shape == (12, 12, 12)


def test_precomputed_attention_masks_give_the_same_result(synthetic_run, tmp_path):
    ctx, res = synthetic_run
    again = unsup_seg.run(ctx, _cfg(attention_masks=res.extra["attention_masks_file"], cbfe_score=False))
    assert again.metrics["miou"] == pytest.approx(res.metrics["miou"])
    assert again.metrics["fg_jaccard"] == pytest.approx(res.metrics["fg_jaccard"])


def test_tuning_reports_val_with_the_best_train_values(synthetic_run):
    ctx, _ = synthetic_run
    res = unsup_seg.run(ctx, _cfg(tune=True, trials=3, strict_trials=False, cbfe_score=False))
    tuning = res.extra["tuning"]
    assert tuning["completed"] == 3
    assert res.extra["hyperparameters"] == tuning["best_params"]
    assert tuning["best_params"]["k_community"] in (8, 12, 16, 20)
    assert res.metrics["tune/train_miou"] == pytest.approx(tuning["best_train_miou"])


def test_user_errors(synthetic_run, tmp_path):
    ctx, _ = synthetic_run
    with pytest.raises(ConfigError, match="angles"):
        unsup_seg.run(ctx, _cfg(angles="diagonal"))
    with pytest.raises(ConfigError, match="data=voc"):
        unsup_seg.run(make_context(tmp_path / "a", dataset_name="ade20k"), _cfg())
    stub = _ClassCoder()  # no forward_with_attention
    with pytest.raises(ConfigError, match="attention_masks"):
        unsup_seg.run(make_context(tmp_path / "b", model=stub, get_dataset=_blocks), _cfg(**_BLOCK_OPTS))


# ---------------------------------------------------------------------------------------- known answer

_CELL, _GRID = 8, 6  # 48-px images of 6x6 blocks aligned with the 8-px patches


class _Blocks:
    """Images of 8x8 blocks whose grey level encodes the class; each image holds two object classes."""

    num_classes, ignore_index, name = 7, 255, "blocks"

    def __init__(self, split: str, n: int):
        self.split, self.n = split, n

    def __len__(self):
        return self.n

    def grid(self, i: int) -> np.ndarray:
        g = np.zeros((_GRID, _GRID), dtype=np.int64)
        a, b = i % 6 + 1, (i + 3) % 6 + 1
        g[:3, :3] = a
        g[3:, 3:] = b
        return np.roll(g, i % 2, axis=1)

    def __getitem__(self, i: int):
        mask = np.kron(self.grid(i), np.ones((_CELL, _CELL), dtype=np.int64))
        image = np.repeat((mask * 36).astype(np.uint8)[..., None], 3, axis=2)
        return Image.fromarray(image), torch.from_numpy(mask)


def _blocks(split: str) -> _Blocks:
    return _Blocks(split, 24 if split.startswith("train") else 12)


class _ClassCoder(torch.nn.Module):
    """Patch features that encode the patch's class exactly (a fixed vector per class)."""

    patch_size, embed_dim = _CELL, 16

    def __init__(self):
        super().__init__()
        self.register_buffer("codes", torch.randn(7, 16, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        grey = (x[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255.0 / 36.0
        cls = torch.nn.functional.avg_pool2d(grey[:, None], _CELL)[:, 0].round().long().clamp(0, 6)
        return self.codes[cls]


_BLOCK_OPTS = dict(image_size=48, mask_size=48, eval_size=24, pca_dim=6, k_fg=16, kmeans_restarts=5, k_community=8,
                   num_runs=2, faiss_threads=1, cbfe_seeds=[0, 1])


def test_class_encoding_features_and_true_foreground_give_100(tmp_path):
    data = {s: _blocks(s) for s in ("train", "val")}
    masks = {s: torch.stack([torch.from_numpy(d.grid(i) != 0) for i in range(len(d))]) for s, d in data.items()}
    torch.save(masks, tmp_path / "masks.pt")
    ctx = make_context(tmp_path, model=_ClassCoder(), get_dataset=_blocks, dataset_name="synthetic", num_figures=0)
    res = unsup_seg.run(ctx, _cfg(attention_masks=str(tmp_path / "masks.pt"), **_BLOCK_OPTS))
    assert res.metrics["fg_jaccard"] == pytest.approx(100.0)
    assert res.extra["cbfe"]["threshold"] == pytest.approx(0.95)  # object clusters have precision 1
    assert res.metrics["cbfe/miou"] == pytest.approx(100.0)


# ---------------------------------------------------------------------------------------- clustering stages


def test_project_tokens_matches_scaler_then_faiss_pca():
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(3, 4, 4, 8, generator=g) * torch.arange(1, 9)).half()
    b = (torch.randn(2, 4, 4, 8, generator=g) * torch.arange(1, 9)).half()
    a[..., 5] = b[..., 5] = 2.0  # a constant dimension: StandardScaler leaves it unscaled (std 1)
    out = project_tokens([a, b], 3)
    x = torch.cat([a, b]).reshape(-1, 8).double().numpy()
    std = x.std(axis=0)
    std[std == 0] = 1.0
    z = ((x - x.mean(axis=0)) / std).astype(np.float32)
    assert np.allclose(z[:, 5], 0.0)
    pca = faiss.PCAMatrix(8, 3)
    pca.train(z)
    assert out.shape == (5, 4, 4, 3)
    assert np.allclose(out.reshape(-1, 3).numpy(), pca.apply(z), atol=1e-4)


def test_foreground_clustering_equals_clustering_the_upsampled_masked_pixels():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 4, 4, 5, generator=g)
    fg = torch.rand(3, 10, 10, generator=g) > 0.4
    labels = ForegroundClustering(tokens, fg, niter=10, nredo=2).labels(4, seed=0)
    # The reference: nearest-upsample the features to 10x10, keep the foreground pixels, cluster them.
    up = torch.nn.functional.interpolate(tokens.permute(0, 3, 1, 2), size=(10, 10), mode="nearest")
    pixels = up.permute(0, 2, 3, 1).reshape(-1, 5)[fg.reshape(-1)].numpy()
    km = faiss.Kmeans(5, 4, niter=10, nredo=2, seed=0)
    km.train(pixels)
    expected = torch.full((3, 10, 10), 4, dtype=torch.long)
    expected[fg] = torch.from_numpy(km.index.search(pixels, 1)[1][:, 0])
    assert torch.equal(labels, expected)


def test_spherical_kmeans_assigns_by_inner_product():
    x = np.array([[1.0, 0.0], [10.0, 0.5], [0.0, 1.0], [0.2, 9.0]], dtype=np.float32)
    km = fit_kmeans(x, 2, niter=5, nredo=1, seed=0, spherical=True, option="k_fg")
    a, _ = assign(km, x)
    assert a[0] == a[1] and a[2] == a[3] and a[0] != a[2]  # direction, not distance
    with pytest.raises(ConfigError, match="k_fg=5"):
        fit_kmeans(x, 5, niter=5, nredo=1, seed=0, spherical=True, option="k_fg")
