"""Every protocol end to end on tiny fake trees of the real on-disk layouts (VOC, ADE20K), on the CPU.

The trees hold synthetic scenes written as JPEG images and palette/greyscale PNG masks, so the readers, the label
conventions (VOC's 255 boundary, ADE20K's ignored 0) and the protocols are exercised together.
"""

import numpy as np
import pytest
from eval_helpers import make_context
from PIL import Image

from neco.data.eval_datasets import build_eval_dataset
from neco.data.synthetic import SyntheticScenes
from neco.eval.hummingbird import protocol as hummingbird
from neco.eval.linear import protocol as linear
from neco.eval.overcluster import protocol as overcluster
from neco.eval.unsupervised import protocol as unsup_seg

SIZE = 48


def _write_scene(image, mask, image_path, mask_paths):
    image_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(image_path, quality=95)
    for path in mask_paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(path)


def make_voc_tree(root, n_train=16, n_val=12):
    """VOCSegmentation/ with synthetic scenes: classes 0-6, and a one-pixel 255 border around every object."""
    voc = root / "VOCSegmentation"
    ids = {"train": [f"2008_{i:06d}" for i in range(n_train)], "val": [f"2009_{i:06d}" for i in range(n_val)]}
    for split, names in ids.items():
        scenes = SyntheticScenes(split, num_images=len(names), image_size=SIZE, seed=3)
        for i, name in enumerate(names):
            image, mask = scenes[i]
            m = mask.numpy().astype(np.uint8)
            edge = np.zeros_like(m, dtype=bool)
            edge[1:] |= m[1:] != m[:-1]
            edge[:, 1:] |= m[:, 1:] != m[:, :-1]
            m[edge] = 255
            _write_scene(image, m, voc / "images" / f"{name}.jpg",
                         [voc / "SegmentationClass" / f"{name}.png", voc / "SegmentationClassAug" / f"{name}.png"])
    (voc / "sets").mkdir(parents=True, exist_ok=True)
    (voc / "sets" / "trainaug.txt").write_text("\n".join(ids["train"]) + "\n")
    (voc / "sets" / "train.txt").write_text("\n".join(ids["train"][:8]) + "\n")
    (voc / "sets" / "val.txt").write_text("\n".join(ids["val"]) + "\n")
    return root


def make_ade_tree(root, n_train=12, n_val=8):
    """ADEChallengeData2016/ with synthetic scenes shifted to labels 1-7 and a 0 ("other", ignored) border."""
    ade = root / "ADEChallengeData2016"
    for split, folder, prefix, n in (("train", "training", "ADE_train", n_train),
                                     ("val", "validation", "ADE_val", n_val)):
        scenes = SyntheticScenes(split, num_images=n, image_size=SIZE, seed=4)
        for i in range(n):
            image, mask = scenes[i]
            m = mask.numpy().astype(np.uint8) + 1
            m[0, :] = 0
            _write_scene(image, m, ade / "images" / folder / f"{prefix}_{i:08d}.jpg",
                         [ade / "annotations" / folder / f"{prefix}_{i:08d}.png"])
    return ade


SMALL = {
    "overcluster": {"image_size": SIZE, "mask_size": 24, "batch_size": 4, "ks": ["classes", 30], "seeds": [0],
                    "kmeans_iters": 10, "kmeans_restarts": 1, "faiss_threads": 1},
    "hummingbird": {"image_size": SIZE, "memory_size": None, "augmentation_epochs": 1},
    "linear": {"image_size": SIZE, "mask_size": 24, "epochs": 2, "lr_step": 1, "batch_size": 4,
               "val_batch_size": 4, "eval_mask_size": SIZE},
}


def _context(tmp_path, name, roots):
    return make_context(tmp_path, dataset_name=name,
                        get_dataset=lambda split: build_eval_dataset(name, split, roots), num_figures=2)


@pytest.mark.slow
def test_protocols_on_a_voc_tree(tmp_path):
    roots = {"voc": str(make_voc_tree(tmp_path / "voc"))}
    ctx = _context(tmp_path, "voc", roots)
    assert ctx.dataset("val").num_classes == 21 and len(ctx.dataset("train")) == 16
    results = {name: module.run(ctx, SMALL[name])
               for name, module in (("overcluster", overcluster), ("hummingbird", hummingbird), ("linear", linear))}
    assert set(results["overcluster"].metrics) >= {"k21/miou", "k30/miou"}
    for res in results.values():
        values = [v for k, v in res.metrics.items() if k.endswith("miou")]
        assert values and all(0.0 <= v <= 100.0 for v in values)
        assert res.figures and all(p.endswith(".png") for p in res.figures)
    # VOC's reference loaders drop the last partial batch: 12 images at batch 4 keep all 12.
    assert results["overcluster"].extra["num_images"] == 12
    unsup = unsup_seg.run(ctx, {"image_size": SIZE, "mask_size": SIZE, "eval_size": 24, "k_fg": 8,
                                "kmeans_iters": 10, "kmeans_restarts": 1, "cbfe_seeds": [0], "k_community": 6,
                                "num_runs": 2, "faiss_threads": 1, "cbfe_score": False})
    assert 0.0 <= unsup.metrics["miou"] <= 100.0


@pytest.mark.slow
def test_protocols_on_an_ade20k_tree(tmp_path):
    roots = {"ade20k": str(make_ade_tree(tmp_path / "ade"))}
    ctx = _context(tmp_path, "ade20k", roots)
    val = ctx.dataset("val")
    assert (val.num_classes, val.ignore_index) == (151, 0)
    for name, module in (("overcluster", overcluster), ("hummingbird", hummingbird), ("linear", linear)):
        opts = dict(SMALL[name])
        if name == "overcluster":
            opts["ks"] = [30]  # K = 151 classes exceeds the handful of tokens here
        res = module.run(ctx, opts)
        assert all(0.0 <= v <= 100.0 for k, v in res.metrics.items() if k.endswith("miou")), name
        # mIoU over all 151 ids: at most 7 of them can be non-zero here.
        per_class = res.extra.get("per_class_iou")
        if per_class is not None and not isinstance(per_class, dict):
            assert len(per_class) == 151
