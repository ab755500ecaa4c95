"""Quick dense evaluations: feature extraction, NN retrieval and k-means on tiny synthetic inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from neco.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from neco.eval.primitives.features import NORMALISE_UINT8, NORMALISE_UNIT, FeatureExtractor, normalize
from neco.eval.primitives.metrics import confusion_matrix, hungarian_match, iou_from_confusion, remap_confusion
from neco.eval.quick.evaluate import (
    kmeans_miou,
    nn_retrieval_miou,
    patch_label_histograms,
    quick_evaluate,
    quick_features,
)

PATCH = 8
GRID = 4
SIZE = PATCH * GRID
NUM_CLASSES = 4
COLORS = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 230], [240, 230, 40]], dtype=np.uint8)


def _stripe_masks(n, seed, ignore_frac=0.0):
    """Masks (n, SIZE, SIZE) made of patch-wide vertical stripes, each stripe a random class.

    Vertical stripes keep every class boundary on a patch border and never create corners, so bilinear
    upsampling of perfect per-patch scores is still perfect at pixel level.
    """
    g = torch.Generator().manual_seed(seed)
    cols = torch.randint(0, NUM_CLASSES, (n, GRID), generator=g)
    # Every class in every image, in a different order per image.
    cols[:, :NUM_CLASSES] = torch.rand(n, NUM_CLASSES, generator=g).argsort(dim=1)
    masks = cols.repeat_interleave(PATCH, dim=1)[:, None, :].expand(n, SIZE, SIZE).clone()
    if ignore_frac:
        masks[torch.rand(masks.shape, generator=g) < ignore_frac] = 255
    return masks, cols


class TinyScenes:
    """Images whose stripes are coloured by class, with their masks (the evaluations' dataset contract)."""

    num_classes = NUM_CLASSES
    ignore_index = 255

    def __init__(self, n, seed, size=SIZE, image_hw=None):
        self.masks, _ = _stripe_masks(n, seed)
        self.size = size
        self.image_hw = image_hw

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, i):
        mask = self.masks[i]
        if self.image_hw is not None:  # non-square originals exercise the resize path
            mask = F.interpolate(mask[None, None].float(), size=self.image_hw, mode="nearest")[0, 0].long()
        rgb = COLORS[mask.clamp_max(NUM_CLASSES - 1).numpy()]
        return Image.fromarray(rgb), mask


class PatchConv(torch.nn.Module):
    """Stand-in backbone: a patch-embedding conv returning (B, h, w, D)."""

    def __init__(self, dim=16):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)


class PatchMean(torch.nn.Module):
    """Features = mean normalised colour of each patch, so the preprocessing can be checked by value."""

    def forward(self, x):
        return F.avg_pool2d(x, PATCH).permute(0, 2, 3, 1)


def test_extract_shapes_masks_and_normalisation():
    ds = TinyScenes(5, seed=0, image_hw=(40, 48))
    model = PatchConv()
    model.train()
    feats, masks = quick_features(model, ds, image_size=SIZE, batch_size=2, progress=False)
    assert feats.shape == (5, GRID, GRID, 16) and feats.dtype == torch.float32
    assert masks.shape == (5, SIZE, SIZE) and masks.dtype == torch.long
    assert model.training  # mode restored for callers in the middle of training
    # Masks follow a nearest resize with pixel-centre sampling (PIL NEAREST).
    for i in range(5):
        ref = Image.fromarray(ds[i][1].numpy().astype(np.uint8)).resize((SIZE, SIZE), Image.NEAREST)
        np.testing.assert_array_equal(masks[i].numpy(), np.asarray(ref))
    # Batch size does not change the result.
    feats_all, _ = quick_features(model, ds, image_size=SIZE, batch_size=32, progress=False)
    torch.testing.assert_close(feats, feats_all)
    # Mixed precision still hands back float32 features, close to the full-precision ones.
    feats_bf16, _ = quick_features(model, ds, SIZE, amp_dtype=torch.bfloat16, progress=False)
    assert feats_bf16.dtype == torch.float32
    torch.testing.assert_close(feats_bf16, feats, atol=0.05, rtol=0.05)

    # Patch-mean features of a stripe image must be the ImageNet-normalised stripe colour.
    ds_sq = TinyScenes(2, seed=1)
    feats, masks = quick_features(PatchMean(), ds_sq, image_size=SIZE, progress=False)
    classes = masks[:, ::PATCH, ::PATCH]
    expected = (torch.from_numpy(COLORS).float()[classes] / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)


