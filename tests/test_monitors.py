"""Training-time monitors: the k-means monitor (METHOD.md §6.1) and the attention-map monitor (METHOD.md §6.6)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from scipy import ndimage

import neco.config  # noqa: F401
from neco.data.synthetic import SyntheticScenes
from neco.engine.log import read_metrics
from neco.errors import ConfigError
from neco.eval import monitors
from neco.eval.monitors import AttentionMonitor, KMeansMonitor, attention_jaccards, kmeans_monitor_metrics
from neco.eval.primitives.kmeans import faiss_threads
from neco.models.backbone import build_backbone
from neco.train import train

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    with faiss_threads(1):
        yield


def _one_class_per_image(n=8, classes=4, grid=3, size=12, dim=6, seed=0):
    """Features constant over each image (its class one-hot, plus a little noise) and matching masks.

    Constant maps stay exact under the monitor's bilinear upsampling, so the clusters can be perfect.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    feats = 5.0 * torch.nn.functional.one_hot(labels, dim).float()[:, None, None, :].expand(n, grid, grid, dim)
    feats = (feats + 0.01 * torch.randn(n, grid, grid, dim, generator=g)).half()
    masks = labels[:, None, None].expand(n, size, size).clone()
    masks[:, 0, 0] = 255  # some ignored pixels
    return feats, masks.to(torch.uint8)


def test_kmeans_monitor_scores_class_encoding_features_100():
    feats, masks = _one_class_per_image()
    metrics, preds = kmeans_monitor_metrics(feats, masks, 4, 255, ["classes", 8], class_names=list("abcd"),
                                            pca_dim=3, niter=10, nredo=5)
    assert metrics["k4/miou"] == pytest.approx(100.0)
    assert metrics["k8/miou"] == pytest.approx(100.0) and metrics["k8_iou/miou"] == pytest.approx(100.0)
    assert metrics["k4/pixel_acc"] == pytest.approx(100.0)
    for prefix in ("k4", "k8", "k8_iou"):
        for c in "abcd":
            assert metrics[f"{prefix}/class/{c}/precision"] == pytest.approx(1.0)
            assert metrics[f"{prefix}/class/{c}/recall"] == pytest.approx(1.0)
    assert 0.0 < metrics["k8/bg_fraction"] < 1.0 and "k4/bg_fraction" not in metrics
    assert set(preds) == {4, 8} and preds[4].shape == masks.shape
    keep = masks != 255
    assert torch.equal(preds[4][keep], masks.long()[keep])


def test_kmeans_monitor_on_random_features_is_about_chance():
    rng = torch.Generator().manual_seed(1)
    feats = torch.randn(16, 4, 4, 8, generator=rng).half()
    masks = torch.randint(0, 4, (16, 8, 8), generator=rng).to(torch.uint8)
    metrics, _ = kmeans_monitor_metrics(feats, masks, 4, 255, ["classes"], pca_dim=None, niter=10, nredo=1,
                                        per_class=False)
    assert 8.0 < metrics["k4/miou"] < 25.0  # chance for 4 balanced classes: 1/7
    assert list(metrics) == ["k4/miou", "k4/pixel_acc"]


def test_upsampled_chunks_are_bilinear_and_cover_every_pixel():
    feats = torch.randn(5, 3, 3, 4).half()
    rows = np.concatenate(list(monitors._upsampled_chunks(feats, 250)()))  # 1 image per chunk
    want = torch.nn.functional.interpolate(feats.float().permute(0, 3, 1, 2), size=(250, 250), mode="bilinear",
                                           align_corners=False).permute(0, 2, 3, 1).reshape(-1, 4)
    np.testing.assert_allclose(rows, want.numpy(), rtol=1e-6)


