"""Evaluation datasets: images with pixel masks already mapped to train ids (METHOD.md §6, §7).

Every protocol reads its data through :func:`build_eval_dataset`. A :class:`SegmentationDataset` yields
``(PIL RGB image, LongTensor mask (H, W))`` and carries ``name``, ``split``, ``num_classes``, ``ignore_index``,
``class_names``, ``image_id(i)`` (the file stem) and ``select(ids)`` (a subset, e.g. a low-shot file list).

Masks are read as stored values (palette PNGs give their palette index, never a colour; METHOD.md §7.6), mapped
through the lookup tables of :mod:`neco.data.labels`; a value no valid file contains raises
:class:`MaskError` naming the file. Images are not EXIF-rotated here: masks are drawn on the stored pixels.
Layouts: the reference code's, its DATASET.md's where they disagree (METHOD.md §10.18), and the official archives'.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .datasets import (
    BadImageCounter,
    DatasetNotFound,
    ImageReadError,
    PathLike,
    check_bad_image_policy,
    find_voc,
    list_images,
    load_rgb,
    read_ids,
    read_or_substitute,
)
from .labels import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    VOC_CLASSES,
    cityscapes_lut,
    coco_stuff_lut,
    coco_things_lut,
    describe_lut,
    identity_lut,
)
from .synthetic import SyntheticScenes

EVAL_DATASETS = ("voc", "coco_stuff", "coco_things", "ade20k", "cityscapes", "synthetic")
ROOT_KEYS = {"voc": "voc", "coco_stuff": "coco_eval", "coco_things": "coco_eval", "ade20k": "ade20k",
             "cityscapes": "cityscapes"}
# The splits of each dataset; VOC "train" is trainaug (10,582), "train_1464" the 1,464 segmentation train list.
SPLITS = {"voc": ("train", "trainaug", "train_1464", "val"), "synthetic": ("train", "val", "test")}
# Image counts of the complete datasets (METHOD.md §6, §7), per canonical split.
KNOWN_COUNTS = {
    "voc": {"trainaug": 10582, "train_1464": 1464, "val": 1449},
    "coco_stuff": {"train": 118287, "val": 5000},
    "coco_things": {"train": 118287, "val": 5000},
    "ade20k": {"train": 20210, "val": 2000},
    "cityscapes": {"train": 2975, "val": 500},
}
_MASK_MODES = ("P", "L", "I", "I;16", "I;16L", "I;16B")


class MaskError(ValueError):
    """A mask file does not fit its dataset: unexpected label ids, several channels, or another size."""


def decode_mask(path: str, lut: np.ndarray, dataset: str = "") -> np.ndarray:
    """The stored values of a single-channel mask file mapped through ``lut`` (int64 ``(H, W)``)."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            raw = np.asarray(im) if mode in _MASK_MODES else None  # palette images: the index, not the colour
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"could not read mask {path}: {e}") from e
    if raw is None:
        raise MaskError(f"{path}: a {dataset} mask must be a single-channel PNG of label ids (palette or "
                        f"greyscale), this one has mode {mode}; point the paths entry at the label-id masks")
    valid = raw < len(lut)
    mapped = lut[np.where(valid, raw, 0)]
    bad = ~valid | (mapped < 0)
    if bad.any():
        values = np.unique(raw[bad]).tolist()
        shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
        raise MaskError(f"{path}: unexpected label ids {shown} in a {dataset} mask (valid ids: "
                        f"{describe_lut(lut)}); check that the paths entry points at the right mask folder")
    return mapped