def test_extract_rejects_non_dense_model():
    class Pooled(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    with pytest.raises(ValueError):
        quick_features(Pooled(), TinyScenes(2, 0), image_size=SIZE, progress=False)


def test_patch_histograms_exclude_ignore():
    mask = torch.tensor([[0, 0, 1, 1], [0, 255, 1, 2], [255, 255, 3, 3], [255, 255, 3, 255]])
    hist = patch_label_histograms(mask[None], (2, 2), num_classes=4)
    assert hist.shape == (1, 2, 2, 4)
    torch.testing.assert_close(hist[0, 0, 0], torch.tensor([1.0, 0, 0, 0]))
    torch.testing.assert_close(hist[0, 0, 1], torch.tensor([0, 0.75, 0.25, 0]))
    torch.testing.assert_close(hist[0, 1, 0], torch.zeros(4))  # only ignore pixels
    torch.testing.assert_close(hist[0, 1, 1], torch.tensor([0, 0, 0, 1.0]))


def _onehot_feats(cols, dim=8):
    """(n, GRID, GRID, dim) features that are one-hot encodings of each patch's stripe class."""
    onehot = F.one_hot(cols, dim).float()  # (n, GRID, dim)
    return onehot[:, None].expand(-1, GRID, -1, -1).contiguous()


def test_nn_retrieval_perfect_with_onehot_features():
    train_masks, train_cols = _stripe_masks(20, seed=1, ignore_frac=0.05)
    val_masks, val_cols = _stripe_masks(10, seed=2, ignore_frac=0.05)
    res = nn_retrieval_miou(
        _onehot_feats(train_cols),
        train_masks,
        _onehot_feats(val_cols),
        val_masks,
        NUM_CLASSES,
        num_predictions=3,
    )
    assert res["miou"] == pytest.approx(1.0)
    assert res["pixel_acc"] == pytest.approx(1.0)
    assert res["per_class_iou"] == pytest.approx([1.0] * NUM_CLASSES)
    pred = res["predictions"]
    assert pred.shape == (3, SIZE, SIZE)
    valid = val_masks[:3] != 255
    assert torch.equal(pred[valid], val_masks[:3][valid])


def test_nn_retrieval_random_features_near_chance():
    g = torch.Generator().manual_seed(0)
    train_masks, _ = _stripe_masks(40, seed=3)
    val_masks, _ = _stripe_masks(20, seed=4)
    res = nn_retrieval_miou(
        torch.randn(40, GRID, GRID, 32, generator=g),
        train_masks,
        torch.randn(20, GRID, GRID, 32, generator=g),
        val_masks,
        NUM_CLASSES,
    )
    # Chance for 4 balanced classes: pixel accuracy 1/4, IoU 1/7.
    assert res["pixel_acc"] < 0.4
    assert res["miou"] < 0.3


def _cluster_feats(masks_tok, dim=16, seed=0, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    centers = 10 * torch.randn(NUM_CLASSES, dim, generator=g)
    return centers[masks_tok] + noise * torch.randn(*masks_tok.shape, dim, generator=g)


def _block_masks(n, seed):
    """Random class per patch, upsampled to pixels (any layout is exact under nearest upsampling)."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, NUM_CLASSES, (n, GRID, GRID), generator=g)
    tok[:, 0, :NUM_CLASSES] = torch.arange(NUM_CLASSES)
    return tok, tok.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)


@pytest.mark.parametrize("pca_dim", [None, 8])
def test_kmeans_recovers_separated_clusters(pca_dim):
    tok, masks = _block_masks(30, seed=0)
    masks[:, :2, :] = 255  # ignore rows are simply left out
    feats = _cluster_feats(tok)
    res = kmeans_miou(feats, masks, NUM_CLASSES, seeds=(0, 1), pca_dim=pca_dim, num_predictions=4)
    assert res["miou"] == pytest.approx(1.0)
    assert len(res["miou_per_seed"]) == 2
    pred = res["predictions"]
    assert pred.shape == (4, SIZE, SIZE)
    valid = masks[:4] != 255
    assert torch.equal(pred[valid], masks[:4][valid])


def test_kmeans_restores_faiss_threads():
    import faiss

    before = faiss.omp_get_max_threads()
    tok, masks = _block_masks(4, seed=3)
    kmeans_miou(_cluster_feats(tok), masks, NUM_CLASSES, pca_dim=None, threads=1)
    assert faiss.omp_get_max_threads() == before


def test_kmeans_overclustering_uses_many_to_one():
    tok, masks = _block_masks(30, seed=1)
    res = kmeans_miou(_cluster_feats(tok, seed=1), masks, NUM_CLASSES, k=2 * NUM_CLASSES, pca_dim=None)
    assert res["miou"] == pytest.approx(1.0)


def test_cluster_id_permutation_does_not_change_score():
    tok, masks = _block_masks(20, seed=2)
    feats = _cluster_feats(tok, seed=2, noise=6.0)  # noisy on purpose: an imperfect clustering
    res = kmeans_miou(feats, masks, NUM_CLASSES, pca_dim=None, num_predictions=20)
    assert res["miou"] < 1.0
    clusters = res["predictions"]  # class ids after matching: themselves a valid clustering
    scores = []
    for perm in [torch.arange(NUM_CLASSES), torch.tensor([2, 0, 3, 1]), torch.tensor([3, 2, 1, 0])]:
        conf = confusion_matrix(perm[clusters], masks, NUM_CLASSES, NUM_CLASSES)
        scores.append(iou_from_confusion(remap_confusion(conf, hungarian_match(conf), NUM_CLASSES))[1])
    assert scores == pytest.approx([res["miou"]] * 3)


def test_quick_evaluate_end_to_end(tmp_path):
    train, val = TinyScenes(24, seed=5), TinyScenes(8, seed=6)
    fig = tmp_path / "eval.png"
    out = quick_evaluate(PatchConv(), train, val, image_size=SIZE, figure_path=str(fig), progress=False)
    assert set(out) == {"nn/miou", "nn/pixel_acc", "kmeans/miou", "kmeans/pixel_acc"}
    assert all(isinstance(v, float) for v in out.values())  # loggable as is
    # Colour determines the class, so even a random patch embedding separates the classes. In %.
    assert out["nn/miou"] == pytest.approx(100.0) and out["nn/pixel_acc"] == pytest.approx(100.0)
    assert 90.0 < out["kmeans/miou"] <= 100.0
    with Image.open(fig) as im:
        assert im.format == "PNG" and im.width > 0
    out = quick_evaluate(PatchConv(), train, val, image_size=SIZE, per_class=True, progress=False)
    assert len(out["nn/per_class_iou"]) == len(out["kmeans/per_class_iou"]) == NUM_CLASSES
    assert out["nn/per_class_iou"] == pytest.approx([100.0] * NUM_CLASSES)  # in % like the mIoU


def test_quick_evaluate_reports_percent_of_the_scorers_fractions():
    train, val = TinyScenes(12, seed=7, image_hw=(40, 44)), TinyScenes(6, seed=8, image_hw=(30, 50))
    model = PatchConv(dim=1)  # one dimension: after cosine normalisation two values for four classes
    out = quick_evaluate(model, train, val, image_size=SIZE, nn_k=3, per_class=True, progress=False)
    feats_tr, masks_tr = quick_features(model, train, SIZE, progress=False)
    feats_va, masks_va = quick_features(model, val, SIZE, progress=False)
    nn = nn_retrieval_miou(feats_tr, masks_tr, feats_va, masks_va, NUM_CLASSES, k=3)
    km = kmeans_miou(feats_va, masks_va, NUM_CLASSES)
    assert 0.0 < nn["miou"] < 1.0  # an imperfect score, so a x100 is visible
    assert out["nn/miou"] == 100.0 * nn["miou"] and out["kmeans/miou"] == 100.0 * km["miou"]
    assert out["nn/pixel_acc"] == 100.0 * nn["pixel_acc"]
    assert out["kmeans/per_class_iou"] == [100.0 * v for v in km["per_class_iou"]]


def test_normalisation_orders_are_the_two_named_formulas_and_differ_by_rounding():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    unit, raw = normalize(x, IMAGENET_MEAN, IMAGENET_STD, NORMALISE_UNIT), normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(unit, (x.float() / 255.0 - mean) / std)  # torchvision's ToTensor + Normalize
    assert torch.equal(raw, (x.float() - mean * 255.0) / (std * 255.0))
    assert not torch.equal(unit, raw)  # a named option because the arithmetic order shows in the values
    torch.testing.assert_close(unit, raw, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="normalisation order"):
        normalize(x, IMAGENET_MEAN, IMAGENET_STD, "imagenet")


def test_quick_features_are_the_extractors_with_the_quick_settings(tmp_path):
    ds = TinyScenes(3, seed=4, image_hw=(30, 50))
    feats, masks = quick_features(PatchMean(), ds, SIZE, progress=False)
    default_feats, default_masks = FeatureExtractor(PatchMean(), progress=False).extract(ds, SIZE)
    assert default_feats.dtype == torch.float16 and default_masks.dtype == torch.uint8
    assert torch.equal(masks, default_masks.long())  # the same nearest (centre) resize to the input size
    # float32 storage and torchvision's order: the raw order rounds differently, float16 coarser still.
    raw = FeatureExtractor(PatchMean(), progress=False).extract(ds, SIZE, normalise=NORMALISE_UINT8,
                                                                feature_dtype=torch.float32)[0]
    assert not torch.equal(feats, raw)
    assert torch.equal(default_feats, raw.half())
    # Cached extractions of the two settings never answer for each other.
    cached = FeatureExtractor(PatchMean(), cache_dir=tmp_path, model_key="m", progress=False)
    a = cached.extract(ds, SIZE, normalise=NORMALISE_UNIT, feature_dtype=torch.float32)[0]
    b = cached.extract(ds, SIZE)[0]
    assert torch.equal(a, feats) and torch.equal(b, default_feats) and len(list(tmp_path.glob("*.pt"))) == 2
