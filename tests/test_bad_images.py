"""Bad input: odd image formats decode to proper RGB; corrupt files are skipped and counted, or raise."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from neco.data.datasets import (
    ImageFileDataset,
    ImageReadError,
    bad_image_count,
    build_train_dataset,
    load_rgb,
)
from neco.data.eval_datasets import build_eval_dataset
from neco.data.multicrop import MultiCrop

RGB = np.array([[[200, 30, 60], [10, 250, 128]], [[0, 0, 0], [255, 255, 255]]], dtype=np.uint8)


def _rgb(path):
    Image.fromarray(RGB).save(path)
    return path


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896], [65535, 1000, 65280]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "depth.png")  # mode I;16
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "wide.tif")  # mode I
    for name in ("depth.png", "wide.tif"):
        image = load_rgb(tmp_path / name)
        assert image.mode == "RGB"
        got = np.asarray(image)
        assert (got[..., 0] == got[..., 2]).all()
        assert got[..., 0].tolist() == [[0, 1, 128], [255, 4, 254]]  # round(v / 257), PIL would give 255s


def test_grey_palette_cmyk_alpha_and_exif(tmp_path):
    Image.fromarray(RGB).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(RGB).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    Image.fromarray(RGB).convert("CMYK").save(tmp_path / "cmyk.tif")
    Image.fromarray(np.dstack([RGB, np.full((2, 2), 7, np.uint8)])).save(tmp_path / "alpha.png")
    pal = Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    pal.save(tmp_path / "pal.png", transparency=0)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "cmyk.tif")), RGB)
    assert np.abs(np.asarray(load_rgb(tmp_path / "cmyk.jpg")).astype(int) - RGB).max() <= 12
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "alpha.png")), RGB)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "pal.png")), RGB)
    grey = np.asarray(load_rgb(tmp_path / "grey.png"))
    assert grey.shape == (2, 2, 3) and (grey[..., 0] == grey[..., 1]).all()
    exif = Image.Exif()
    exif[0x0112] = 8  # stored rotated: display turns it by 90 degrees
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "phone.jpg", exif=exif)
    assert load_rgb(tmp_path / "phone.jpg").size == (4, 6)
    assert load_rgb(tmp_path / "phone.jpg", exif=False).size == (6, 4)  # for images with pixel-aligned masks


def _corrupt_files(tmp_path):
    _rgb(tmp_path / "a.png")
    good = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    good.save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "b_truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "c_empty.jpg").write_bytes(b"")
    (tmp_path / "d_garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return [tmp_path / n for n in ("a.png", "b_truncated.jpg", "c_empty.jpg", "d_garbage.png", "full.jpg")]


def test_corrupt_images_raise_by_default_naming_the_file(tmp_path):
    files = _corrupt_files(tmp_path)
    for f in files[1:4]:
        with pytest.raises(ImageReadError, match=f.name):
            load_rgb(f)
    with pytest.raises(ImageReadError, match=r"b_truncated\.jpg.*data\.on_bad_image=skip"):
        ImageFileDataset(files)[1]
    with pytest.raises(ValueError, match=r"data\.on_bad_image='ignore': choose skip"):
        ImageFileDataset(files, on_bad_image="ignore")


def test_skip_substitutes_the_next_readable_image_and_counts(tmp_path, caplog):
    files = _corrupt_files(tmp_path)
    data = ImageFileDataset(files, transform=lambda im: im.size, on_bad_image="skip")
    with caplog.at_level(logging.WARNING, logger="neco"):
        assert data[1] == (64, 64)  # b, c and d are bad: full.jpg stands in
        assert data[1] == (64, 64)
    assert bad_image_count(data) == 6  # every substitution counts ...
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 3 and "b_truncated.jpg" in warned[0]  # ... but each file is reported once
    assert data[0] == (2, 2) and bad_image_count(data) == 6
    all_bad = ImageFileDataset(files[1:4], on_bad_image="skip")
    with pytest.raises(ImageReadError, match="3 images in a row could not be read.*neco.data.check"):
        all_bad[0]


def test_training_builder_threads_the_policy_and_shares_one_counter(tmp_path):
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    files = _corrupt_files(tmp_path / "coco" / "train2017")
    (tmp_path / "folder").mkdir()
    _rgb(tmp_path / "folder" / "x.png")
    (tmp_path / "folder" / "y.jpg").write_bytes(b"nope")
    roots = {"coco": tmp_path / "coco", "folder": tmp_path / "folder"}
    data = build_train_dataset("coco+folder", roots, transform=lambda im: im.size)  # data.on_bad_image=skip
    assert [data[i] for i in range(len(data))] == [(2, 2)] + [(64, 64)] * 4 + [(2, 2)] * 2
    assert bad_image_count(data) == 3 + 2 + 1 + 1  # c and d are retried from b and c; y from the folder
    with pytest.raises(ImageReadError, match=files[1].name):
        build_train_dataset("coco", roots, on_bad_image="raise")[1]


def test_counter_sees_what_loader_workers_skipped(tmp_path):
    files = _corrupt_files(tmp_path)
    data = ImageFileDataset(files, transform=lambda im: torch.tensor(im.size), on_bad_image="skip")
    loader = DataLoader(data, batch_size=1, num_workers=2)
    sizes = [tuple(b[0].tolist()) for b in loader]
    assert sizes == [(2, 2)] + [(64, 64)] * 4
    # Six substitutions happened in the two workers; two increments at the very same instant may merge.
    assert 4 <= bad_image_count(data) <= 6


def test_eval_dataset_bad_image_policy(tmp_path):
    from test_eval_datasets import make_ade20k

    ade = make_ade20k(tmp_path)
    (ade / "images" / "validation" / "ADE_val_00000001.jpg").write_bytes(b"broken")
    with pytest.raises(ImageReadError, match="ADE_val_00000001.jpg"):
        build_eval_dataset("ade20k", "val", {"ade20k": tmp_path})[0]
    data = build_eval_dataset("ade20k", "val", {"ade20k": tmp_path}, on_bad_image="skip")
    image, mask = data[0]
    assert image.size == (12, 8) and mask.shape == (8, 12) and bad_image_count(data) == 1
    (ade / "annotations" / "validation" / "ADE_val_00000002.png").write_bytes(b"broken")
    with pytest.raises(ImageReadError, match="2 images in a row"):
        data[1]


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 5), (3, 40), (40, 3)])
def test_images_smaller_than_a_crop_still_give_valid_crops_and_boxes(size):
    multicrop = MultiCrop(global_size=32, local_size=16)
    sides = torch.tensor([32.0, 32, 16, 16, 16, 16])
    for seed in range(5):
        torch.manual_seed(seed)
        crops, boxes = multicrop(Image.new("RGB", size, (10, 200, 30)))
        assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 4
        assert all(torch.isfinite(c).all() for c in crops)
        gc, in_crop = boxes["gc"], boxes["all"]  # (G, N, 4) in global crop g's frame, (N, G, 4) in crop j's
        assert (gc >= 0).all() and (gc <= 32).all()
        assert (in_crop >= 0).all() and (in_crop <= sides[:, None, None]).all()
        for b in (gc, in_crop):
            assert (b[..., 2] > b[..., 0]).all() and (b[..., 3] > b[..., 1]).all()
