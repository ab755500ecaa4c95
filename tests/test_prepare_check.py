"""`neco.data.prepare` (VOC trainaug from SBD, COCO-Stuff / COCO-Things masks from COCO's annotations) and
`neco.data.check` on fake trees, end to end through the evaluation loaders."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from scipy.io import savemat
from test_eval_datasets import VOC_VALUES, expected, make_coco, make_voc, write_image, write_mask

from neco.data.check import run_check
from neco.data.datasets import voc_trainaug
from neco.data.eval_datasets import build_eval_dataset
from neco.data.labels import COCO_STUFF_CATEGORIES, COCO_THING_CATEGORIES
from neco.data.prepare import decode_segmentation, rle_counts, run_prepare, voc_palette

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Compressed RLE strings written by pycocotools 2.0.11 (mask.encode), with the masks they encode, so the
# decoder is checked against COCO's own encoder rather than against itself.
RLE_SMALL = "6183K00000=MF"  # 7x9


def small_mask():
    m = np.zeros((7, 9), bool)
    m[1:5, 2:6] = True
    m[6, 0] = m[0, 8] = True
    return m


RLE_LARGE = "a11a1000b9>PE" + "77II" * 39 + "7l7\\OaI00000000"  # 50x60, runs of up to 1,500 pixels


def large_mask():
    m = np.zeros((50, 60), bool)
    m[5:45, 10:50] = True
    m[20:23, :] = False
    m[0:2, 55:60] = True
    m[49, 0:3] = True
    return m


def cfg(app, overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(app, overrides=overrides)


def test_rle_decoder_matches_pycocotools_encodings():
    assert np.array_equal(decode_segmentation({"size": [7, 9], "counts": RLE_SMALL}, 7, 9), small_mask())
    assert np.array_equal(decode_segmentation({"size": [50, 60], "counts": RLE_LARGE.encode()}, 50, 60), large_mask())
    assert sum(rle_counts(RLE_LARGE)) == 3000 and int(large_mask().sum()) == 1493
    plain = {"size": [2, 3], "counts": [1, 2, 3]}  # uncompressed RLE (crowd annotations), column-major
    assert decode_segmentation(plain, 2, 3).tolist() == [[False, True, False], [True, False, False]]
    with pytest.raises(ValueError, match="RLE covers 6 pixels, the image has 2x4"):
        decode_segmentation({"size": [2, 4], "counts": [1, 2, 3]}, 2, 4)


def test_voc_palette_is_the_standard_colour_map():
    palette = voc_palette()
    assert palette[15 * 3: 16 * 3] == [192, 128, 128] and palette[255 * 3: 256 * 3] == [224, 224, 192]


def make_sbd(root, masks):
    """SBD's benchmark_RELEASE/dataset: cls/<id>.mat holding GTcls.Segmentation, img/, train.txt, val.txt."""
    sbd = root / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    boundaries = np.empty((20, 1), dtype=object)  # a cell array of per-class boundary maps (unused here)
    boundaries[:, 0] = [np.zeros((0, 0)) for _ in range(20)]
    for i, seg in masks.items():
        gt = {"Segmentation": seg.astype(np.uint8), "Boundaries": boundaries,
              "CategoriesPresent": np.unique(seg[seg > 0]).astype(np.uint8)}
        savemat(sbd / "cls" / f"{i}.mat", {"GTcls": gt})
        write_image(sbd / "img" / f"{i}.jpg")
    return sbd


