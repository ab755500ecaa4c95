"""Evaluation datasets: fake on-disk trees of every supported layout, loaded end to end with the right ids."""

import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from neco.data.datasets import DatasetNotFound
from neco.data.eval_datasets import (
    KNOWN_COUNTS,
    MaskError,
    SegmentationDataset,
    build_eval_dataset,
    scan_eval_split,
    select_images,
)
from neco.data.labels import ADE20K_CLASSES, VOC_CLASSES

W, H = 12, 8


def voc_palette() -> list[int]:
    """The Pascal VOC colour map: index 15 (person) is drawn (192, 128, 128), 255 (boundary) light grey."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def write_image(path, size=(W, H)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def write_mask(path, values, mode="L", size=(W, H)):
    """A mask whose pixels cycle through ``values`` (row-major), as a palette ('P') or greyscale PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = np.resize(np.asarray(values, dtype=np.uint8), size[0] * size[1])
    mask = Image.fromarray(flat.reshape(size[1], size[0]), mode="L")
    if mode == "P":
        mask = mask.convert("P")  # keeps the values as palette indices ...
        mask.putpalette(voc_palette())  # ... drawn with the VOC colours
    mask.save(path)
    return path


def expected(values, lut: dict, size=(W, H)):
    flat = np.resize(np.asarray([lut[v] for v in values]), size[0] * size[1])
    return torch.from_numpy(flat.reshape(size[1], size[0]).astype(np.int64))


VOC_VALUES = [0, 15, 255, 20, 1]


def make_voc(root, layout="reference", ids=("2007_000032", "2007_000033", "2008_000001")):
    """VOC with val masks (SegmentationClass) and trainaug masks (SegmentationClassAug), palette PNGs."""
    if layout == "reference":
        voc, images, sets = root / "VOCSegmentation", "images", "sets"
    else:  # the official tarball, VOCdevkit/VOC2012
        voc, images, sets = root / "VOCdevkit" / "VOC2012", "JPEGImages", "ImageSets/Segmentation"
    for i in ids:
        write_image(voc / images / f"{i}.jpg")
        write_mask(voc / "SegmentationClass" / f"{i}.png", VOC_VALUES, "P")
        write_mask(voc / "SegmentationClassAug" / f"{i}.png", VOC_VALUES, "P")
    (voc / sets).mkdir(parents=True, exist_ok=True)
    (voc / sets / "val.txt").write_text(f"{ids[0]}\n")
    (voc / sets / "train.txt").write_text(f"{ids[1]}\n")
    (voc / sets / "trainaug.txt").write_text("\n".join(ids[1:]) + "\n")
    return voc


STUFF_VALUES = [0, 92, 105, 157, 183, 106, 149]  # unlabelled, banner, clothes, sky-other, other, clouds, road
STUFF_IDS = {0: 255, 92: 11, 105: 11, 157: 8, 183: 255, 106: 8, 149: 5}  # textile 11, sky 8, ground 5
THING_VALUES = [0, 1, 18, 90, 184, 255, 3]  # unlabelled, person, dog, toothbrush, tree-merged, void, car
THING_IDS = {0: 255, 1: 9, 18: 1, 90: 6, 184: 255, 255: 255, 3: 11}  # person 9, animal 1, indoor 6, vehicle 11


def make_coco(root, layout="reference", stems=("000000000139", "000000000285")):
    if layout == "reference":  # METHOD.md §7.2 (the NeCo code)
        images, stuff, things = "images/{s}", "annotations/stuff_annotations/stuff_{s}_pixelmaps", "annotations/{s}"
    elif layout == "official":  # COCO's archives unpacked side by side
        images, stuff = "{s}", "annotations/stuff_{s}_pixelmaps"
        things = "annotations/panoptic_annotations/semantic_segmentations_{s}"
    else:  # DATASET.md, typo included
        images, stuff = "coco/images/{s}", "annotations/annotations/stuff_annotations/stuff_{s}_pixelmaps"
        things = "annotations/panoptic_annotations/semantic_segmenations_{s}"
    for s in ("train2017", "val2017"):
        for stem in stems:
            write_image(root / images.format(s=s) / f"{stem}.jpg")
            write_mask(root / stuff.format(s=s) / f"{stem}.png", STUFF_VALUES, "P")
            write_mask(root / things.format(s=s) / f"{stem}.png", THING_VALUES)
    return root


