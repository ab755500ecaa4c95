"""Hummingbird protocol: label transfer vs brute force, upsampling, quirk options, known answers, end to end."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_helpers import make_context
from omegaconf import OmegaConf
from PIL import Image

from neco.errors import ConfigError
from neco.eval.context import typed_options
from neco.eval.hummingbird import protocol as hummingbird
from neco.eval.hummingbird.protocol import (
    HummingbirdOptions,
    default_input_size,
    label_transfer,
    score,
    upsample_argmax,
)
from neco.eval.primitives.features import HUMMINGBIRD_STD, IMAGENET_MEAN, IMAGENET_STD
from neco.eval.primitives.knn import TorchIndex, search_blocks
from neco.eval.primitives.metrics import confusion_matrix

YAML = Path(__file__).resolve().parents[1] / "conf" / "eval" / "hummingbird.yaml"
P, GRID, C = 8, 4, 4
SIZE = P * GRID
COLORS = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=torch.uint8)


def test_label_transfer_matches_brute_force_knn():
    g = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(400, 12, generator=g), dim=1)
    queries = F.normalize(torch.randn(50, 12, generator=g), dim=1)
    counts = torch.randint(0, 5, (400, 3), generator=g).to(torch.uint8)
    counts[0] = 0  # an empty histogram stays all-zero
    index = TorchIndex(400, 12, torch.device("cpu"), torch.float32)
    index.add(memory)
    sims, idx = search_blocks(index, queries, 30, query_block=16)
    got = label_transfer(sims, idx, counts, 0.02)
    q, m, h = queries.double().numpy(), memory.double().numpy(), counts.double().numpy()
    h = h / np.maximum(h.sum(1, keepdims=True), 1)
    want = []
    for row in q @ m.T:
        nn = np.argsort(-row)[:30]
        w = np.exp((row[nn] - row[nn].max()) / 0.02)
        want.append((w / w.sum()) @ h[nn])
    assert np.allclose(got.numpy(), np.array(want), atol=1e-5)


def test_zero_rows_of_a_partly_filled_memory_compete_at_similarity_zero():
    sims = torch.tensor([[0.2, -0.5, -0.6]])
    idx = torch.tensor([[0, 1, 1]])
    counts = torch.tensor([[4, 0], [0, 4]], dtype=torch.uint8)
    got = label_transfer(sims, idx, counts, 0.1, pad_rows=5)  # neighbours: row 0 (0.2) and two zero rows
    assert torch.allclose(got, torch.tensor([[np.exp(2) / (np.exp(2) + 2), 0.0]], dtype=torch.float32))
    plain = label_transfer(sims, idx, counts, 0.1)  # without them, row 1 twice (-0.5, -0.6)
    z = np.exp(2) + np.exp(-5) + np.exp(-6)
    assert torch.allclose(plain, torch.tensor([[np.exp(2) / z, (np.exp(-5) + np.exp(-6)) / z]], dtype=torch.float32))


def test_upsampling_and_argmax_by_hand():
    scores = torch.zeros(1, 2, 2, 2)
    scores[0, :, 0, 0] = 1.0  # left column class 0, right column class 1
    scores[0, :, 1, 1] = 1.0
    # Output pixel centres map to x = -0.25, 0.25, 0.75, 1.25: the weight of the left column is 1, .75, .25, 0.
    assert upsample_argmax(scores, 4)[0].tolist() == [[0, 0, 1, 1]] * 4
    scores[0, 1, 0, 1] = 0.4  # bottom-left: class 0 at 0.6 vs class 1 at 0.4 -> a corner pixel flips
    assert upsample_argmax(scores, 4)[0, 3].tolist() == [0, 0, 1, 1]
    assert upsample_argmax(scores, 4)[0, 3, 1].item() == 0


def test_hungarian_undoes_a_permuted_prediction_and_identity_does_not():
    gt = torch.arange(4).repeat_interleave(10)
    perm = torch.tensor([1, 2, 3, 0])
    conf = confusion_matrix(perm[gt], gt, 4, 4)
    assert score(conf, True)["miou"] == pytest.approx(100.0)
    assert score(conf, False)["miou"] == 0.0
    # Half right: class 0 predicted as 1 for half its pixels. Identity: IoU_0 = 5/10, IoU_1 = 10/15.
    pred = gt.clone()
    pred[:5] = 1
    conf = confusion_matrix(pred, gt, 4, 4)
    assert score(conf, False)["miou"] == pytest.approx(100 * (0.5 + 10 / 15 + 1 + 1) / 4)
    assert score(conf, True)["miou"] == pytest.approx(score(conf, False)["miou"])  # matching keeps the identity


def test_default_input_sizes():
    assert [default_input_size(p) for p in (14, 16, 8, 10)] == [504, 512, 512, 510]


class _Stripes:
    """Patch-wide vertical stripes of class colours; every class in every image. Images are SIZE x SIZE."""

    num_classes, ignore_index, name = C, 255, "stripes"

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        cols = torch.stack([torch.randperm(C, generator=g) for _ in range(n)])
        self.masks = cols.repeat_interleave(P, dim=1)[:, None, :].expand(n, SIZE, SIZE).clone()

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, i):
        return Image.fromarray(COLORS[self.masks[i]].numpy()), self.masks[i]


class _ColourCode(torch.nn.Module):
    """One-hot of each patch's class colour (thresholded channels of the de-normalised patch mean)."""

    embed_dim = C

    def __init__(self, record=None):
        super().__init__()
        self.record = record

    def forward(self, x):
        if self.record is not None:
            self.record.append(x.clone())
        rgb = F.avg_pool2d(x, P) * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(
            IMAGENET_MEAN).view(1, 3, 1, 1)
        bits = (rgb > 0.5).long()
        code = bits[:, 0] + 2 * bits[:, 1] + 4 * bits[:, 2]  # red 1, green 2, blue 4, yellow 3
        lut = torch.tensor([0, 0, 1, 3, 2, 0, 0, 0])
        return F.one_hot(lut[code], C).float().to(x.dtype)


