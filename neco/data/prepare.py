"""`python -m neco.data.prepare dataset=...`: build the masks the reference expected users to build by hand.

    python -m neco.data.prepare dataset=voc_aug paths.voc=/data/voc sbd=/data/benchmark_RELEASE
        VOC trainaug: SegmentationClassAug/<id>.png (VOC's own mask where it exists, else SBD's cls/<id>.mat)
        and sets/trainaug.txt = (SBD train + SBD val + VOC train) - VOC val = 10,582 ids with the full data.
    python -m neco.data.prepare dataset=coco_stuff paths.coco_eval=/data/coco
        COCO-Stuff pixelmaps (ids 0 and 92-183) next to stuff_{train,val}2017.json.
    python -m neco.data.prepare dataset=coco_things paths.coco_eval=/data/coco
        semantic masks with panoptic category ids (0 = unlabelled) in annotations/{train,val}2017/, from
        panoptic_{train,val}2017.json and its PNGs (what panopticapi's panoptic2semantic_segmentation writes).

Existing outputs are kept unless overwrite=true. Stuff annotations are run-length encoded: decoded here,
checking that the runs cover the image, without pycocotools. Polygon segmentations (absent from the stuff files)
need pycocotools, the optional dependency `pip install 'neco[prepare]'`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from multiprocessing import Pool

import hydra
import numpy as np
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

import neco.help_texts  # noqa: F401  (the resolvers of `--help`)
from neco.project import conf_dir

# The readers (.datasets) import torch: they are imported where used, so that `--help` answers at once.


def voc_palette() -> list[int]:
    """The Pascal VOC colour map (bit-interleaved index), so written masks look like VOC's own."""
    palette = []
    for i in range(256):
        rgb = [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((i >> (3 * bit + channel)) & 1) << (7 - bit)
        palette += rgb
    return palette


def _find(base: str, candidates: Iterable[str], test: Callable[[str], bool] = os.path.isfile) -> str | None:
    return next((os.path.join(base, c) for c in candidates if test(os.path.join(base, c))), None)


def _save_mask(mask: np.ndarray, path: str, palette: list[int] | None = None) -> None:
    image = Image.fromarray(mask.astype(np.uint8), mode="L")
    if palette is not None:
        image = image.convert("P")
        image.putpalette(palette)
    tmp = f"{path}.tmp.png"
    image.save(tmp)
    os.replace(tmp, path)  # an interrupted run never leaves half a PNG under the final name


# Pascal VOC + SBD -------------------------------------------------------------------------------------------


def _sbd_folder(sbd: str) -> str:
    from .datasets import DatasetNotFound

    for folder in (sbd, os.path.join(sbd, "dataset"), os.path.join(sbd, "benchmark_RELEASE", "dataset")):
        if os.path.isdir(os.path.join(folder, "cls")) and all(
                os.path.isfile(os.path.join(folder, f"{s}.txt")) for s in ("train", "val")):
            return folder
    raise DatasetNotFound(f"sbd={sbd}: expected the SBD folder benchmark_RELEASE (or its dataset/ folder) with "
                          "cls/<id>.mat, img/<id>.jpg, train.txt and val.txt, but none was found")


def _sbd_mask(path: str) -> np.ndarray:
    from scipy.io import loadmat

    seg = loadmat(path, squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation
    return np.asarray(seg, dtype=np.uint8)


def prepare_voc_aug(voc_root: str, sbd: str | None, overwrite: bool = False, progress: bool = True) -> dict:
    """Write ``SegmentationClassAug/`` and ``sets/trainaug.txt`` into the VOC folder of ``voc_root``."""
    from .datasets import DatasetNotFound, find_voc, read_ids

    if not sbd:
        raise DatasetNotFound("sbd is not set: sbd=/path/to/benchmark_RELEASE (the SBD download) is needed "
                              "to build VOC trainaug")
    voc = find_voc(voc_root)
    sbd = _sbd_folder(os.path.expanduser(sbd))
    voc_ids = {s: read_ids(os.path.join(voc.sets, f"{s}.txt"), "voc", voc_root, f"the VOC {s} ids") for s in
               ("train", "val")}
    sbd_ids = []
    for s in ("train", "val"):
        with open(os.path.join(sbd, f"{s}.txt")) as f:  # _sbd_folder checked train.txt; val.txt is SBD's too
            sbd_ids += [line.strip() for line in f if line.strip()]
    trainaug = sorted((set(sbd_ids) | set(voc_ids["train"])) - set(voc_ids["val"]))
    out_dir = os.path.join(voc.folder, "SegmentationClassAug")
    os.makedirs(out_dir, exist_ok=True)
    own = os.path.join(voc.folder, "SegmentationClass")
    counts = {"from_voc": 0, "from_sbd": 0, "kept": 0, "images_copied": 0}
    palette = voc_palette()
    for i in tqdm(trainaug, desc="VOC trainaug masks", disable=not progress):
        image = os.path.join(voc.images, f"{i}.jpg")
        if not os.path.isfile(image):
            source = os.path.join(sbd, "img", f"{i}.jpg")
            if not os.path.isfile(source):
                raise DatasetNotFound(f"paths.voc={voc_root}: image {i} is in neither {voc.images} nor {sbd}/img")
            shutil.copyfile(source, image)
            counts["images_copied"] += 1
        target = os.path.join(out_dir, f"{i}.png")
        if os.path.isfile(target) and not overwrite:
            counts["kept"] += 1
        elif os.path.isfile(os.path.join(own, f"{i}.png")):  # VOC's own mask, with its 255 boundaries
            shutil.copyfile(os.path.join(own, f"{i}.png"), target)
            counts["from_voc"] += 1
        else:
            mat = os.path.join(sbd, "cls", f"{i}.mat")
            if not os.path.isfile(mat):
                raise DatasetNotFound(f"sbd={sbd}: {i} is listed in SBD's train/val but {mat} does not exist")
            _save_mask(_sbd_mask(mat), target, palette)
            counts["from_sbd"] += 1
    split_file = os.path.join(voc.sets, "trainaug.txt")
    if overwrite or not os.path.isfile(split_file):
        with open(split_file, "w") as f:
            f.write("\n".join(trainaug) + "\n")
    return {"trainaug": len(trainaug), "expected": 10582, "split_file": split_file, "mask_dir": out_dir, **counts}


# COCO ------------------------------------------------------------------------------------------------------


def rle_counts(counts: str | bytes) -> list[int]:
    """Run lengths of COCO's compressed RLE string (pycocotools' rleFrString): 5 bits per character, a
    continuation bit, a sign bit on the last character, and deltas from the run two places back."""
    s = counts.decode() if isinstance(counts, bytes) else counts
    runs: list[int] = []
    p = 0
    while p < len(s):
        x = k = 0
        more = True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """Boolean ``(height, width)`` mask of a COCO ``segmentation`` (compressed or plain RLE, or polygons).

    RLE is decoded here rather than by pycocotools' ``mask.decode``, which gives the same masks but does not check
    that the runs cover the image: for runs that stop short, pycocotools 2.0.11 returns the rest of the mask
    uninitialised, where this decoder raises."""
    if isinstance(segmentation, dict):
        runs = segmentation["counts"]
        runs = rle_counts(runs) if isinstance(runs, (str, bytes)) else list(runs)
        height, width = segmentation.get("size", (height, width))
        flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)  # runs alternate 0, 1, 0, ... column-major
        if flat.size != height * width:
            raise ValueError(f"RLE covers {flat.size} pixels, the image has {height}x{width}")
        return flat.reshape(width, height).T
    coco_mask = polygon_decoder("polygon segmentations")  # the stuff and panoptic files have none
    return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))).astype(bool)