def make_ade20k(root, stems=("ADE_val_00000001", "ADE_val_00000002")):
    ade = root / "ADEChallengeData2016"
    for split, prefix in (("validation", "ADE_val"), ("training", "ADE_train")):
        for stem in stems:
            stem = stem.replace("ADE_val", prefix)
            write_image(ade / "images" / split / f"{stem}.jpg")
            write_mask(ade / "annotations" / split / f"{stem}.png", [0, 1, 150, 13])
    return ade


CITY_VALUES = [0, 7, 26, 33, 4, 24]
CITY_IDS = {0: 255, 7: 0, 26: 13, 33: 18, 4: 255, 24: 11}


def make_cityscapes(root, suffix="labelIds", values=CITY_VALUES):
    city = root / "cityscapes"
    for split, town in (("train", "aachen"), ("val", "frankfurt")):
        for k in range(2):
            stem = f"{town}_000000_00001{k}"
            write_image(city / "leftImg8bit" / split / town / f"{stem}_leftImg8bit.png")
            write_mask(city / "gtFine" / split / town / f"{stem}_gtFine_{suffix}.png", values)
            write_mask(city / "gtFine" / split / town / f"{stem}_gtFine_color.png", [1, 2, 3])  # ignored
    return city


def test_voc_palette_masks_give_class_indices_not_colours(tmp_path):
    make_voc(tmp_path)
    roots = {"voc": tmp_path}
    val = build_eval_dataset("voc", "val", roots)
    assert isinstance(val, SegmentationDataset) and len(val) == 1
    assert (val.name, val.split, val.num_classes, val.ignore_index) == ("voc", "val", 21, 255)
    assert val.class_names == VOC_CLASSES and val.class_names[15] == "person"
    image, mask = val[0]
    assert image.mode == "RGB" and image.size == (W, H)
    assert mask.dtype == torch.int64 and mask.shape == (H, W)
    assert torch.equal(mask, expected(VOC_VALUES, {v: v for v in VOC_VALUES}))
    assert val.image_id(0) == "2007_000032" and val.mask_path(0).endswith("SegmentationClass/2007_000032.png")
    train = build_eval_dataset("voc", "train", roots)  # train = trainaug, masks from SegmentationClassAug
    assert [train.image_id(i) for i in range(len(train))] == ["2007_000033", "2008_000001"]
    assert train.mask_path(0).endswith("SegmentationClassAug/2007_000033.png")
    assert len(build_eval_dataset("voc", "trainaug", roots)) == 2
    assert [d.image_id(0) for d in [build_eval_dataset("voc", "train_1464", roots)]] == ["2007_000033"]
    # The inner folder itself (DATASET.md) names the same data.
    assert len(build_eval_dataset("voc", "val", {"voc": tmp_path / "VOCSegmentation"})) == 1