class _Random(torch.nn.Module):
    embed_dim = 16

    def forward(self, x):
        g = torch.Generator().manual_seed(int(x.sum().abs().item() * 1000) % 2**31)
        return torch.randn(x.shape[0], x.shape[2] // P, x.shape[3] // P, 16, generator=g)


def _ctx(tmp_path, model, num_figures=0):
    data = {"train": _Stripes(16, 0), "val": _Stripes(8, 1)}
    return make_context(tmp_path, model=model, get_dataset=data.__getitem__, dataset_name="stripes",
                        cache=False, num_figures=num_figures)


# Identity crop and no jitter: memory patches are pure, so class-encoding features must give exactly 100.
EXACT = {"image_size": SIZE, "augmentation_epochs": 1, "crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0],
         "jitter_p": 0.0, "search": "torch"}


@pytest.mark.parametrize("memory_size", [None, 16 * 10, 175])  # all patches; 10 per image; 10 + 15 zero rows
def test_class_encoding_features_give_100_miou(tmp_path, memory_size):
    res = hummingbird.run(_ctx(tmp_path, _ColourCode()), EXACT | {"memory_size": memory_size})
    assert res.metrics["miou"] == pytest.approx(100.0) and res.metrics["pixel_acc"] == pytest.approx(100.0)
    run = res.extra["runs"]["full"]
    assert run["memory_rows"] == (16 * 16 if memory_size is None else 160)
    assert run["zero_rows"] == (15 if memory_size == 175 else 0)


def test_random_features_are_about_chance(tmp_path):
    res = hummingbird.run(_ctx(tmp_path, _Random()), EXACT | {"memory_size": None})
    assert res.metrics["miou"] < 40.0


def test_blue_std_typo_scales_the_normalised_blue_channel(tmp_path):
    inputs = {}
    for typo in (True, False):
        record = []
        hummingbird.run(_ctx(tmp_path / str(typo), _ColourCode(record)),
                        EXACT | {"memory_size": None, "blue_std_typo": typo, "jitter_p": 0.5,
                                 "crop_scale": [0.5, 2.0], "crop_ratio": [0.75, 4 / 3]})
        inputs[typo] = torch.cat(record)  # memory batches, then validation batches
    a, b = inputs[True], inputs[False]
    assert a.shape == b.shape
    assert torch.equal(a[:, :2], b[:, :2])  # red and green untouched
    # (v - mean) / 0.255 vs (v - mean) / 0.225: the same augmented pixels, scaled by 0.225 / 0.255.
    assert torch.allclose(a[:, 2], b[:, 2] * (IMAGENET_STD[2] / HUMMINGBIRD_STD[2]), atol=1e-5)
    assert not torch.allclose(a[:, 2], b[:, 2])


def test_lowshot_runs_per_seed_are_saved_and_deterministic(tmp_path):
    cfg = EXACT | {"train_fraction": 0.25, "subset_seeds": [42, 400], "memory_size": 4 * 16, "jitter_p": 0.5}
    res = hummingbird.run(_ctx(tmp_path / "a", _ColourCode()), cfg)
    runs = res.extra["runs"]
    assert set(runs) == {"42", "400"}
    mious = [runs["42"]["miou"], runs["400"]["miou"]]
    assert res.metrics["miou"] == pytest.approx(np.mean(mious)) and res.metrics["miou_std"] == pytest.approx(
        np.std(mious))
    for seed, run in runs.items():
        assert run["num_train_images"] == 4 and run["patches_per_image"] == 16
        assert run["subset_file"].endswith(f"stripes_1_div_4_{seed}.txt") and run["subset_source"] == "generated"
        assert len(open(run["subset_file"]).read().split()) == 4
    again = hummingbird.run(_ctx(tmp_path / "b", _ColourCode()), cfg)
    assert again.metrics == res.metrics
    with pytest.raises(ConfigError, match="eval.hummingbird.memory_size=1000 asks for 250"):
        hummingbird.run(_ctx(tmp_path / "c", _ColourCode()), cfg | {"memory_size": 1000})
    clamped = hummingbird.run(_ctx(tmp_path / "d", _ColourCode()), cfg | {"memory_size": 1000,
                                                                          "clamp_memory_quota": True})
    assert clamped.extra["runs"]["42"]["zero_rows"] == 0 and clamped.extra["runs"]["42"]["patches_per_image"] == 16


def test_yaml_options_and_per_dataset_block():
    cfg = OmegaConf.load(YAML)
    published = typed_options(HummingbirdOptions, cfg, "voc", "hummingbird")
    assert published == HummingbirdOptions()  # the yaml lists the dataclass defaults
    synthetic = typed_options(HummingbirdOptions, cfg, "synthetic", "hummingbird")
    assert synthetic.image_size == 96 and synthetic.memory_size is None
    with pytest.raises(ConfigError, match="eval.hummingbird"):
        typed_options(HummingbirdOptions, {"temprature": 0.1}, "voc", "hummingbird")


def test_end_to_end_on_synthetic(tmp_path):
    ctx = make_context(tmp_path, num_figures=2)
    cfg = OmegaConf.load(YAML)
    cfg.per_dataset.synthetic.image_size = 48
    res = hummingbird.run(ctx, cfg)
    assert 0.0 <= res.metrics["miou"] <= 100.0 and 0.0 <= res.metrics["pixel_acc"] <= 100.0
    assert res.options["image_size"] == 48 and res.options["blue_std_typo"] is True
    assert res.extra["grid"] == 6 and len(res.extra["per_class_iou"]) == 7
    assert len(res.figures) == 1 and (tmp_path / "out" / "figures" / "hummingbird.png").is_file()
