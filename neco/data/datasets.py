"""On-disk training image readers (COCO, ImageNet(-100), Pascal VOC trainaug, any image folder).

Training only needs images, so every reader here returns ``transform(image)``. Folder layouts follow
METHOD.md §1.1 and §7. A missing or empty dataset folder raises :class:`DatasetNotFound` whose message names
the ``paths.<key>`` config entry to fix, the path that was tried and what it should contain.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, Union

from torch.utils.data import ConcatDataset, Dataset

from neco.errors import ConfigError

from .images import (  # noqa: F401  (re-exported: the readers' public names)
    BAD_IMAGE_POLICIES,
    BadImageCounter,
    BadImageError,
    ImageReadError,
    bad_image_count,
    check_bad_image_policy,
    load_rgb,
    printable,
    read_or_substitute,
)
from .labels import IMAGENET100_WNIDS
from .synthetic import SyntheticTrain

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

TRAIN_DATASETS = ("synthetic", "coco", "imagenet100", "imagenet", "voc", "folder")
# Names used by the reference configs, accepted as synonyms.
_ALIASES = {"imagenet100k": "imagenet100"}


class DatasetNotFound(FileNotFoundError):
    """A dataset folder is missing, incomplete or has no images; the message names the config key to set."""


def _has_ext(name: str, extensions: Sequence[str]) -> bool:
    # AppleDouble files ("._x.jpg") and other dotfiles are metadata, not images.
    return not name.startswith(".") and name.lower().endswith(tuple(e.lower() for e in extensions))


def list_images(
    root: PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS, recursive: bool = False
) -> list[str]:
    """Sorted image paths directly inside ``root`` (or anywhere under it with ``recursive``)."""
    root = os.fspath(root)
    if not recursive:
        with os.scandir(root) as it:
            files = [e.path for e in it if e.is_file() and _has_ext(e.name, extensions)]
        return sorted(files)
    # Symbolic links are followed, but each real directory is read once: a link back up the tree (a loop) would
    # otherwise list its files again and again, and two such loops make the walk endless. Subfolders are visited
    # in sorted order, so a folder reachable by two paths is always listed under the same one.
    files, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(os.path.join(dirpath, f) for f in filenames if _has_ext(f, extensions))
    return sorted(files)


class ImageFileDataset(Dataset):
    """A fixed list of image files -> ``transform(RGB image)`` (the image itself without a transform).

    ``on_bad_image="skip"`` replaces an unreadable file by the next readable one, logs a warning and counts it
    in ``bad_counter`` (see :func:`bad_image_count`); ``"raise"`` raises :class:`BadImageError`. ``source``
    (e.g. ``paths.folder=/data/x``) is named in those messages.
    """

    def __init__(self, files: Sequence[PathLike], transform: Callable | None = None, on_bad_image: str = "raise",
                 bad_counter: BadImageCounter | None = None, source: str = ""):
        self.files = [os.fspath(f) for f in files]
        self.transform = transform
        self.on_bad_image = check_bad_image_policy(on_bad_image)
        self.bad_counter = bad_counter or BadImageCounter()
        self.source = source

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        image = read_or_substitute(lambda i: load_rgb(self.files[i]), index, len(self.files), self.on_bad_image,
                                   self.bad_counter, self.files.__getitem__, self.source)
        return self.transform(image) if self.transform is not None else image


class ImageFolderDataset(ImageFileDataset):
    """Every image file directly inside ``root`` (or under it with ``recursive=True``), sorted by path."""

    def __init__(
        self,
        root: PathLike,
        transform: Callable | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        recursive: bool = False,
        key: str = "folder",
    ):
        root = _require_dir(root, key, root, "image files")
        self.root = root
        super().__init__(_require_images(root, key, root, extensions, recursive), transform)


# Path checks that produce the user-facing messages ------------------------------------------------------


def _require_dir(path: PathLike, key: str, root: PathLike, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DatasetNotFound(
            f"paths.{key}={os.fspath(root)}: expected {path} with {what}, but it does not exist"
        )
    return path


def _require_images(
    folder: str,
    key: str,
    root: PathLike,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    recursive: bool = False,
) -> list[str]:
    files = list_images(folder, extensions, recursive)
    if not files:
        where = "under" if recursive else "directly inside"
        raise DatasetNotFound(
            f"paths.{key}={os.fspath(root)}: no images found {where} {folder} "
            f"(looked for {', '.join(extensions)})"
        )
    return files


# Dataset readers ------------------------------------------------------------------------------------------


def coco_train(root: PathLike, transform: Callable | None = None, key: str = "coco") -> ImageFileDataset:
    """COCO train2017 images: ``root`` directly contains ``train2017/`` (METHOD.md §1.1).

    The COCO root itself (holding ``images/train2017``, the evaluation layout of METHOD.md §7.2) is accepted
    too: it names the same images, so one ``paths.coco`` serves training and evaluation.
    """
    root = os.path.expanduser(os.fspath(root))
    folder = os.path.join(root, "train2017")
    if not os.path.isdir(folder) and os.path.isdir(os.path.join(root, "images", "train2017")):
        folder = os.path.join(root, "images", "train2017")
    _require_dir(folder, key, root, "the COCO train2017 images")
    return ImageFileDataset(_require_images(folder, key, root), transform)


def _read_wnids(class_list: Union[PathLike, Sequence[str]], key: str, root: str) -> list[str]:
    if isinstance(class_list, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(class_list))
        if not os.path.isfile(path):
            raise DatasetNotFound(
                f"paths.{key}={root}: expected the class list {path} (one wnid per line); it does not exist"
            )
        with open(path) as f:
            return [w for w in (line.strip() for line in f) if w and not w.startswith("#")]
    return [str(w) for w in class_list]


def imagenet_train(
    root: PathLike,
    transform: Callable | None = None,
    class_list: Union[PathLike, Sequence[str], None] = None,
    key: str = "imagenet",
) -> ImageFileDataset:
    """ImageNet training images ``root/train/<wnid>/*``, sorted by class then file name.

    ``class_list`` (a file with one wnid per line such as ``imagenet100.txt``, or a sequence of wnids)
    restricts to those classes; every listed class folder must exist.
    """
    root = os.path.expanduser(os.fspath(root))
    train = _require_dir(
        os.path.join(root, "train"), key, root, "one folder of images per class (train/<wnid>/)"
    )
    if class_list is None:
        with os.scandir(train) as it:
            wnids = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    else:
        wnids = _read_wnids(class_list, key, root)
        missing = [w for w in wnids if not os.path.isdir(os.path.join(train, w))]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DatasetNotFound(
                f"paths.{key}={root}: {len(missing)} of the {len(wnids)} listed classes have no folder "
                f"in {train} ({shown})"
            )
    files = [f for w in wnids for f in list_images(os.path.join(train, w))]
    if not files:
        raise DatasetNotFound(
            f"paths.{key}={root}: no images found in the class folders of {train} "
            f"(expected {train}/<wnid>/*.JPEG)"
        )
    return ImageFileDataset(files, transform)


def imagenet100_train(
    root: PathLike, transform: Callable | None = None, key: str = "imagenet"
) -> ImageFileDataset:
    """ImageNet-100: the classes of ``root/imagenet100.txt`` if present, else :data:`IMAGENET100_WNIDS`."""
    root = os.path.expanduser(os.fspath(root))
    listed = os.path.join(root, "imagenet100.txt")
    return imagenet_train(root, transform, listed if os.path.isfile(listed) else IMAGENET100_WNIDS, key)


class VocLayout(NamedTuple):
    folder: str  # the VOCSegmentation folder (reference layout) or VOCdevkit/VOC2012 (the official tarball)
    images: str
    sets: str


def find_voc(root: PathLike, key: str = "voc") -> VocLayout:
    """The Pascal VOC folder under ``root``: ``root/VOCSegmentation`` (the reference appends it), ``root``
    itself (DATASET.md shows the inner folder), or the official ``VOCdevkit/VOC2012`` tree, whose
    ``JPEGImages`` and ``ImageSets/Segmentation`` stand for ``images`` and ``sets``."""
    root = os.path.expanduser(os.fspath(root))
    for folder in (os.path.join(root, "VOCSegmentation"), root, os.path.join(root, "VOCdevkit", "VOC2012"),
                   os.path.join(root, "VOC2012")):
        images = next((d for d in (os.path.join(folder, "images"), os.path.join(folder, "JPEGImages"))
                       if os.path.isdir(d)), None)
        sets = next((d for d in (os.path.join(folder, "sets"), os.path.join(folder, "ImageSets", "Segmentation"))
                     if os.path.isdir(d)), None)
        if images and sets:
            return VocLayout(folder, images, sets)
    raise DatasetNotFound(
        f"paths.{key}={root}: expected {os.path.join(root, 'VOCSegmentation')} with images/, sets/ and the "
        "mask folders (or the folder itself, or VOCdevkit/VOC2012 with JPEGImages/ and ImageSets/Segmentation/), "
        "but none was found"
    )


def read_ids(path: str, key: str, root: PathLike, what: str) -> list[str]:
    """Image ids listed one per line in ``path``."""
    if not os.path.isfile(path):
        raise DatasetNotFound(f"paths.{key}={os.fspath(root)}: expected {path} ({what}, one id per line), "
                              "but it does not exist")
    with open(path) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if not ids:
        raise DatasetNotFound(f"paths.{key}={os.fspath(root)}: no images found: {path} lists no image ids")
    return ids


def voc_trainaug(root: PathLike, transform: Callable | None = None, key: str = "voc") -> ImageFileDataset:
    """Pascal VOC ``trainaug`` images (METHOD.md §7.1), listed by ``sets/trainaug.txt`` (see :func:`find_voc`).

    ``python -m neco.data.prepare dataset=voc_aug`` writes that list from VOC and SBD.
    """
    root = os.path.expanduser(os.fspath(root))
    voc = find_voc(root, key)
    split = os.path.join(voc.sets, "trainaug.txt")
    ids = read_ids(split, key, root, f"the trainaug image ids, next to {voc.images}/<id>.jpg; "
                   "python -m neco.data.prepare dataset=voc_aug writes it")
    files = [os.path.join(voc.images, f"{i}.jpg") for i in ids]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DatasetNotFound(
            f"paths.{key}={root}: {len(missing)} of the {len(files)} images listed in {split} are missing, "
            f"e.g. {missing[0]}"
        )
    return ImageFileDataset(files, transform)


def folder_train(
    root: PathLike, transform: Callable | None = None, key: str = "folder"
) -> ImageFolderDataset:
    """Any folder of images, searched recursively (class subfolders and the like are fine)."""
    return ImageFolderDataset(os.path.expanduser(os.fspath(root)), transform, recursive=True, key=key)


def build_train_dataset(
    name: str,
    roots: Mapping[str, PathLike | None],
    transform: Callable | None = None,
    synthetic: Mapping | None = None,
    on_bad_image: str = "skip",
) -> Dataset:
    """The training dataset ``name`` (``synthetic``, ``coco``, ``imagenet100``, ``imagenet``, ``voc``,
    ``folder``, or several joined by ``+`` such as ``coco+imagenet100``, concatenated in that order).

    ``roots`` maps ``coco``, ``imagenet`` (also used for ImageNet-100), ``voc`` and ``folder`` to folders:
    the ``paths`` config group. ``synthetic`` holds keyword arguments for :class:`SyntheticTrain`.
    ``on_bad_image`` (``data.on_bad_image``): ``skip`` or ``raise``; every part shares one counter, read it
    with :func:`bad_image_count`.
    """
    check_bad_image_policy(on_bad_image)
    parts = [p.strip().lower() for p in name.replace(",", "+").split("+") if p.strip()]
    parts = [_ALIASES.get(p, p) for p in parts]
    unknown = [p for p in parts if p not in TRAIN_DATASETS]
    if not parts or unknown:
        raise ConfigError(
            f"unknown training dataset {name!r}: expected one of {', '.join(TRAIN_DATASETS)} "
            "or several joined by '+' (e.g. coco+imagenet100)"
        )
    datasets = [_build_one(p, roots, transform, synthetic) for p in parts]
    counter = BadImageCounter()
    for d in datasets:
        if isinstance(d, ImageFileDataset):
            d.on_bad_image, d.bad_counter = on_bad_image, counter
    return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)


_ROOT_KEYS = {"coco": "coco", "imagenet100": "imagenet", "imagenet": "imagenet", "voc": "voc", "folder": "folder"}
_EXPECTED = {
    "coco": "the folder that directly contains train2017/",
    "imagenet": "the ImageNet folder that contains train/<wnid>/",
    "voc": "the folder that contains VOCSegmentation/",
    "folder": "a folder of images",
}


def _build_one(
    part: str, roots: Mapping[str, PathLike | None], transform: Callable | None, synthetic: Mapping | None
) -> Dataset:
    if part == "synthetic":
        return SyntheticTrain(transform, **dict(synthetic or {}))
    key = _ROOT_KEYS[part]
    root = roots.get(key)
    if root is None or os.fspath(root) == "":
        raise DatasetNotFound(f"paths.{key} is not set: set it to {_EXPECTED[key]} (dataset {part!r})")
    readers = {"coco": coco_train, "imagenet100": imagenet100_train, "imagenet": imagenet_train,
               "voc": voc_trainaug, "folder": folder_train}
    dataset = readers[part](root, transform, key=key)
    dataset.source = f"paths.{key}={printable(root)}"
    return dataset
