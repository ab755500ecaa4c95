import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader

from neco.data.datasets import (
    IMAGENET100_WNIDS,
    DatasetNotFound,
    ImageFolderDataset,
    ImageReadError,
    build_train_dataset,
    coco_train,
    imagenet_train,
    load_rgb,
    voc_trainaug,
)
from neco.data.multicrop import MultiCrop
from neco.data.synthetic import SyntheticTrain


def size_of(image):
    return image.size


def write_image(path, kind="rgb", size=(24, 16)):
    """Tiny test images in the formats real datasets contain."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    rgb = Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8))
    if kind == "rgb":
        rgb.save(path)
    elif kind == "gray":
        rgb.convert("L").save(path)
    elif kind == "palette":
        pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
        pal.info["transparency"] = 0
        pal.save(path, transparency=0)
    elif kind == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: the camera was turned, display rotated by 90 degrees
        rgb.save(path, exif=exif)
    else:
        raise ValueError(kind)
    return path


@pytest.fixture
def trees(tmp_path):
    coco = tmp_path / "coco"
    write_image(coco / "train2017" / "000001.jpg")
    write_image(coco / "train2017" / "000002.png", "gray")
    write_image(coco / "train2017" / "000003.png", "palette")
    write_image(coco / "train2017" / "000004.jpg", "exif_rotated")
    (coco / "train2017" / "README.txt").write_text("not an image")
    (coco / "train2017" / "._000001.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS metadata file

    imagenet = tmp_path / "imagenet"
    kept = IMAGENET100_WNIDS[:2]
    for wnid in [*kept, "n99999999"]:
        for k in range(2):
            write_image(imagenet / "train" / wnid / f"{wnid}_{k}.JPEG")
    (imagenet / "imagenet100.txt").write_text("\n".join(kept) + "\n")

    voc = tmp_path / "voc" / "VOCSegmentation"
    ids = ["2007_000032", "2007_000033", "2008_000001"]
    for i in [*ids, "2009_999999"]:
        write_image(voc / "images" / f"{i}.jpg")
    (voc / "sets").mkdir()
    (voc / "sets" / "trainaug.txt").write_text("\n".join(ids) + "\n\n")

    folder = tmp_path / "folder"
    write_image(folder / "a.jpg")
    write_image(folder / "nested" / "b.png")
    write_image(folder / "nested" / "deeper" / "c.JPG")
    roots = {"coco": coco, "imagenet": imagenet, "voc": tmp_path / "voc", "folder": folder}
    return tmp_path, roots


def test_load_rgb_handles_gray_palette_and_exif(trees):
    _, roots = trees
    train = roots["coco"] / "train2017"
    for name in ("000001.jpg", "000002.png", "000003.png", "000004.jpg"):
        image = load_rgb(train / name)
        assert image.mode == "RGB"
    # The EXIF orientation tag (90 degrees) is applied: a 24x16 photo is shown as 16x24.
    assert load_rgb(train / "000004.jpg").size == (16, 24)
    assert load_rgb(train / "000001.jpg").size == (24, 16)


def test_coco_reads_train2017_sorted_and_skips_non_images(trees):
    _, roots = trees
    data = coco_train(roots["coco"], size_of)
    assert [f.rsplit("/", 1)[-1] for f in data.files] == [
        "000001.jpg",
        "000002.png",
        "000003.png",
        "000004.jpg",
    ]
    assert data[3] == (16, 24)
    # The COCO root of the evaluation layout (images/train2017) names the same images.
    nested = roots["coco"].parent / "coco_root"
    (nested / "images").mkdir(parents=True)
    (roots["coco"] / "train2017").rename(nested / "images" / "train2017")
    assert len(coco_train(nested)) == 4


def test_imagenet_class_lists(trees):
    _, roots = trees
    assert len(imagenet_train(roots["imagenet"])) == 6
    assert len(imagenet_train(roots["imagenet"], class_list=roots["imagenet"] / "imagenet100.txt")) == 4
    assert len(imagenet_train(roots["imagenet"], class_list=[IMAGENET100_WNIDS[1]])) == 2
    assert len(build_train_dataset("imagenet100", roots)) == 4
    # Without imagenet100.txt the built-in list is used, and its absent classes are reported.
    (roots["imagenet"] / "imagenet100.txt").unlink()
    with pytest.raises(DatasetNotFound, match=r"paths\.imagenet=.*98 of the 100 listed classes"):
        build_train_dataset("imagenet100", roots)


def test_imagenet100_constant_is_the_appendix_list():
    assert len(IMAGENET100_WNIDS) == 100 and len(set(IMAGENET100_WNIDS)) == 100
    assert all(w.startswith("n") and len(w) == 9 and w[1:].isdigit() for w in IMAGENET100_WNIDS)
    assert IMAGENET100_WNIDS[0] == "n02869837" and IMAGENET100_WNIDS[-1] == "n02090622"


def test_voc_trainaug_reads_the_listed_ids_from_either_root(trees):
    _, roots = trees
    data = voc_trainaug(roots["voc"], size_of)
    assert len(data) == 3 and data.files[0].endswith("VOCSegmentation/images/2007_000032.jpg")
    assert len(voc_trainaug(roots["voc"] / "VOCSegmentation")) == 3
    (roots["voc"] / "VOCSegmentation" / "images" / "2008_000001.jpg").unlink()
    with pytest.raises(DatasetNotFound, match=r"paths\.voc=.*1 of the 3 images"):
        voc_trainaug(roots["voc"])


def test_folder_is_searched_recursively(trees):
    _, roots = trees
    data = build_train_dataset("folder", roots, size_of)
    assert len(data) == 3
    assert len(ImageFolderDataset(roots["folder"])) == 1


def test_concatenation_and_synthetic(trees):
    _, roots = trees
    data = build_train_dataset("coco+imagenet100", roots, size_of)
    assert isinstance(data, ConcatDataset) and len(data) == 4 + 4
    assert data[4] == (24, 16)
    assert len(build_train_dataset("coco,imagenet100k", roots)) == 8  # the reference configs' spelling
    synthetic = build_train_dataset("synthetic", {}, size_of, synthetic={"num_images": 7, "image_size": 32})
    assert isinstance(synthetic, SyntheticTrain) and len(synthetic) == 7 and synthetic[0] == (32, 32)
    with pytest.raises(ValueError, match="unknown training dataset"):
        build_train_dataset("cocoa", roots)


def test_missing_path_names_the_config_key(trees):
    tmp_path, roots = trees
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFound) as info:
        build_train_dataset("coco", {**roots, "coco": missing})
    message = str(info.value)
    assert f"paths.coco={missing}" in message and str(missing / "train2017") in message
    assert "COCO train2017 images" in message
    assert isinstance(info.value, FileNotFoundError)
    for name, key in (("imagenet", "imagenet"), ("voc", "voc"), ("folder", "folder")):
        with pytest.raises(DatasetNotFound, match=rf"paths\.{key}={missing}"):
            build_train_dataset(name, {**roots, key: missing})
    with pytest.raises(DatasetNotFound, match=r"paths\.voc is not set"):
        build_train_dataset("coco+voc", {**roots, "voc": None})


def test_empty_folder_says_no_images(trees):
    tmp_path, roots = trees
    empty = tmp_path / "empty"
    (empty / "train2017").mkdir(parents=True)
    (empty / "train2017" / "list.txt").write_text("nothing here")
    with pytest.raises(DatasetNotFound, match=r"paths\.coco=.*no images found"):
        build_train_dataset("coco", {"coco": empty})
    with pytest.raises(DatasetNotFound, match=r"paths\.folder=.*no images found"):
        build_train_dataset("folder", {"folder": empty})
    (empty / "train").mkdir()
    (empty / "train" / "n01440764").mkdir()
    with pytest.raises(DatasetNotFound, match=r"paths\.imagenet=.*no images found"):
        build_train_dataset("imagenet", {"imagenet": empty})


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        ImageFolderDataset(tmp_path)[0]


def test_loader_with_multicrop(trees):
    _, roots = trees
    data = build_train_dataset("coco+voc", roots, MultiCrop(global_size=32, local_size=16))
    torch.manual_seed(0)
    inputs, boxes = next(iter(DataLoader(data, batch_size=4, shuffle=True)))
    assert [tuple(x.shape) for x in inputs] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 4
    assert boxes["gc"].shape == (4, 2, 6, 4) and boxes["all"].shape == (4, 6, 2, 4)


def test_voc_trainaug_in_the_official_tarball_layout(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    write_image(voc / "JPEGImages" / "2007_000032.jpg")
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "trainaug.txt").write_text("2007_000032\n")
    assert voc_trainaug(tmp_path).files == [str(voc / "JPEGImages" / "2007_000032.jpg")]
    (voc / "ImageSets" / "Segmentation" / "trainaug.txt").unlink()
    with pytest.raises(DatasetNotFound, match=r"paths\.voc=.*trainaug\.txt.*neco\.data\.prepare dataset=voc_aug"):
        voc_trainaug(tmp_path)


def test_train_readers_skip_bad_images_by_default(trees):
    _, roots = trees
    (roots["coco"] / "train2017" / "000002.png").write_bytes(b"broken")
    data = build_train_dataset("coco", roots, size_of)  # data.on_bad_image defaults to skip
    assert data[1] == (24, 16)  # the next image stands in
    with pytest.raises(ImageReadError, match="000002.png"):
        build_train_dataset("coco", roots, size_of, on_bad_image="raise")[1]