class SegmentationDataset(Dataset):
    """``(PIL RGB image, LongTensor mask)`` pairs of one split; ``items`` are ``(image_id, image, mask)``."""

    def __init__(self, name: str, split: str, items: Sequence[tuple[str, str, str]], lut: np.ndarray,
                 class_names: Sequence[str], ignore_index: int, on_bad_image: str = "raise",
                 bad_counter: BadImageCounter | None = None):
        self.name, self.split = name, split
        self.items = [tuple(item) for item in items]
        self.lut = lut
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.ignore_index = ignore_index
        self.on_bad_image = check_bad_image_policy(on_bad_image)
        self.bad_counter = bad_counter or BadImageCounter()

    def __len__(self) -> int:
        return len(self.items)

    def image_id(self, index: int) -> str:
        return self.items[index][0]

    def image_path(self, index: int) -> str:
        return self.items[index][1]

    def mask_path(self, index: int) -> str:
        return self.items[index][2]

    def read(self, index: int) -> tuple[Image.Image, torch.Tensor]:
        """One pair, without the ``on_bad_image`` substitution (raises :class:`ImageReadError`)."""
        _, image_file, mask_file = self.items[index]
        image = load_rgb(image_file, exif=False)
        mask = decode_mask(mask_file, self.lut, self.name)
        if mask.shape != (image.height, image.width):
            raise MaskError(f"{mask_file}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_file} is "
                            f"{image.width}x{image.height}")
        return image, torch.from_numpy(mask)

    def __getitem__(self, index: int) -> tuple[Image.Image, torch.Tensor]:
        if index < 0:
            index += len(self.items)
        if not 0 <= index < len(self.items):
            raise IndexError(f"index {index} out of range for {len(self.items)} images")
        return read_or_substitute(self.read, index, len(self.items), self.on_bad_image, self.bad_counter,
                                  self.image_path)

    def select(self, ids: Sequence[str]) -> SegmentationDataset:
        """The images ``ids`` (file stems), in that order: a subset such as a 1/128 low-shot list."""
        by_id = {item[0]: item for item in self.items}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise KeyError(f"{len(missing)} of the {len(ids)} requested image ids are not in {self.name} "
                           f"{self.split} (e.g. {missing[0]!r})")
        subset = copy.copy(self)
        subset.items = [by_id[i] for i in ids]
        return subset

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, split={self.split!r}, images={len(self)}, "
                f"num_classes={self.num_classes}, ignore_index={self.ignore_index})")


def select_images(dataset, ids: Sequence[str]):
    """``dataset.select(ids)``, or for any dataset with ``image_id`` (e.g. the synthetic scenes) an
    :class:`IdSubset` with the same attributes."""
    if hasattr(dataset, "select"):
        return dataset.select(ids)
    return IdSubset(dataset, ids)


class IdSubset(Dataset):
    """The images ``ids`` of a dataset that only offers ``image_id(i)``; keeps the dataset's attributes."""

    def __init__(self, dataset, ids: Sequence[str]):
        position = {dataset.image_id(i): i for i in range(len(dataset))}
        missing = [i for i in ids if i not in position]
        if missing:
            raise KeyError(f"{len(missing)} of the {len(ids)} requested image ids are not in the dataset "
                           f"(e.g. {missing[0]!r})")
        self.dataset, self.indices = dataset, [position[i] for i in ids]
        for attr in ("name", "split", "num_classes", "ignore_index", "class_names"):
            setattr(self, attr, getattr(dataset, attr, None))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]

    def image_id(self, index: int) -> str:
        return self.dataset.image_id(self.indices[index])


# Layouts --------------------------------------------------------------------------------------------------


@dataclass
class Scan:
    """What is on disk for one split: ids with their image and mask paths (None where absent)."""

    name: str
    split: str  # canonical: trainaug, train_1464, train or val
    key: str
    root: str
    ids: list[str]
    images: list[str | None]
    masks: list[str | None]
    mask_dir: str
    lut: np.ndarray
    class_names: list[str]
    ignore_index: int
    hint: str = ""  # how to produce missing masks


def _first_dir(base: str, candidates: Sequence[str]) -> str | None:
    return next((os.path.join(base, c) for c in candidates if os.path.isdir(os.path.join(base, c))), None)


def _missing(key: str, root: str, base: str, candidates: Sequence[str], what: str, hint: str = ""):
    others = "".join(f" (or {os.path.join(base, c)})" for c in candidates[1:])
    return DatasetNotFound(f"paths.{key}={root}: expected {os.path.join(base, candidates[0])}{others} with {what}, "
                           f"but it does not exist{'; ' + hint if hint else ''}")


def _pair_by_stem(image_files: list[str], mask_dir: str) -> tuple[list[str], list[str | None]]:
    present = set(os.listdir(mask_dir))
    ids = [os.path.splitext(os.path.basename(f))[0] for f in image_files]
    return ids, [os.path.join(mask_dir, f"{i}.png") if f"{i}.png" in present else None for i in ids]