def _oracle_merged(attn, masks, ignore, threshold):
    """Merged-attention Jaccard with scipy/numpy only: blur (mirror padding), mass threshold, 8-connected
    components of <= 2 cells removed, nearest upsampling, Jaccard over the non-ignored pixels."""
    out = []
    for a, m in zip(attn.double().numpy(), masks.numpy(), strict=True):
        mean = a.mean(axis=0)
        blurred = ndimage.gaussian_filter(mean, sigma=0.6, mode="mirror", truncate=3 / 0.6)
        flat = blurred.ravel()
        order = np.argsort(flat)
        cum = np.cumsum(flat[order] / flat.sum())
        keep = np.zeros(flat.size, bool)
        keep[order[cum > 1 - threshold]] = True
        keep = keep.reshape(mean.shape)
        lab, count = ndimage.label(keep, structure=np.ones((3, 3)))
        for c in range(1, count + 1):
            if (lab == c).sum() <= 2:
                keep[lab == c] = False
        rep = m.shape[0] // keep.shape[0]
        pred = np.kron(keep, np.ones((rep, rep), bool))
        valid = m != ignore
        fg = m != 0
        union = ((pred | fg) & valid).sum()
        out.append(((pred & fg & valid).sum() / union) if union else 0.0)
    return np.array(out)


def test_merged_attention_jaccard_matches_an_independent_oracle():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(3, 4, 6, 6, generator=g) ** 4  # peaky, continuous: no ties at the threshold
    masks = torch.zeros(3, 24, 24, dtype=torch.long)
    masks[:, 4:16, 6:20] = 3
    masks[1, 10:22, 2:10] = 5
    masks[:, 15, :] = 255
    merged, _, fg = attention_jaccards(attn, masks, 255, 0.6)
    np.testing.assert_allclose(merged.numpy(), _oracle_merged(attn, masks, 255, 0.6), atol=1e-9)
    assert fg.shape == (3, 24, 24) and fg.dtype == torch.bool


def test_best_head_jaccard_by_hand_and_the_boundary_option():
    # 4x4 tokens of 2x2 px. Class 1 fills the top-left 2x2 tokens, class 2 the bottom-right ones.
    masks = torch.zeros(1, 8, 8, dtype=torch.long)
    masks[0, :4, :4] = 1
    masks[0, 4:, 4:] = 2
    masks[0, 0, 0] = 255  # one boundary pixel, inside the token the first head likes most
    attn = torch.zeros(1, 2, 4, 4)
    # Head 0 on class 1's tokens with masses 0.4, 0.3, 0.2, 0.1: 60 % of the mass keeps the 0.4 and 0.3 ones.
    attn[0, 0, :2, :2] = torch.tensor([[0.4, 0.3], [0.2, 0.1]])
    attn[0, 1, 2:, 2:] = torch.tensor([[0.4, 0.3], [0.2, 0.1]])  # head 1 likewise on class 2
    _, best, _ = attention_jaccards(attn, masks, 255, 0.6)
    # Class 1: 8 px predicted, one of them ignored -> 7 / (16 - 1); class 2: 8 / 16.
    assert float(best[0]) == pytest.approx((7 / 15 + 8 / 16) / 2)
    _, best_ref, _ = attention_jaccards(attn, masks, 255, 0.6, boundary_as_foreground=True)
    # Counted in: the boundary pixel is predicted but not class 1 -> 7 / 16.
    assert float(best_ref[0]) == pytest.approx((7 / 16 + 8 / 16) / 2)
    no_objects = torch.zeros(1, 8, 8, dtype=torch.long)
    assert float(attention_jaccards(attn, no_objects, 255, 0.6)[1][0]) == 0.0


def _tiny_vit():
    torch.manual_seed(0)
    return build_backbone("vit_tiny", weights="random").eval()


def test_kmeans_monitor_on_the_synthetic_split_with_a_figure(tmp_path):
    data = SyntheticScenes("val", num_images=4, image_size=32, seed=0)
    monitor = KMeansMonitor(data, image_size=32, mask_size=16, ks=["classes", 12], iters=5, restarts=1,
                            figure_dir=tmp_path, num_figures=1)
    metrics = monitor(_tiny_vit(), "before")
    assert 0.0 <= metrics["kmeans/k7/miou"] <= 100.0 and "kmeans/k12_iou/miou" in metrics
    assert "kmeans/k12/class/disc/precision" in metrics
    assert (tmp_path / "kmeans_monitor_before.png").is_file()