def polygon_decoder(what: str):
    """pycocotools' ``mask`` module, which decodes polygons; a ValueError naming the extra when it is missing."""
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        raise ValueError(f"{what} need pycocotools, which is not installed: pip install 'neco[prepare]'") from None
    return coco_mask


def _stuff_job(job) -> None:
    path, height, width, anns = job
    mask = np.zeros((height, width), np.uint8)  # 0 = unlabelled
    for ann in anns:
        mask[decode_segmentation(ann["segmentation"], height, width)] = ann["category_id"]
    _save_mask(mask, path)


def _things_job(job) -> None:
    png, path, segments = job
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.uint32)
    segment_ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]  # panopticapi's rgb2id
    category = {s["id"]: s["category_id"] for s in segments}
    unique, inverse = np.unique(segment_ids, return_inverse=True)
    lookup = np.array([category.get(int(u), 0) for u in unique], dtype=np.uint8)  # unlabelled (id 0) -> 0
    _save_mask(lookup[inverse.reshape(segment_ids.shape)], path)


def _run(jobs: Sequence, fn: Callable, workers: int, desc: str, progress: bool) -> None:
    if workers <= 1:
        for job in tqdm(jobs, desc=desc, disable=not progress):
            fn(job)
        return
    with Pool(workers) as pool:
        for _ in tqdm(pool.imap_unordered(fn, jobs, chunksize=16), total=len(jobs), desc=desc,
                      disable=not progress):
            pass


