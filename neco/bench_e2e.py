"""The loader and end-to-end parts of `python -m neco.bench`, on one folder of real-size JPEGs.

The loader part times the training DataLoader alone (JPEG decode, MultiCrop, collate; model off). The end-to-end
part times `Trainer.fit` itself, fed by that DataLoader: what a training run of `python -m neco.train
data=folder paths.folder=<dir>` gets, from waiting for a batch to the optimizer step. Both build the loader with
`neco.engine.setup.build_loader`, as training does, so the two rows and the step-only row share data and settings.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from neco.bench_sort import failure, fresh_memory, sync
from neco.data.datasets import list_images
from neco.data.workers import batches_of
from neco.engine.setup import build_loader
from neco.errors import UserError

JPEG_SIZE = (640, 480)  # width, height: COCO's typical image
QUICK_JPEG_SIZE = (160, 120)
JPEG_QUALITY = 90
# Distinct images written; the rest of the folder are hard links to them. Decoding and cropping cost the same
# for every file name, and writing thousands of distinct JPEGs would take minutes.
DISTINCT_JPEGS = 64
PREFIX = "neco_bench_"
# Minimum ratios at 518/98 with 8 workers: end to end against the step alone, the loader alone against the step.
E2E_TARGETS = {518: {"e2e_over_step": 0.9, "loader_over_step": 1.5}}


# ------------------------------------------------------------------------------------------- JPEG folder
def texture(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Random colour noise summed over four scales, coarse to fine: at 640x480 and quality 90 a file of about
    100 KiB, the size of a photograph's (uniform noise would make files, and their decoding, several times
    larger)."""
    image = np.full((height, width, 3), 128.0, dtype=np.float32)
    for cells, amplitude in ((8, 90.0), (32, 50.0), (160, 25.0), (640, 12.0)):
        cols = max(1, cells * width // 640)
        rows = max(1, cols * height // width)
        small = rng.integers(0, 256, (rows, cols, 3), dtype=np.uint8)
        up = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        image += amplitude * (np.asarray(up, dtype=np.float32) / 127.5 - 1.0)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def write_jpegs(folder: Path, first: int, count: int, size: tuple[int, int]) -> None:
    """Files `PREFIX{first:06d}.jpg` .. up to `count` in all, distinct up to DISTINCT_JPEGS, then hard links."""
    for i in range(first, count):
        path = folder / f"{PREFIX}{i:06d}.jpg"
        if i < DISTINCT_JPEGS:
            texture(np.random.default_rng([0, i]), *size).save(path, quality=JPEG_QUALITY)
            continue
        source = folder / f"{PREFIX}{i % DISTINCT_JPEGS:06d}.jpg"
        try:
            os.link(source, path)
        except OSError:  # a file system without hard links
            shutil.copyfile(source, path)


@contextlib.contextmanager
def jpeg_folder(folder: Path | None, count: int, size: tuple[int, int]) -> Iterator[Path]:
    """A folder with at least `count` JPEGs: a temporary one, or `folder`, filled once and reused.

    A folder that already holds other images (a user's photographs) is used as it is when it has enough; the
    benchmark adds its own files only to a folder where every image is its own."""
    if folder is None:
        with tempfile.TemporaryDirectory(prefix=PREFIX) as tmp:
            write_jpegs(Path(tmp), 0, count, size)
            yield Path(tmp)
        return
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--jpeg-dir {folder}: not a folder; name a folder (it is created if missing)")
    folder.mkdir(parents=True, exist_ok=True)
    images = list_images(folder, recursive=True)
    if len(images) < count:
        ours = [p for p in images if re.fullmatch(rf"{PREFIX}\d+\.jpg", Path(p).name)]
        if len(ours) < len(images):
            raise UserError(f"--jpeg-dir {folder}: it holds {len(images)} images and the measures need {count} "
                            "(batch x batches); name a folder with more images, or an empty one to fill")
        write_jpegs(folder, len(ours), count, size)
    yield folder


def folder_summary(folder: Path) -> dict:
    """Pixel size of the first image and the mean file size, for the records."""
    files = list_images(folder, recursive=True)
    with Image.open(files[0]) as first:
        source = list(first.size)
    kib = sum(os.path.getsize(f) for f in files) / len(files) / 1024
    return {"files": len(files), "source_image": source, "jpeg_kib": round(kib, 1)}


def folder_config(cfg, folder: Path, workers: int):
    """`cfg` as `neco.train data=folder paths.folder=<folder> data.num_workers=<workers>` composes it."""
    cfg = copy.deepcopy(cfg)
    cfg.data.name, cfg.paths.folder, cfg.data.num_workers = "folder", str(folder), workers
    return cfg


# ------------------------------------------------------------------------------------------------ loader
def measure_loader(cfg, folder: Path, workers: int, batches: int) -> dict:
    """Images/s of the training DataLoader alone over `batches` batches: JPEG decode, MultiCrop, collate."""
    cfg = folder_config(cfg, folder, workers)
    _, _, loader = build_loader(cfg.data, cfg.paths, cfg.seed)
    batch = cfg.data.batch_size
    start = time.perf_counter()
    arrivals = []
    with batches_of(loader) as stream:
        for _ in stream:
            arrivals.append(time.perf_counter())
            if len(arrivals) == batches:
                break
    total = arrivals[-1] - start
    # The first wave (one batch per worker) includes worker start-up; the steady rate is measured after it.
    first = max(loader.num_workers, 1) - 1
    steady = None
    if first + 1 < len(arrivals):
        steady = (len(arrivals) - 1 - first) * batch / (arrivals[-1] - arrivals[first])
    return {"kind": "loader", "workers": loader.num_workers, "workers_requested": workers, "batch": batch,
            "batches": len(arrivals), "global_size": cfg.data.global_size, "local_size": cfg.data.local_size,
            "images_per_s": steady, "images_per_s_with_startup": len(arrivals) * batch / total}


# ---------------------------------------------------------------------------------------------- end to end
class TimedLoader:
    """The DataLoader as `Trainer.fit` sees it, counting the images it hands over and the time the training
    loop waits for them."""

    def __init__(self, loader):
        self.loader, self.dataset = loader, loader.dataset
        self.images, self.wait_s = 0, 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return TimedBatches(self, iter(self.loader))


class TimedBatches:
    def __init__(self, owner: TimedLoader, batches):
        self.owner, self.batches = owner, batches

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        crops, boxes = next(self.batches)
        self.owner.wait_s += time.perf_counter() - start
        self.owner.images += len(crops[0])
        return crops, boxes

    def _shutdown_workers(self) -> None:  # what `batches_of` calls when the training loop ends
        shutdown = getattr(self.batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class StepClock:
    """The trainer's metrics logger, here: notes time, images and waiting when the marked steps complete.

    The device is synchronised at the marks only, so the queued optimizer step is inside the interval."""

    def __init__(self, marks: set[int], loader: TimedLoader, device: torch.device):
        self.marks, self.loader, self.device = marks, loader, device
        self.at: dict[int, tuple[float, int, float]] = {}
        self.loss = None

    def log(self, record: dict) -> None:
        self.loss = record["loss"]
        if record["step"] in self.marks:
            sync(self.device)
            self.at[record["step"]] = (time.perf_counter(), self.loader.images, self.loader.wait_s)

    def close(self) -> None:
        pass


def measure_e2e(cfg, device, amp_dtype, folder: Path, workers: int, warmup: int, steps: int,
                build_trainer: Callable) -> dict:
    """Training images/s of `Trainer.fit` on the JPEG folder: `warmup` steps, then `steps` timed ones."""
    cfg = folder_config(cfg, folder, workers)
    warmup = max(warmup, 1)  # the clock starts when a step completes
    cfg.max_steps, cfg.optim.accumulate, cfg.logger.log_every, cfg.logger.progress = warmup + steps, 1, 1, False
    record = {"kind": "e2e", "objective": "neco", "sorter": cfg.loss.sorter, "backbone": cfg.backbone.name,
              "global_size": cfg.data.global_size, "local_size": cfg.data.local_size,
              "batch": cfg.data.batch_size, "workers_requested": workers, "compile": cfg.compile,
              "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
              "warmup": warmup, "steps": steps}
    fresh_memory(device)
    trainer = None
    try:
        _, sampler, loader = build_loader(cfg.data, cfg.paths, cfg.seed)
        record["workers"] = loader.num_workers
        timed = TimedLoader(loader)
        half = warmup + steps // 2
        clock = StepClock({warmup, half, warmup + steps}, timed, device)
        trainer = build_trainer(cfg, device, amp_dtype, "neco", warmup + steps + 1)
        trainer.loader, trainer.sampler, trainer.logger = timed, sampler, clock
        trainer.save = lambda: None  # a benchmark writes no checkpoints
        trainer.fit()
        (t0, n0, w0), (t1, n1, w1) = clock.at[warmup], clock.at[warmup + steps]
        record.update(images=n1 - n0, seconds=t1 - t0, images_per_s=(n1 - n0) / (t1 - t0),
                      loader_wait_s=w1 - w0, loader_wait_fraction=(w1 - w0) / (t1 - t0), loss=clock.loss)
        if half > warmup:
            # Batches the workers prefetched during the warm-up make the first timed steps look fast when the
            # loader is the slower side; the second half shows the steady rate once they are used up.
            th, nh, _ = clock.at[half]
            record["images_per_s_second_half"] = (n1 - nh) / (t1 - th)
    except Exception as err:  # one failed configuration must not cost the others their measurements
        record["error"] = failure(err)
    trainer = None  # noqa: F841  (release the models before the next configuration)
    fresh_memory(device)
    return record


def compare(e2e: dict, records: list[dict]) -> dict:
    """The e2e record with the step-only and loader-alone rates of the same run and settings beside it."""
    if "images_per_s" not in e2e:
        return e2e
    same = ("backbone", "global_size", "local_size", "batch", "compile", "sorter")
    step = next((r for r in records if r["kind"] == "step" and r["objective"] == "neco" and "error" not in r
                 and all(r[k] == e2e[k] for k in same)), None)
    loader = next((r for r in records if r["kind"] == "loader" and r.get("images_per_s")
                   and all(r[k] == e2e[k] for k in ("global_size", "local_size", "batch", "workers"))), None)
    out = dict(e2e)
    if step:
        out["step_only_images_per_s"] = step["images_per_s"]
        out["e2e_over_step"] = e2e["images_per_s"] / step["images_per_s"]
    if loader:
        out["loader_images_per_s"] = loader["images_per_s"]
        if step:
            out["loader_over_step"] = loader["images_per_s"] / step["images_per_s"]
    target = E2E_TARGETS.get(e2e["global_size"])
    if target:
        out["targets"] = target
        out["checks"] = {k: None if k not in out else out[k] >= v for k, v in target.items()}
    return out


def table_line(r: dict) -> str:
    """One line of the bench table for an e2e record."""
    head = f"  e2e  {r['global_size']:>4}/{r['local_size']} neco/{r['sorter']} workers={r.get('workers', '?')}"
    if "error" in r:
        return f"{head}: {r['error']}"
    verdict = {True: "met", False: "NOT met", None: "-"}
    checks, targets = r.get("checks", {}), r.get("targets", {})

    def goal(key: str) -> str:
        return f", target >= {targets[key]} {verdict[checks.get(key)]}" if key in targets else ""

    text = f"{head}: {r['images_per_s']:8.1f} img/s"
    if "images_per_s_second_half" in r:
        text += f" ({r['images_per_s_second_half']:.1f} second half)"
    text += f", waiting for data {100 * r['loader_wait_fraction']:.0f}% of the time"
    if "e2e_over_step" in r:
        text += (f"; step only {r['step_only_images_per_s']:.1f} img/s: e2e/step x{r['e2e_over_step']:.2f}, "
                 f"{100 * (r['e2e_over_step'] - 1):+.0f}%{goal('e2e_over_step')}")
    if "loader_over_step" in r:
        text += f"; loader alone x{r['loader_over_step']:.2f} of the step{goal('loader_over_step')}"
    return text