def _scan_voc(split: str, key: str, root: str) -> Scan:
    voc = find_voc(root, key)
    canonical = {"train": "trainaug", "trainaug": "trainaug", "train_1464": "train_1464", "val": "val"}[split]
    hint = "python -m neco.data.prepare dataset=voc_aug builds it from SBD" if canonical == "trainaug" else ""
    list_file = os.path.join(voc.sets, {"train_1464": "train"}.get(canonical, canonical) + ".txt")
    ids = read_ids(list_file, key, root, f"the VOC {canonical} image ids" + (f"; {hint}" if hint else ""))
    # The reference reads train/trainaug masks from SegmentationClassAug and val masks from SegmentationClass;
    # without SBD the 1,464 train masks are VOC's own.
    dirs = {"val": ["SegmentationClass"], "trainaug": ["SegmentationClassAug"],
            "train_1464": ["SegmentationClassAug", "SegmentationClass"]}[canonical]
    mask_dir = _first_dir(voc.folder, dirs)
    if mask_dir is None:
        raise _missing(key, root, voc.folder, dirs, "the VOC masks (<id>.png)", hint)
    masks = set(os.listdir(mask_dir))
    images = [os.path.join(voc.images, f"{i}.jpg") for i in ids]
    return Scan("voc", canonical, key, root, ids, [p if os.path.isfile(p) else None for p in images],
                [os.path.join(mask_dir, f"{i}.png") if f"{i}.png" in masks else None for i in ids], mask_dir,
                identity_lut(21, [255]), VOC_CLASSES, 255, hint)


def _nested_root(root: str, marker: str, folder: str) -> str:
    """``root`` if it holds ``marker``, else ``root/folder``: DATASET.md shows the parent of the folder the
    reference code takes (ADEChallengeData2016, cityscapes)."""
    return root if os.path.isdir(os.path.join(root, marker)) else os.path.join(root, folder)


def _scan_ade20k(split: str, key: str, root: str) -> Scan:
    base = _nested_root(root, "images", "ADEChallengeData2016")
    sub = {"train": "training", "val": "validation"}[split]
    image_dir = _first_dir(base, [f"images/{sub}"])
    if image_dir is None:
        raise _missing(key, root, root, [f"ADEChallengeData2016/images/{sub}", f"images/{sub}"],
                       f"the ADE20K {sub} images")
    mask_dir = _first_dir(base, [f"annotations/{sub}"])
    if mask_dir is None:
        raise _missing(key, root, base, [f"annotations/{sub}"], f"the ADE20K {sub} masks (<stem>.png)")
    files = list_images(image_dir)
    ids, masks = _pair_by_stem(files, mask_dir)
    return Scan("ade20k", split, key, root, ids, list(files), masks, mask_dir, identity_lut(151), ADE20K_CLASSES, 0)


def _scan_cityscapes(split: str, key: str, root: str) -> Scan:
    base = _nested_root(root, "leftImg8bit", "cityscapes")
    image_dir = _first_dir(base, [f"leftImg8bit/{split}"])
    if image_dir is None:
        raise _missing(key, root, root, [f"leftImg8bit/{split}", f"cityscapes/leftImg8bit/{split}"],
                       "one folder per city of *_leftImg8bit.png")
    mask_dir = _first_dir(base, [f"gtFine/{split}"])
    if mask_dir is None:
        raise _missing(key, root, base, [f"gtFine/{split}"], "one folder per city of *_gtFine_labelIds.png")
    files = [f for f in list_images(image_dir, (".png",), recursive=True) if f.endswith("_leftImg8bit.png")]
    ids = [os.path.basename(f)[: -len("_leftImg8bit.png")] for f in files]
    cities = [os.path.basename(os.path.dirname(f)) for f in files]

    def masks_with(suffix: str) -> list[str | None]:
        paths = [os.path.join(mask_dir, c, f"{i}_gtFine_{suffix}.png") for c, i in zip(cities, ids)]
        return [p if os.path.isfile(p) else None for p in paths]

    masks, lut = masks_with("labelIds"), cityscapes_lut()
    if not any(masks):  # only the train-id masks of cityscapesscripts' createTrainIdLabelImgs
        train_ids = masks_with("labelTrainIds")
        if any(train_ids):
            masks, lut = train_ids, identity_lut(19, [255])
    return Scan("cityscapes", split, key, root, ids, list(files), masks, mask_dir, lut, CITYSCAPES_CLASSES, 255)


_PANOPTIC = "annotations/panoptic_annotations"
# Mask folders per dataset, the reference code's first, then the official archives' and DATASET.md's (with
# its "segmenations" typo) and the Leopart layout ("annotations/annotations/..."). "{s}" is e.g. val2017.
_COCO_MASKS = {
    "coco_stuff": ("the COCO-Stuff pixelmaps (<stem>.png, ids 0 and 92-183)", "stuff_<split>2017.json",
                   ["annotations/stuff_annotations/stuff_{s}_pixelmaps", "annotations/stuff_{s}_pixelmaps",
                    "annotations/annotations/stuff_annotations/stuff_{s}_pixelmaps"]),
    "coco_things": ("the COCO semantic masks (<stem>.png, panoptic category ids)", "panoptic_<split>2017.json",
                    ["annotations/{s}", _PANOPTIC + "/semantic_segmenations_{s}",
                     _PANOPTIC + "/semantic_segmentations_{s}", _PANOPTIC + "/semantic_segmentation_{s}"]),
}


