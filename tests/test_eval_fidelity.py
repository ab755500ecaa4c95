"""Evaluation fidelity: label resizing and the Hummingbird memory normalisation, against hand-computed cases and
against a float64 re-derivation of the original evaluation code's computation (torch's nearest on labels,
bilinear on scores, confusion over valid pixels, matching, mIoU), on label maps of another size than the
evaluation size."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_helpers import make_context
from omegaconf import OmegaConf
from PIL import Image
from scipy.optimize import linear_sum_assignment

from neco.errors import ConfigError
from neco.eval.context import typed_options
from neco.eval.hummingbird import protocol as hummingbird
from neco.eval.hummingbird.memory import MemoryPlan, build_memory, normalise_memory_features
from neco.eval.hummingbird.protocol import HummingbirdOptions, evaluate_memory, label_transfer, score
from neco.eval.linear import protocol as linear
from neco.eval.linear.data import training_pairs
from neco.eval.linear.head import confusion_on_features, linear_miou, make_head
from neco.eval.overcluster import protocol as overcluster
from neco.eval.overcluster.protocol import OverclusterOptions
from neco.eval.primitives.cluster_scoring import cluster_confusion, score_clusters
from neco.eval.primitives.features import FeatureExtractor
from neco.eval.primitives.knn import TorchIndex
from neco.eval.primitives.labels import CENTRE, LEGACY_NEAREST, resize_label_map, resize_mask

CONF = Path(__file__).resolve().parents[1] / "conf" / "eval"
GRID4 = np.arange(16).reshape(4, 4)
# 4x4 -> 2x2: torch's nearest reads source (0, 2) on each axis, PIL's the cell centres (1, 3).
LEGACY_2X2 = [[0, 2], [8, 10]]
CENTRE_2X2 = [[5, 7], [13, 15]]


class LabelMaps(torch.utils.data.Dataset):
    """(RGB image, label map) pairs of any size; the image content is irrelevant here."""

    def __init__(self, masks):
        self.masks = [np.asarray(m, dtype=np.int32) for m in masks]

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, i):
        h, w = self.masks[i].shape
        return Image.fromarray(np.full((h, w, 3), 128, np.uint8)), self.masks[i]


class Zeros(torch.nn.Module):
    def __init__(self, patch=8, dim=4):
        super().__init__()
        self.patch, self.dim = patch, dim

    def forward(self, x):
        b, _, h, w = x.shape
        return x.new_zeros(b, h // self.patch, w // self.patch, self.dim)


def blocky_labels(rng, n, h, w, classes, block=3, ignore=255):
    """Label maps made of ``block``-pixel squares, with some ignore pixels."""
    small = rng.integers(0, classes, (n, -(-h // block), -(-w // block)))
    maps = np.kron(small, np.ones((1, block, block), dtype=np.int64))[:, :h, :w]
    maps[rng.random(maps.shape) < 0.05] = ignore
    return maps


def distinct_counts(rng, rows, classes):
    """Patch label counts with no two classes equal in a row: a vote dominated by one neighbour has no tie
    (an exact tie is decided by rounding, differently in float32 and float64)."""
    return torch.from_numpy(np.stack([rng.choice(64, classes, replace=False) for _ in range(rows)])).to(torch.uint8)


# ---- reference re-derivation (float64) ---------------------------------------------------------------------

def ref_nearest(labels: np.ndarray, size: int) -> np.ndarray:
    """The original code: ``F.interpolate(labels, size, mode="nearest")`` on the label tensor."""
    t = torch.from_numpy(np.asarray(labels, dtype=np.float64))[:, None]
    return F.interpolate(t, size=(size, size), mode="nearest")[:, 0].round().long().numpy()


def ref_loader_resize(labels: np.ndarray, size: int) -> np.ndarray:
    """NeCo's loaders bring the PIL mask to the input size with PIL's nearest."""
    return np.stack([np.asarray(Image.fromarray(m.astype(np.int32)).resize((size, size), Image.Resampling.NEAREST))
                     for m in labels])


def ref_confusion(gt, pred, n_gt, n_pred, ignore):
    valid = gt != ignore
    codes = gt[valid].astype(np.int64) * n_pred + pred[valid].astype(np.int64)
    return np.bincount(codes, minlength=n_gt * n_pred).reshape(n_gt, n_pred).astype(np.float64)


def ref_iou(conf):
    tp = np.diag(conf)
    den = conf.sum(0) + conf.sum(1) - tp
    return np.where(den > 0, tp / np.maximum(den, 1e-300), 0.0)


def ref_remap(conf, mapping):
    out = np.zeros((conf.shape[0], conf.shape[0]))
    for k, c in enumerate(mapping):
        out[:, c] += conf[:, k]
    return out


def ref_hungarian(conf):
    tp = conf
    iou = tp / np.maximum(conf.sum(1, keepdims=True) + conf.sum(0, keepdims=True) - tp, 1e-300)
    rows, cols = linear_sum_assignment(1 - iou)
    mapping = np.zeros(conf.shape[1], dtype=np.int64)
    mapping[cols] = rows
    return mapping


def ref_precision_match(conf):
    return conf.argmax(axis=0)  # majority class of each cluster; ties -> lowest class


def ref_miou(conf):
    return 100.0 * ref_iou(conf).mean()


# ---- label resizing: hand cases ----------------------------------------------------------------------------

def test_legacy_and_centre_sample_different_pixels_of_a_4x4_map():
    assert resize_label_map(GRID4, 2, LEGACY_NEAREST).tolist() == LEGACY_2X2
    assert resize_label_map(GRID4, 2, CENTRE).tolist() == CENTRE_2X2
    t = torch.from_numpy(GRID4)[None]
    assert resize_label_map(t, 2, LEGACY_NEAREST)[0].tolist() == LEGACY_2X2
    assert resize_label_map(t, 2, CENTRE)[0].tolist() == CENTRE_2X2
    # The legacy rule is torch's nearest itself, the centre rule PIL's nearest itself.
    assert ref_nearest(GRID4[None], 2)[0].tolist() == LEGACY_2X2
    assert ref_loader_resize(GRID4[None], 2)[0].tolist() == CENTRE_2X2


def test_feature_cache_keeps_the_two_resize_rules_apart(tmp_path):
    extractor = FeatureExtractor(Zeros(patch=2), cache_dir=tmp_path, model_key="m", progress=False)
    data = LabelMaps([GRID4])
    _, legacy = extractor.extract(data, 4, 2, label_resize=LEGACY_NEAREST)
    _, centre = extractor.extract(data, 4, 2, label_resize=CENTRE)  # a cached legacy file must not answer
    _, legacy_again = extractor.extract(data, 4, 2, label_resize=LEGACY_NEAREST)
    assert legacy[0].tolist() == LEGACY_2X2 and legacy_again[0].tolist() == LEGACY_2X2
    assert centre[0].tolist() == CENTRE_2X2
    assert len(list(tmp_path.glob("*.pt"))) == 2


@pytest.mark.parametrize("mode,want", [(LEGACY_NEAREST, [[3, 1], [11, 9]]), (CENTRE, [[6, 4], [14, 12]])])
def test_linear_training_masks_are_flipped_before_the_shrink(mode, want):
    # Full-image crops (scale and ratio 1), always flipped: the flipped 4x4 map, then shrunk. Shrinking first
    # and flipping after would give [[2, 0], [10, 8]] with torch's nearest.
    pairs = training_pairs(LabelMaps([GRID4]), [0], 4, 2, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0,
                           label_resize=mode)
    _, m = pairs[0]
    assert m.tolist() == want


def test_options_default_to_the_reference_and_reject_unknown_values():
    for name in ("overcluster", "hummingbird", "linear"):
        assert OmegaConf.load(CONF / f"{name}.yaml").label_resize == LEGACY_NEAREST
    assert OmegaConf.load(CONF / "hummingbird.yaml").memory_norm == "per_patch"
    assert OverclusterOptions().label_resize == LEGACY_NEAREST
    assert HummingbirdOptions().label_resize == LEGACY_NEAREST and HummingbirdOptions().memory_norm == "per_patch"
    assert linear.LinearOptions().label_resize == LEGACY_NEAREST
    # A wrong value is refused when the protocol's options are built, naming the key and the valid values.
    for schema, protocol, key, wrong in ((OverclusterOptions, "overcluster", "label_resize", "corner"),
                                         (linear.LinearOptions, "linear", "label_resize", "corner"),
                                         (HummingbirdOptions, "hummingbird", "label_resize", "corner"),
                                         (HummingbirdOptions, "hummingbird", "memory_norm", "per_image")):
        with pytest.raises(ConfigError, match=f"eval.{protocol}.{key}={wrong} is not a valid choice"):
            typed_options(schema, {key: wrong}, protocol=protocol)


# ---- Hummingbird memory normalisation: hand case -----------------------------------------------------------

# One memory image of two patches: A = (2, 1) labelled class 1, B = (0, 1) labelled class 2; query (0.3, 1).
# per_patch: A -> (2, 1)/sqrt(5), B -> (0, 1); q.A = 0.685, q.B = 0.958 (unit q): B is nearest.
# per_image_axis_v1: dimension 0 / 2, dimension 1 / sqrt(2): A -> (1, 0.707), B -> (0, 0.707);
# q.A = 0.965, q.B = 0.677: A is nearest.
PATCHES = torch.tensor([[[2.0, 1.0], [0.0, 1.0]]])
COUNTS = torch.tensor([[0, 4, 0], [0, 0, 4]], dtype=torch.uint8)  # pixel counts per class
QUERY = F.normalize(torch.tensor([[0.3, 1.0]]), dim=-1)


def _memory(norm):
    rows = normalise_memory_features(PATCHES, norm)[0]
    index = TorchIndex(2, 2, torch.device("cpu"), torch.float32)
    index.add(rows)
    return index, rows.norm(dim=-1)


def test_the_two_memory_normalisations_retrieve_different_neighbours():
    s5, s2 = math.sqrt(5), math.sqrt(2)
    assert torch.allclose(normalise_memory_features(PATCHES, "per_patch")[0],
                          torch.tensor([[2 / s5, 1 / s5], [0.0, 1.0]]))
    assert torch.allclose(normalise_memory_features(PATCHES, "per_image_axis_v1")[0],
                          torch.tensor([[1.0, 1 / s2], [0.0, 1 / s2]]))
    index, _ = _memory("per_patch")
    sims, idx = index.search(QUERY, 1)
    assert idx.tolist() == [[1]]
    assert label_transfer(sims, idx, COUNTS, 0.02).argmax(dim=1).tolist() == [2]
    index, norms = _memory("per_image_axis_v1")
    sims, idx = index.search(QUERY, 1)
    assert idx.tolist() == [[0]]
    assert label_transfer(sims, idx, COUNTS, 0.02, row_norms=norms).argmax(dim=1).tolist() == [1]


def test_old_release_weights_its_neighbours_by_cosine():
    # Both neighbours: ranked A first by inner product, but weighted by the cosine with the stored rows,
    # cos(q, A') = 0.9646 / |A'| = 0.9646 / sqrt(1.5) = 0.7876 and cos(q, B') = 0.9578, as that release
    # re-normalised the retrieved keys: B gets softmax weight 1 / (1 + exp(-(0.9578 - 0.7876) / 0.02)).
    q0, q1 = QUERY[0].tolist()
    cos_a = (q0 + q1 / math.sqrt(2)) / math.sqrt(1.5)
    cos_b = q1
    w_b = 1 / (1 + math.exp(-(cos_b - cos_a) / 0.02))
    index, norms = _memory("per_image_axis_v1")
    sims, idx = index.search(QUERY, 2)
    assert idx.tolist() == [[0, 1]]
    scores = label_transfer(sims, idx, COUNTS, 0.02, row_norms=norms)
    assert torch.allclose(scores[0], torch.tensor([0.0, 1 - w_b, w_b]), atol=1e-5)
    # Without the norms (inner products taken as cosines) A would dominate instead.
    assert label_transfer(sims, idx, COUNTS, 0.02).argmax(dim=1).tolist() == [1]


class PatchEmbed(torch.nn.Module):
    """A fixed random patch embedding: features that vary over patches and dimensions."""

    def __init__(self, patch=8, dim=6):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Conv2d(3, dim, patch, stride=patch)
        self.seen = []

    def forward(self, x):
        out = self.proj(x).permute(0, 2, 3, 1)
        self.seen.append(out.detach().clone())
        return out


@pytest.mark.parametrize("memory_size", [None, 2 * 3 * 5])
def test_old_release_normalises_each_dimension_over_the_kept_patches_of_an_image(memory_size):
    from neco.data.synthetic import SyntheticScenes

    data = SyntheticScenes("train", num_images=3, image_size=32, seed=0)
    plan = MemoryPlan.make(memory_size, len(data), 2, 4)
    model = PatchEmbed()
    index = TorchIndex(plan.rows, 6, torch.device("cpu"), torch.float32)
    norms = torch.empty(plan.rows)
    build_memory(model, data, index, plan, image_size=32, patch_size=8, num_classes=7, ignore_index=None,
                 mean=(0.5,) * 3, std=(0.5,) * 3, seed=0, device=torch.device("cpu"), batch_size=2,
                 memory_norm="per_image_axis_v1", row_norms=norms)
    rows = index.data[: plan.rows].view(len(data) * 2, plan.per_image, 6)
    # Every image's kept rows: each dimension has norm 1 over them (5 kept of 16, or all 16).
    assert torch.allclose(rows.norm(dim=1), torch.ones(len(data) * 2, 6), atol=1e-5)
    assert torch.allclose(norms, index.data[: plan.rows].norm(dim=-1), atol=1e-6)
    if memory_size is None:
        seen = torch.cat(model.seen).reshape(-1, 16, 6)
        assert torch.allclose(rows, seen / seen.norm(dim=1, keepdim=True), atol=1e-5)


# ---- end to end: the defaults equal the original computation -------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_overclustering_equals_the_original_computation(seed):
    rng = np.random.default_rng(seed)
    n, classes, ignore, image, patch, mask = 4, 5, 255, 56, 8, 20
    g = image // patch
    gt = blocky_labels(rng, n, 45, 60, classes)
    _, masks = FeatureExtractor(Zeros(patch), progress=False).extract(LabelMaps(gt), image, mask)
    for k in (classes, 9):
        assign = torch.from_numpy(rng.integers(0, k, (n, g, g)))
        conf = cluster_confusion(assign, masks, k, classes, ignore, image_size=image)
        criterion = "hungarian" if k == classes else "precision"
        got = score_clusters(conf, criterion)["miou"]

        ref_gt = ref_nearest(ref_loader_resize(gt, image), mask)
        ref_pred = ref_nearest(assign.numpy(), mask)
        ref_conf = ref_confusion(ref_gt, ref_pred, classes, k, ignore)
        mapping = ref_hungarian(ref_conf) if k == classes else ref_precision_match(ref_conf)
        assert abs(got - ref_miou(ref_remap(ref_conf, mapping))) < 0.01
        # The centre rule scores other pixels: the comparison above can fail.
        _, masks_c = FeatureExtractor(Zeros(patch), progress=False).extract(LabelMaps(gt), image, mask,
                                                                             label_resize=CENTRE)
        conf_c = cluster_confusion(assign, masks_c, k, classes, ignore, image_size=image, label_resize=CENTRE)
        assert not torch.equal(conf_c, conf)


def _reference_hummingbird(memory, counts, queries, gt, size, k, temperature, ignore, classes):
    n, s, _, d = queries.shape
    q = queries.double().reshape(-1, d)
    mem = memory.double()
    nn = (q @ mem.T).topk(k, dim=1).indices  # the evaluator searches with the raw query
    keys = mem[nn]
    cos = torch.einsum("qd,qkd->qk", F.normalize(q, dim=-1), F.normalize(keys, dim=-1))
    attn = torch.softmax(cos / temperature, dim=1)
    hist = counts.double() / counts.double().sum(dim=1, keepdim=True)
    label_hat = torch.einsum("qk,qkc->qc", attn, hist[nn]).view(n, s, s, classes).permute(0, 3, 1, 2)
    pred = F.interpolate(label_hat, size=(size, size), mode="bilinear").argmax(dim=1).numpy()
    target = ref_nearest(gt, size)
    conf = ref_confusion(target, pred, classes, classes, ignore)
    return ref_miou(ref_remap(conf, ref_hungarian(conf)))


@pytest.mark.parametrize("seed", [0, 1])
def test_hummingbird_equals_the_original_computation(seed):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    classes, ignore, size, s, d, k = 4, 255, 24, 3, 6, 5
    memory = F.normalize(torch.randn(60, d), dim=-1)
    counts = distinct_counts(rng, 60, classes)
    queries = torch.randn(3, s, s, d)
    gt = blocky_labels(rng, 3, 37, 50, classes, block=4)
    # The evaluator resizes the validation mask tensor straight to the input size with torch's nearest.
    _, masks = FeatureExtractor(Zeros(size // s), progress=False).extract(
        LabelMaps(gt), size, None, input_resize=HummingbirdOptions().label_resize)
    index = TorchIndex(60, d, torch.device("cpu"), torch.float32)
    index.add(memory)
    conf, _ = evaluate_memory(index, counts, queries, masks, num_classes=classes, ignore_index=ignore, k=k,
                              temperature=0.02, pad_rows=0, device=torch.device("cpu"), query_block=64)
    got = score(conf, hungarian=True)["miou"]
    want = _reference_hummingbird(memory, counts, queries, gt, size, k, 0.02, ignore, classes)
    assert abs(got - want) < 0.01


def test_hummingbird_old_release_memory_equals_its_computation():
    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    classes, ignore, size, s, d, k = 4, 255, 24, 3, 6, 5
    raw = torch.randn(4, 9, d) + torch.tensor([3.0, 0, 0, 0, 0, 1.0])  # 4 memory images of 9 patches
    counts = distinct_counts(rng, 36, classes)
    queries = torch.randn(3, s, s, d)
    gt = blocky_labels(rng, 3, 37, 50, classes, block=4)
    masks = torch.from_numpy(np.stack([resize_mask(m, size, input_resize=LEGACY_NEAREST) for m in gt]))
    results = {}
    for norm in ("per_patch", "per_image_axis_v1"):
        rows = normalise_memory_features(raw, norm).reshape(36, d)
        index = TorchIndex(36, d, torch.device("cpu"), torch.float32)
        index.add(rows)
        conf, _ = evaluate_memory(index, counts, queries, masks, num_classes=classes, ignore_index=ignore, k=k,
                                  temperature=0.02, pad_rows=0, device=torch.device("cpu"), query_block=64,
                                  row_norms=rows.norm(dim=-1) if norm != "per_patch" else None)
        results[norm] = score(conf, hungarian=True)["miou"]
    # The old release: features / torch.norm(features, dim=1) over each image's patches, then the same search
    # and vote (its vote re-normalises the retrieved keys per patch).
    old_memory = (raw.double() / raw.double().norm(dim=1, keepdim=True)).reshape(36, d)
    want_old = _reference_hummingbird(old_memory, counts, queries, gt, size, k, 0.02, ignore, classes)
    want_new = _reference_hummingbird(F.normalize(raw.double(), dim=-1).reshape(36, d), counts, queries, gt, size,
                                      k, 0.02, ignore, classes)
    assert abs(results["per_image_axis_v1"] - want_old) < 0.01
    assert abs(results["per_patch"] - want_new) < 0.01


@pytest.mark.parametrize("seed", [0, 1])
def test_linear_100x100_score_equals_the_original_computation(seed):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    classes, ignore, image, patch, mask, d = 5, 255, 56, 8, 20, 6
    g = image // patch
    gt = blocky_labels(rng, 3, 45, 60, classes)
    tokens = torch.randn(3, g, g, d)
    head = make_head(d, classes, seed)
    _, masks = FeatureExtractor(Zeros(patch), progress=False).extract(LabelMaps(gt), image, mask)
    conf, _ = confusion_on_features(head, tokens, masks, classes, ignore, torch.device("cpu"))
    got = linear_miou(conf, ignore)[1]
    # The original: features bilinearly upsampled to the mask size, the 1x1 convolution, argmax; ground truth
    # shrunk with torch's nearest; identity matching, mIoU over all classes.
    up = F.interpolate(tokens.double().permute(0, 3, 1, 2), size=(mask, mask), mode="bilinear")
    logits = torch.einsum("bdhw,cd->bchw", up, head.weight.double()[:, :, 0, 0]) + head.bias.double()[:, None, None]
    ref_conf = ref_confusion(ref_nearest(ref_loader_resize(gt, image), mask), logits.argmax(dim=1).numpy(),
                             classes, classes, ignore)
    assert abs(got - ref_miou(ref_conf)) < 0.01
    _, masks_c = FeatureExtractor(Zeros(patch), progress=False).extract(LabelMaps(gt), image, mask,
                                                                         label_resize=CENTRE)
    assert not torch.equal(confusion_on_features(head, tokens, masks_c, classes, ignore, torch.device("cpu"))[0],
                           conf)


def test_results_record_the_options(tmp_path):
    ctx = make_context(tmp_path, num_figures=0)
    cfg = OmegaConf.load(CONF / "hummingbird.yaml")
    cfg.per_dataset.synthetic.image_size = 48
    cfg.memory_norm = "per_image_axis_v1"
    cfg.label_resize = CENTRE
    res = hummingbird.run(ctx, cfg)
    assert res.options["memory_norm"] == "per_image_axis_v1" and res.options["label_resize"] == CENTRE
    cfg = OmegaConf.load(CONF / "overcluster.yaml")
    syn = cfg.per_dataset.synthetic
    syn.image_size, syn.mask_size, syn.ks, syn.seeds = 48, 20, ["classes"], [0]
    res = overcluster.run(ctx, cfg)
    assert res.options["label_resize"] == LEGACY_NEAREST