def _load_json(root: str, candidates: Sequence[str], what: str) -> tuple[str, dict]:
    from .datasets import DatasetNotFound

    path = _find(root, candidates)
    if path is None:
        tried = " or ".join(os.path.join(root, c) for c in candidates)
        raise DatasetNotFound(f"paths.coco_eval={root}: expected {tried} ({what}), but it does not exist")
    with open(path) as f:
        return path, json.load(f)


def prepare_coco_stuff(root: str, splits: Sequence[str], overwrite: bool = False, workers: int = 1,
                       progress: bool = True) -> dict:
    """COCO-Stuff pixelmaps from ``stuff_<split>2017.json``, written next to it."""
    summary = {}
    for split in splits:
        s = f"{split}2017"
        path, data = _load_json(root, [f"annotations/stuff_annotations/stuff_{s}.json", f"annotations/stuff_{s}.json",
                                       f"annotations/annotations/stuff_annotations/stuff_{s}.json"],
                                "the COCO-Stuff annotations")
        if any(not isinstance(ann["segmentation"], dict) for ann in data["annotations"]):
            polygon_decoder(f"the polygon segmentations of {path}")  # fails before any mask is written
        out_dir = os.path.join(os.path.dirname(path), f"stuff_{s}_pixelmaps")
        os.makedirs(out_dir, exist_ok=True)
        by_image = defaultdict(list)
        for ann in data["annotations"]:
            by_image[ann["image_id"]].append(ann)
        jobs = [(os.path.join(out_dir, os.path.splitext(im["file_name"])[0] + ".png"), im["height"], im["width"],
                 by_image[im["id"]]) for im in data["images"]]
        todo = [j for j in jobs if overwrite or not os.path.isfile(j[0])]
        _run(todo, _stuff_job, workers, f"COCO-Stuff {s}", progress)
        summary[split] = {"images": len(jobs), "written": len(todo), "mask_dir": out_dir}
    return summary


def prepare_coco_things(root: str, splits: Sequence[str], overwrite: bool = False, workers: int = 1,
                        progress: bool = True) -> dict:
    """Semantic masks (panoptic category ids) in ``annotations/<split>2017/`` from the panoptic annotations."""
    from .datasets import DatasetNotFound

    summary = {}
    for split in splits:
        s = f"{split}2017"
        path, data = _load_json(root, [f"annotations/panoptic_annotations/panoptic_{s}.json",
                                       f"annotations/panoptic_{s}.json"], "the COCO panoptic annotations")
        png_dir = _find(os.path.dirname(path), [f"panoptic_{s}", f"../panoptic_{s}"], os.path.isdir)
        if png_dir is None:
            raise DatasetNotFound(f"paths.coco_eval={root}: expected {os.path.dirname(path)}/panoptic_{s}/ with the "
                                  f"panoptic PNGs (unzip panoptic_{s}.zip there), but it does not exist")
        out_dir = os.path.join(root, "annotations", s)
        os.makedirs(out_dir, exist_ok=True)
        jobs = [(os.path.join(png_dir, a["file_name"]), os.path.join(out_dir, a["file_name"]), a["segments_info"])
                for a in data["annotations"]]
        missing = [j[0] for j in jobs if not os.path.isfile(j[0])]
        if missing:
            raise DatasetNotFound(f"paths.coco_eval={root}: {len(missing)} of the {len(jobs)} panoptic PNGs listed "
                                  f"in {path} are missing, e.g. {missing[0]}")
        todo = [j for j in jobs if overwrite or not os.path.isfile(j[1])]
        _run(todo, _things_job, workers, f"COCO-Things {s}", progress)
        summary[split] = {"images": len(jobs), "written": len(todo), "mask_dir": out_dir}
    return summary


def run_prepare(cfg: DictConfig) -> dict:
    paths = cfg.paths
    if cfg.dataset == "voc_aug":
        return prepare_voc_aug(paths.voc, cfg.sbd, cfg.overwrite, cfg.progress)
    if cfg.dataset == "coco_stuff":
        return prepare_coco_stuff(paths.coco_eval, list(cfg.splits), cfg.overwrite, cfg.workers, cfg.progress)
    if cfg.dataset == "coco_things":
        return prepare_coco_things(paths.coco_eval, list(cfg.splits), cfg.overwrite, cfg.workers, cfg.progress)
    raise ValueError(f"dataset={cfg.dataset!r}: choose voc_aug, coco_stuff or coco_things")


@hydra.main(config_path=str(conf_dir()), config_name="prepare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from .datasets import DatasetNotFound

    try:
        summary = run_prepare(cfg)
    except (DatasetNotFound, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary, indent=2))
    print("next: python -m neco.data.check data=" + {"voc_aug": "voc"}.get(cfg.dataset, cfg.dataset))


if __name__ == "__main__":
    main()