def _scan_coco(name: str, split: str, key: str, root: str) -> Scan:
    s = f"{split}2017"
    image_dirs = [f"images/{s}", s, f"coco/images/{s}"]
    what, source, patterns = _COCO_MASKS[name]
    mask_dirs = [p.format(s=s) for p in patterns]
    hint = f"python -m neco.data.prepare dataset={name} builds them from {source}"
    lut, names = coco_stuff_lut() if name == "coco_stuff" else coco_things_lut()
    image_dir = _first_dir(root, image_dirs)
    if image_dir is None:
        raise _missing(key, root, root, image_dirs, f"the COCO {s} images")
    mask_dir = _first_dir(root, mask_dirs)
    if mask_dir is None:
        raise _missing(key, root, root, mask_dirs, what, hint)
    files = list_images(image_dir)
    ids, masks = _pair_by_stem(files, mask_dir)
    return Scan(name, split, key, root, ids, list(files), masks, mask_dir, lut, names, 255, hint)


def scan_eval_split(name: str, split: str, roots: Mapping[str, PathLike | None]) -> Scan:
    """List one split of an on-disk evaluation dataset without reading any file (see :class:`Scan`)."""
    if name not in ROOT_KEYS:
        raise ValueError(f"unknown evaluation dataset {name!r}: choose one of {', '.join(EVAL_DATASETS)}")
    splits = SPLITS.get(name, ("train", "val"))
    if split not in splits:
        raise ValueError(f"unknown split {split!r} for {name}: choose one of {', '.join(splits)}")
    key = ROOT_KEYS[name]
    root = roots.get(key)
    if root is None or os.fspath(root) == "":
        raise DatasetNotFound(f"paths.{key} is not set: set it to the {name} dataset folder (see docs/DATASETS.md)")
    root = os.path.expanduser(os.fspath(root))
    if name == "voc":
        return _scan_voc(split, key, root)
    if name == "ade20k":
        return _scan_ade20k(split, key, root)
    if name == "cityscapes":
        return _scan_cityscapes(split, key, root)
    return _scan_coco(name, split, key, root)


def build_eval_dataset(name: str, split: str, roots: Mapping[str, PathLike | None], *,
                       synthetic: Mapping | None = None, on_bad_image: str = "raise"):
    """The evaluation dataset ``name`` (``voc``, ``coco_stuff``, ``coco_things``, ``ade20k``, ``cityscapes``,
    ``synthetic``), split ``train`` or ``val`` (VOC also ``trainaug`` = ``train`` and ``train_1464``).

    ``roots`` is the ``paths`` config as a mapping; ``synthetic`` holds :class:`SyntheticScenes` arguments
    (``num_images``, ``image_size``, ``seed``). A missing folder or mask raises :class:`DatasetNotFound`
    naming the ``paths`` key; ``on_bad_image`` (``raise`` or ``skip``) handles unreadable files.
    """
    name = name.lower().replace("-", "_")
    if name == "synthetic":
        scenes = SyntheticScenes("train" if split.startswith("train") else split, **dict(synthetic or {}))
        scenes.name = "synthetic"
        return scenes
    scan = scan_eval_split(name, split, roots)
    for paths, what in ((scan.images, "image"), (scan.masks, "mask")):
        absent = [i for i, p in zip(scan.ids, paths) if p is None]
        if absent:
            where = scan.mask_dir if what == "mask" else "the image folder"
            raise DatasetNotFound(
                f"paths.{scan.key}={scan.root}: {len(absent)} of the {len(scan.ids)} {name} {scan.split} images have "
                f"no {what} in {where} (e.g. {absent[0]}){'; ' + scan.hint if scan.hint and what == 'mask' else ''}")
    if not scan.ids:
        raise DatasetNotFound(f"paths.{scan.key}={scan.root}: no {name} {scan.split} images found")
    items = list(zip(scan.ids, scan.images, scan.masks))
    return SegmentationDataset(name, split, items, scan.lut, scan.class_names, scan.ignore_index, on_bad_image)
