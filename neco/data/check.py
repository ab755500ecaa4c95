"""`python -m neco.data.check data=...`: verify a dataset on disk before spending GPU hours on it.

    python -m neco.data.check data=voc paths.voc=/data/voc
    python -m neco.data.check data=coco_stuff check.samples=-1     # decode every mask, not a sample

For each split it counts images and masks against the complete dataset (e.g. VOC trainaug 10,582, val 1,449;
COCO train2017 118,287), decodes a sample of image/mask pairs (label ids in range, sizes, unreadable files)
and, for COCO, compares your annotation file's categories with the built-in super-class tables. It prints a
report and exits with status 1 when anything is wrong (a partial copy counts as wrong: the numbers would not
be comparable with published ones).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import neco.help_texts  # noqa: F401  (the resolvers of `--help`)
from neco.project import conf_dir

from .labels import COCO_STUFF_CATEGORIES, COCO_THING_CATEGORIES

TRAIN_COUNTS = {"coco": 118287, "imagenet100": 126689, "imagenet": 1281167, "voc": 10582}
_TRAIN_KEYS = {"coco": "coco", "imagenet100": "imagenet", "imagenet": "imagenet", "voc": "voc", "folder": "folder"}
_SHOW = 5  # examples listed per kind of problem


@dataclass
class SplitReport:
    split: str
    images: int = 0
    masks: int | None = None  # None: a training set without masks
    expected: int | None = None
    checked: int = 0
    problems: list[str] = field(default_factory=list)


def _sample(n: int, samples: int) -> list[int]:
    """Every index (samples < 0 or >= n) or ``samples`` evenly spread ones: the same files on every run."""
    if samples < 0 or samples >= n:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, samples)})


def _examples(kind: str, items: list[str]) -> list[str]:
    if not items:
        return []
    shown = "; ".join(items[:_SHOW]) + ("; ..." if len(items) > _SHOW else "")
    return [f"{len(items)} {kind}: {shown}"]


def _count_problem(report: SplitReport) -> None:
    if report.expected is not None and report.images != report.expected:
        report.problems.append(f"{report.images} images, the complete split has {report.expected}")


def check_eval_split(name: str, split: str, roots, samples: int, progress: bool) -> SplitReport:
    # The readers import torch: imported where used, so that `--help` answers at once.
    from .datasets import DatasetNotFound, ImageReadError
    from .eval_datasets import KNOWN_COUNTS, MaskError, SegmentationDataset, scan_eval_split

    report = SplitReport(split, expected=KNOWN_COUNTS[name].get(split))
    try:
        scan = scan_eval_split(name, split, roots)
    except DatasetNotFound as err:
        report.problems.append(str(err))
        return report
    report.split = scan.split
    report.expected = KNOWN_COUNTS[name].get(scan.split)
    report.images = sum(p is not None for p in scan.images)
    report.masks = sum(p is not None for p in scan.masks)
    _count_problem(report)
    report.problems += _examples("listed images are missing", [i for i, p in zip(scan.ids, scan.images) if p is None])
    report.problems += _examples(f"images have no mask in {scan.mask_dir}",
                                 [i for i, im, m in zip(scan.ids, scan.images, scan.masks) if im and m is None])
    items = [(i, im, m) for i, im, m in zip(scan.ids, scan.images, scan.masks) if im and m]
    data = SegmentationDataset(name, scan.split, items, scan.lut, scan.class_names, scan.ignore_index)
    unreadable, bad_masks = [], []
    for i in tqdm(_sample(len(data), samples), desc=f"{name} {scan.split}", disable=not progress):
        try:
            data.read(i)
        except ImageReadError as err:
            unreadable.append(str(err))
        except MaskError as err:
            bad_masks.append(str(err))
        report.checked += 1
    report.problems += _examples("unreadable files", unreadable) + _examples("bad masks", bad_masks)
    return report


def check_train_part(part: str, roots, samples: int, progress: bool) -> SplitReport:
    from .datasets import DatasetNotFound, ImageReadError, build_train_dataset, load_rgb

    report = SplitReport(f"{part} (train)", expected=TRAIN_COUNTS.get(part))
    try:
        data = build_train_dataset(part, roots, on_bad_image="raise")
    except DatasetNotFound as err:
        report.problems.append(str(err))
        return report
    report.images = len(data)
    _count_problem(report)
    files = getattr(data, "files", None)
    if files is None:  # synthetic scenes: nothing on disk
        return report
    unreadable = []
    for i in tqdm(_sample(len(files), samples), desc=part, disable=not progress):
        try:
            load_rgb(files[i])
        except ImageReadError as err:
            unreadable.append(str(err))
        report.checked += 1
    report.problems += _examples("unreadable files", unreadable)
    return report


def check_coco_categories(name: str, root: str) -> list[str]:
    """Your annotation file's categories against the built-in tables (the reference reads them from it)."""
    if name == "coco_stuff":
        candidates, builtin = ("annotations/stuff_annotations/stuff_val2017.json", "annotations/stuff_val2017.json",
                               "annotations/annotations/stuff_annotations/stuff_val2017.json"), COCO_STUFF_CATEGORIES
    else:
        candidates, builtin = ("annotations/panoptic_annotations/panoptic_val2017.json",
                               "annotations/panoptic_val2017.json"), COCO_THING_CATEGORIES
    path = next((os.path.join(root, c) for c in candidates if os.path.isfile(os.path.join(root, c))), None)
    if path is None:
        return []  # optional: the masks are all the loader needs
    with open(path) as f:
        categories = json.load(f).get("categories", [])
    theirs = {(c["id"], c["supercategory"]) for c in categories if c.get("isthing", 1) == 1}
    ours = {(c["id"], c["supercategory"]) for c in builtin}
    if theirs != ours:
        diff = sorted(theirs ^ ours)[:_SHOW]
        return [f"{path}: categories differ from the built-in {name} table (id, supercategory): {diff}"]
    return []