def test_prepare_voc_aug_from_sbd(tmp_path):
    voc = make_voc(tmp_path / "voc")  # VOC train: 2007_000033, val: 2007_000032
    sbd_masks = {i: np.resize(np.array(v, np.uint8), (8, 12)) for i, v in
                 [("2007_000032", [1]), ("2008_000001", [0, 3]), ("2009_000002", [20, 0, 7]), ("2010_000003", [5])]}
    sbd = make_sbd(tmp_path / "sbd", sbd_masks)
    (sbd / "train.txt").write_text("2007_000032\n2008_000001\n2009_000002\n")  # 2007_000032 is VOC val
    (sbd / "val.txt").write_text("2010_000003\n")
    (voc / "sets" / "trainaug.txt").unlink()
    for i in ("2007_000033", "2008_000001"):  # 2007_000033 comes from VOC's own masks, 2008_000001 from SBD
        (voc / "SegmentationClassAug" / f"{i}.png").unlink()
    (voc / "SegmentationClass" / "2008_000001.png").unlink()  # VOC has masks for its train and val ids only
    summary = run_prepare(cfg("prepare", ["dataset=voc_aug", f"paths.voc={tmp_path / 'voc'}", f"sbd={tmp_path / 'sbd'}",
                                          "progress=false"]))
    ids = ["2007_000033", "2008_000001", "2009_000002", "2010_000003"]
    assert (voc / "sets" / "trainaug.txt").read_text().split() == ids
    assert (summary["trainaug"], summary["from_voc"], summary["from_sbd"], summary["images_copied"]) == (4, 1, 3, 2)
    train = build_eval_dataset("voc", "train", {"voc": tmp_path / "voc"})
    assert [train.image_id(i) for i in range(len(train))] == ids
    assert torch.equal(train[0][1], expected(VOC_VALUES, {v: v for v in VOC_VALUES}))  # VOC's, with 255
    for k, i in enumerate(ids[1:], start=1):  # SBD masks, 0..20 without boundaries
        assert torch.equal(train[k][1], torch.from_numpy(sbd_masks[i].astype(np.int64)))
    assert Image.open(train.mask_path(2)).mode == "P"  # written with the VOC colours
    assert len(voc_trainaug(tmp_path / "voc")) == 4  # training reads the same list
    # Without SBD it says what is missing.
    with pytest.raises(Exception, match="sbd is not set"):
        run_prepare(cfg("prepare", ["dataset=voc_aug", f"paths.voc={tmp_path / 'voc'}"]))


def write_stuff_json(root):
    """stuff_val2017.json with two images: RLE-compressed stuff, an uncompressed 'other' region."""
    images = [{"id": 1, "file_name": "000000000001.jpg", "height": 50, "width": 60},
              {"id": 2, "file_name": "000000000002.jpg", "height": 7, "width": 9}]
    anns = [{"image_id": 1, "category_id": 157, "segmentation": {"size": [50, 60], "counts": RLE_LARGE}},
            {"image_id": 2, "category_id": 149, "segmentation": {"size": [7, 9], "counts": RLE_SMALL}},
            {"image_id": 2, "category_id": 183, "segmentation": {"size": [7, 9], "counts": [60, 3]}}]
    folder = root / "annotations" / "stuff_annotations"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stuff_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": COCO_STUFF_CATEGORIES}))
    for im in images:
        write_image(root / "images" / "val2017" / im["file_name"], size=(im["width"], im["height"]))


def test_prepare_coco_stuff_pixelmaps_from_json(tmp_path):
    write_stuff_json(tmp_path)
    run_prepare(cfg("prepare", ["dataset=coco_stuff", f"paths.coco_eval={tmp_path}", "splits=[val]",
                                "progress=false"]))
    pixelmap = tmp_path / "annotations/stuff_annotations/stuff_val2017_pixelmaps/000000000001.png"
    assert np.array_equal(np.asarray(Image.open(pixelmap)), np.where(large_mask(), 157, 0))
    data = build_eval_dataset("coco_stuff", "val", {"coco_eval": tmp_path})
    assert torch.equal(data[0][1], torch.from_numpy(np.where(large_mask(), 8, 255)))  # sky-other -> sky
    second = np.full((7, 9), 255)
    second[small_mask()] = 5  # road -> ground
    assert torch.equal(data[1][1], torch.from_numpy(second))  # the trailing 'other' pixels stay 255


def write_panoptic(root, split="val2017"):
    folder = root / "annotations" / "panoptic_annotations"
    (folder / f"panoptic_{split}").mkdir(parents=True)
    ids = np.zeros((8, 12), np.uint32)
    ids[:, 4:8] = 1 + 256 * 2 + 65536 * 3  # a dog
    ids[:, 8:] = 5  # tree-merged (stuff)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(folder / f"panoptic_{split}" / "000000000139.png")
    ann = {"image_id": 139, "file_name": "000000000139.png",
           "segments_info": [{"id": int(ids[0, 5]), "category_id": 18}, {"id": 5, "category_id": 184}]}
    cats = COCO_THING_CATEGORIES + [{"id": 184, "name": "tree-merged", "supercategory": "plant", "isthing": 0}]
    (folder / f"panoptic_{split}.json").write_text(json.dumps({"annotations": [ann], "categories": cats}))
    write_image(root / "images" / split / "000000000139.jpg")
    return ids