def test_voc_official_tarball_layout(tmp_path):
    make_voc(tmp_path, layout="official")
    data = build_eval_dataset("voc", "val", {"voc": tmp_path})
    assert data.image_path(0).endswith("VOCdevkit/VOC2012/JPEGImages/2007_000032.jpg")
    assert torch.equal(data[0][1], expected(VOC_VALUES, {v: v for v in VOC_VALUES}))
    # Without SBD there is no SegmentationClassAug: the 1,464 train list falls back to VOC's own masks.
    import shutil

    shutil.rmtree(tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClassAug")
    assert build_eval_dataset("voc", "train_1464", {"voc": tmp_path}).mask_path(0).endswith(
        "SegmentationClass/2007_000033.png")
    with pytest.raises(DatasetNotFound, match=r"paths\.voc=.*SegmentationClassAug.*prepare dataset=voc_aug"):
        build_eval_dataset("voc", "train", {"voc": tmp_path})


@pytest.mark.parametrize("layout", ["reference", "official", "dataset_md"])
def test_coco_stuff_and_things_super_classes(tmp_path, layout):
    make_coco(tmp_path, layout)
    roots = {"coco_eval": tmp_path}
    stuff = build_eval_dataset("coco_stuff", "val", roots)
    assert (stuff.num_classes, stuff.ignore_index, len(stuff)) == (15, 255, 2)
    assert stuff.class_names[:3] == ["building", "ceiling", "floor"] and stuff.class_names[-1] == "window"
    assert torch.equal(stuff[0][1], expected(STUFF_VALUES, STUFF_IDS))
    things = build_eval_dataset("coco_things", "train", roots)
    assert (things.num_classes, things.ignore_index, things.split) == (12, 255, "train")
    assert things.class_names[9] == "person" and things.class_names[11] == "vehicle"
    assert torch.equal(things[1][1], expected(THING_VALUES, THING_IDS))
    assert things.image_id(0) == "000000000139"


def test_ade20k_from_either_root_level(tmp_path):
    ade = make_ade20k(tmp_path)
    for root in (tmp_path, ade):
        val = build_eval_dataset("ade20k", "val", {"ade20k": root})
        assert (val.num_classes, val.ignore_index, len(val)) == (151, 0, 2)
        assert val.class_names == ADE20K_CLASSES and val.class_names[1] == "wall"
        assert torch.equal(val[0][1], expected([0, 1, 150, 13], {0: 0, 1: 1, 150: 150, 13: 13}))
    train = build_eval_dataset("ade20k", "train", {"ade20k": tmp_path})
    assert train.image_id(1) == "ADE_train_00000002"


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    make_cityscapes(tmp_path)
    for root in (tmp_path, tmp_path / "cityscapes"):
        val = build_eval_dataset("cityscapes", "val", {"cityscapes": root})
        assert (val.num_classes, val.ignore_index, len(val)) == (19, 255, 2)
        assert val.image_id(0) == "frankfurt_000000_000010" and val.class_names[0] == "road"
        assert torch.equal(val[0][1], expected(CITY_VALUES, CITY_IDS))


def test_cityscapes_train_id_masks_are_accepted(tmp_path):
    make_cityscapes(tmp_path, suffix="labelTrainIds", values=[0, 18, 255, 7])
    data = build_eval_dataset("cityscapes", "train", {"cityscapes": tmp_path})
    assert torch.equal(data[0][1], expected([0, 18, 255, 7], {0: 0, 18: 18, 255: 255, 7: 7}))


def test_synthetic_and_selection(tmp_path):
    scenes = build_eval_dataset("synthetic", "val", {}, synthetic={"num_images": 5, "image_size": 16, "seed": 1})
    assert (scenes.name, scenes.split, scenes.num_classes, len(scenes)) == ("synthetic", "val", 7, 5)
    assert scenes.image_id(3) == "val_000003"
    subset = select_images(scenes, ["val_000004", "val_000001"])
    assert len(subset) == 2 and subset.image_id(0) == "val_000004" and subset.num_classes == 7
    assert torch.equal(subset[1][1], scenes[1][1])
    assert build_eval_dataset("synthetic", "train_1464", {}, synthetic={"num_images": 2, "image_size": 16}).split \
        == "train"
    make_voc(tmp_path)
    train = build_eval_dataset("voc", "train", {"voc": tmp_path})
    picked = train.select(["2008_000001"])
    assert isinstance(picked, SegmentationDataset) and len(picked) == 1 and len(train) == 2
    assert picked.image_id(0) == "2008_000001" and select_images(train, ["2007_000033"]).image_id(0) == "2007_000033"
    with pytest.raises(KeyError, match="1 of the 2 requested image ids.*'nope'"):
        train.select(["2008_000001", "nope"])


def test_unexpected_ids_wrong_mode_and_size_name_the_file(tmp_path):
    voc = make_voc(tmp_path)
    bad = write_mask(voc / "SegmentationClass" / "2007_000032.png", [0, 21, 254], "P")
    data = build_eval_dataset("voc", "val", {"voc": tmp_path})
    with pytest.raises(MaskError, match=rf"{bad}: unexpected label ids 21, 254 .*valid ids: 0-20, 255"):
        data[0]
    Image.new("RGB", (W, H), (192, 128, 128)).save(bad)  # a colour-coded mask instead of label ids
    with pytest.raises(MaskError, match=rf"{bad}: .*single-channel.*mode RGB"):
        data[0]
    write_mask(bad, [0], size=(W + 1, H))
    with pytest.raises(MaskError, match=rf"{bad}: mask is 13x8 but its image .* is 12x8"):
        data[0]
    make_coco(tmp_path / "coco")
    write_mask(tmp_path / "coco/annotations/stuff_annotations/stuff_val2017_pixelmaps/000000000139.png", [0, 50])
    with pytest.raises(MaskError, match=r"000000000139.png: unexpected label ids 50 in a coco_stuff mask"):
        build_eval_dataset("coco_stuff", "val", {"coco_eval": tmp_path / "coco"})[0]


def test_missing_folders_and_masks_name_the_paths_key(tmp_path):
    with pytest.raises(DatasetNotFound, match=rf"paths\.voc={tmp_path}: expected {tmp_path}/VOCSegmentation"):
        build_eval_dataset("voc", "val", {"voc": tmp_path})
    with pytest.raises(DatasetNotFound, match=r"paths\.coco_eval is not set"):
        build_eval_dataset("coco_stuff", "val", {"coco_eval": None})
    with pytest.raises(DatasetNotFound, match=rf"paths\.coco_eval={tmp_path}: expected {tmp_path}/images/val2017"):
        build_eval_dataset("coco_things", "val", {"coco_eval": tmp_path})
    write_image(tmp_path / "images" / "val2017" / "a.jpg")
    with pytest.raises(DatasetNotFound, match=r"annotations/stuff_annotations/stuff_val2017_pixelmaps.*prepare"):
        build_eval_dataset("coco_stuff", "val", {"coco_eval": tmp_path})
    empty = tmp_path / "empty"
    with pytest.raises(DatasetNotFound, match=rf"paths\.ade20k={empty}: expected {empty}/ADEChallengeData2016/"
                                              rf"images/validation \(or {empty}/images/validation\)"):
        build_eval_dataset("ade20k", "val", {"ade20k": empty})
    with pytest.raises(DatasetNotFound, match=rf"paths\.cityscapes={empty}: expected {empty}/leftImg8bit/val"):
        build_eval_dataset("cityscapes", "val", {"cityscapes": empty})
    voc = make_voc(tmp_path / "v")
    (voc / "SegmentationClass" / "2007_000032.png").unlink()
    with pytest.raises(DatasetNotFound, match=r"paths\.voc=.*1 of the 1 voc val images have no mask"):
        build_eval_dataset("voc", "val", {"voc": tmp_path / "v"})
    scan = scan_eval_split("voc", "val", {"voc": tmp_path / "v"})  # the scan reports instead of raising
    assert scan.ids == ["2007_000032"] and scan.masks == [None] and scan.images[0].endswith(".jpg")
    with pytest.raises(ValueError, match="unknown evaluation dataset 'pascal'"):
        build_eval_dataset("pascal", "val", {})
    with pytest.raises(ValueError, match="unknown split 'test' for ade20k"):
        build_eval_dataset("ade20k", "test", {"ade20k": tmp_path})


def test_known_counts_are_the_published_ones():
    assert KNOWN_COUNTS["voc"] == {"trainaug": 10582, "train_1464": 1464, "val": 1449}
    assert KNOWN_COUNTS["coco_stuff"]["train"] == 118287 and KNOWN_COUNTS["ade20k"] == {"train": 20210, "val": 2000}
    assert KNOWN_COUNTS["cityscapes"] == {"train": 2975, "val": 500}