def test_attention_monitor_on_the_synthetic_split_with_a_figure(tmp_path):
    data = SyntheticScenes("val", num_images=3, image_size=32, seed=0)
    monitor = AttentionMonitor(data, image_size=32, batch_size=2, figure_dir=tmp_path, num_figures=1)
    metrics = monitor(_tiny_vit(), "after")
    assert set(metrics) == {"attn/jaccard_merged", "attn/jaccard_best_head"}
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    assert (tmp_path / "attn_monitor_after.png").is_file()


TINY = [
    "experiment=quickstart", "backbone.weights=random", "logger.progress=false", "data.batch_size=2",
    "data.synthetic_images=4", "data.synthetic_size=32", "data.global_size=32", "data.local_size=16",
    "loss.roi_size=3", "loss.head.hidden_dim=32", "loss.head.out_dim=16", "logger.log_every=1", "optim.epochs=1",
    "max_steps=2", "monitor.dataset=synthetic", "monitor.val_images=3", "monitor.image_size=32",
    "monitor.every_n_steps=1", "monitor.num_figures=0",
]


def _train(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=TINY + [f"paths.output_dir={tmp_path}", *overrides])
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    return read_metrics(run_dir / "metrics.jsonl")


def _eval_tags(records, key):
    return [k.split("/")[1] for r in records for k in r if k.startswith("eval/") and k.endswith(key)]


def test_training_with_the_kmeans_monitor(tmp_path):
    records = _train(tmp_path, "monitor=kmeans", "monitor.mask_size=16", "monitor.ks=[classes,10]",
                     "monitor.kmeans_iters=5", "monitor.kmeans_restarts=1", "monitor.max_images=2")
    # Before, after the first step (not after the last: that is the "after" evaluation), after.
    assert _eval_tags(records, "/kmeans/k7/miou") == ["before", "step1", "after"]
    assert any("eval/after/kmeans/k10/class/background/recall" in r for r in records)


def test_training_with_the_attention_monitor_reads_the_teacher(tmp_path, monkeypatch):
    seen = []
    original = AttentionMonitor.__call__

    def spy(self, backbone, tag):
        seen.append(any(p.requires_grad for p in backbone.parameters()))  # the teacher's never do
        return original(self, backbone, tag)

    monkeypatch.setattr(AttentionMonitor, "__call__", spy)
    records = _train(tmp_path, "monitor=attention", "monitor.every_n_steps=0")
    assert _eval_tags(records, "/attn/jaccard_merged") == ["before", "after"]
    assert seen == [False, False]


def test_monitor_options_fail_clearly(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=TINY + ["monitor=kmeans", "monitor.ks=[classs]"])
    with pytest.raises(ConfigError, match="monitor.ks"):
        monitors.build_monitor(cfg.monitor, cfg.data, cfg.paths, device="cpu", amp_dtype=None, progress=False,
                               run_dir=tmp_path)


def test_monitors_leave_the_training_streams_alone(tmp_path):
    """A run draws the same crops and reaches the same losses with any monitor or none (each monitor here also
    runs between steps), so turning a monitor on never changes what is trained."""
    def losses(name, *extra):
        records = _train(tmp_path / name, f"monitor={name}", *extra)
        return [r["loss"] for r in records if "loss" in r]

    plain = losses("none")
    assert len(plain) == 2
    assert losses("quick", "monitor.train_images=8", "monitor.val_images=4") == plain
    assert losses("kmeans", "monitor.mask_size=16", "monitor.ks=[classes]", "monitor.kmeans_iters=2",
                  "monitor.kmeans_restarts=1", "monitor.max_images=2") == plain