def run_check(cfg: DictConfig) -> int:
    """Print the report of ``cfg.data.name``; return the exit status (0 = everything as expected)."""
    from .datasets import TRAIN_DATASETS
    from .eval_datasets import ROOT_KEYS

    name = str(cfg.data.name)
    roots = OmegaConf.to_container(cfg.paths, resolve=True)
    samples, progress = int(cfg.check.samples), bool(cfg.check.progress)
    extra = []
    if name in ROOT_KEYS:
        keys = [ROOT_KEYS[name]]
        splits = cfg.check.splits or (["trainaug", "train_1464", "val"] if name == "voc" else ["train", "val"])
        reports = [check_eval_split(name, s, roots, samples, progress) for s in splits]
        if name.startswith("coco_") and roots.get(keys[0]):
            extra = check_coco_categories(name, os.path.expanduser(str(roots[keys[0]])))
    else:
        parts = [p.strip() for p in name.replace(",", "+").split("+") if p.strip()]
        unknown = [p for p in parts if p not in TRAIN_DATASETS and p != "imagenet100k"]
        if unknown or not parts:
            print(f"error: data.name={name!r}: choose one of {', '.join(sorted(ROOT_KEYS))} or a training "
                  f"dataset ({', '.join(TRAIN_DATASETS)})", file=sys.stderr)
            return 2
        keys = sorted({_TRAIN_KEYS[p] for p in parts if p in _TRAIN_KEYS})
        reports = [check_train_part(p, roots, samples, progress) for p in parts]
    where = ", ".join(f"paths.{k}={roots.get(k)}" for k in keys)
    print(f"\nneco.data.check: data={name}" + (f" ({where})" if where else ""))
    print(f"  {'split':<22}{'images':>10}{'masks':>10}{'expected':>10}{'decoded':>10}")
    for r in reports:
        cells = [r.images, "-" if r.masks is None else r.masks, r.expected or "-", r.checked]
        print(f"  {r.split:<22}" + "".join(f"{c:>10}" for c in cells))
    problems = [f"{r.split}: {p}" for r in reports for p in r.problems] + extra
    for p in problems:
        print(f"  PROBLEM {p}")
    print(f"result: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


@hydra.main(config_path=str(conf_dir()), config_name="check", version_base="1.3")
def main(cfg: DictConfig) -> None:
    sys.exit(run_check(cfg))


if __name__ == "__main__":
    main()