def test_prepare_coco_things_semantic_masks_from_panoptic(tmp_path):
    write_panoptic(tmp_path)
    summary = run_prepare(cfg("prepare", ["dataset=coco_things", f"paths.coco_eval={tmp_path}", "splits=[val]",
                                          "progress=false"]))
    assert summary["val"]["written"] == 1
    semantic = np.asarray(Image.open(tmp_path / "annotations" / "val2017" / "000000000139.png"))
    assert semantic[0].tolist() == [0] * 4 + [18] * 4 + [184] * 4
    mask = build_eval_dataset("coco_things", "val", {"coco_eval": tmp_path})[0][1]
    assert mask[3].tolist() == [255] * 4 + [1] * 4 + [255] * 4  # dog -> animal; unlabelled and stuff ignored
    with pytest.raises(Exception, match=r"paths\.coco_eval=.*panoptic_train2017\.json"):
        run_prepare(cfg("prepare", ["dataset=coco_things", f"paths.coco_eval={tmp_path}", "splits=[train]"]))


def test_check_reports_counts_labels_and_unreadable_files(tmp_path, capsys):
    make_coco(tmp_path)
    (tmp_path / "annotations/stuff_annotations/stuff_val2017.json").write_text(
        json.dumps({"categories": COCO_STUFF_CATEGORIES}))
    overrides = ["data=coco_stuff", f"paths.coco_eval={tmp_path}", "check.progress=false"]
    assert run_check(cfg("check", overrides)) == 1  # 2 images where COCO has 118,287 / 5,000
    out = capsys.readouterr().out
    assert "train: 2 images, the complete split has 118287" in out and "val: 2 images" in out
    assert "bad masks" not in out and "categories differ" not in out and "result: 2 problem(s)" in out
    write_mask(tmp_path / "annotations/stuff_annotations/stuff_val2017_pixelmaps/000000000139.png", [0, 7])
    (tmp_path / "images/train2017/000000000285.jpg").write_bytes(b"not a jpeg")
    os.remove(tmp_path / "annotations/stuff_annotations/stuff_train2017_pixelmaps/000000000139.png")
    bad_cats = [dict(c, supercategory="sky") if c["id"] == 149 else c for c in COCO_STUFF_CATEGORIES]
    (tmp_path / "annotations/stuff_annotations/stuff_val2017.json").write_text(json.dumps({"categories": bad_cats}))
    assert run_check(cfg("check", overrides + ["check.samples=-1"])) == 1
    out = capsys.readouterr().out
    assert "1 images have no mask in" in out and "000000000139" in out
    assert "1 unreadable files: could not read image" in out and "000000000285.jpg" in out
    assert "1 bad masks:" in out and "unexpected label ids 7" in out
    assert "categories differ from the built-in coco_stuff table" in out and "(149, 'ground')" in out
    # A missing dataset is a problem in the report, not a crash; so is a training set of the wrong size.
    assert run_check(cfg("check", ["data=ade20k", f"paths.ade20k={tmp_path / 'nothing'}", "check.progress=false"])) == 1
    assert "paths.ade20k=" in capsys.readouterr().out
    assert run_check(cfg("check", ["data=coco", f"paths.coco={tmp_path / 'images'}", "check.progress=false"])) == 1
    assert "coco (train): 2 images, the complete split has 118287" in capsys.readouterr().out
    assert run_check(cfg("check", ["data=synthetic", "check.progress=false"])) == 0


@pytest.mark.slow  # two interpreter start-ups (torch, Hydra)
def test_command_lines(tmp_path):
    """Both Hydra apps from the shell: prepare writes the list, check exits 1 on the fake (small) copy."""
    make_voc(tmp_path / "voc")
    make_sbd(tmp_path / "sbd", {"2011_000001": np.ones((8, 12), np.uint8)})
    (tmp_path / "sbd/benchmark_RELEASE/dataset/train.txt").write_text("2011_000001\n")
    (tmp_path / "sbd/benchmark_RELEASE/dataset/val.txt").write_text("2007_000032\n")  # VOC val: left out
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prepare = subprocess.run([sys.executable, "-m", "neco.data.prepare", "dataset=voc_aug", f"paths.voc={tmp_path}/voc",
                              f"sbd={tmp_path}/sbd", "overwrite=true", "progress=false"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert prepare.returncode == 0, prepare.stderr
    assert '"trainaug": 2' in prepare.stdout and "python -m neco.data.check data=voc" in prepare.stdout
    check = subprocess.run([sys.executable, "-m", "neco.data.check", "data=voc", f"paths.voc={tmp_path}/voc",
                            "check.progress=false"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 1, check.stderr
    assert "trainaug: 2 images, the complete split has 10582" in check.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sbd", "voc"]  # no run directory left behind
