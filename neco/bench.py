"""`python -m neco.bench`: speed and memory of the NeCo step, its free-loss floor, the sorter, the loader and
training end to end.

    python -m neco.bench                            # GPU: ViT-S/14+reg4, batch 64, crops 224 and 518
    python -m neco.bench --compile --parts step     # the same steps with compiled backbones
    python -m neco.bench --quick                    # tiny CPU run (vit_tiny, batch 2, one step)
    python -m neco.bench --triton-sizes ""          # without the loss.sorter=triton steps
    python -m neco.bench loss.network=odd_even      # trailing key=value pairs override the config
    python -m neco.bench --parts step,loader,e2e --sizes 518 --workers 8   # end to end beside the step alone

Prints one JSON object per measurement (stdout, and `--out FILE`), then a table against the targets (stderr).
A step is the trainer's own: `Trainer.compute_loss` and `Trainer._optimizer_step` on random crops already on
the device, with boxes from the MultiCrop box sampler. The floor is the same step with a loss that costs
nothing: what the backbones, head, AdamW and EMA cost whatever the objective. The Triton sorter (sort and
step rows) runs on CUDA only; elsewhere a `skip` line says why. The loader and end-to-end parts read one folder
of JPEGs (neco.bench_e2e).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from neco import bench_e2e
from neco.bench_sort import SORT_TARGET_MS, failure, fresh_memory, measure_sorts, sync, triton_skip_reason
from neco.cli import exit_on_user_error
from neco.config import TrainConfig
from neco.data.multicrop import pairwise_boxes
from neco.engine.optim import build_optimizer, build_schedules, param_groups
from neco.engine.setup import build_multicrop, build_student_teacher, resolve_precision
from neco.engine.trainer import Trainer
from neco.engine.trainer_settings import TrainerSettings, run_record
from neco.loss.neco import NeCoLoss

PARTS = ("sort", "step", "loader", "e2e")
DEFAULT_PARTS = ("sort", "step", "loader")  # e2e is asked for by name: it trains for a minute per row on a GPU
# Targets for the objective's overhead over the floor, per global crop size, and for one sort (fwd + bwd, ms).
STEP_TARGETS = {224: {"time_ratio": 1.15, "memory_ratio": 1.25}, 518: {"time_ratio": 1.15, "peak_gib": 45.0}}
# ANCHORS.md, one H200: (images/s, peak GiB) of the floor (bf16, eager) and the shipped reference (bf16, fused
# attention). A yardstick only: compare ratios taken within one run on one card.
ANCHORS = {224: {"floor": (857.0, 9.8), "reference": (89.4, 20.2)},
           518: {"floor": (229.0, 38.1), "reference": (82.2, 75.4)}}
SOURCE_IMAGE = bench_e2e.JPEG_SIZE  # fake image size the crop boxes are drawn at, that of the loader's JPEGs


def environment(device: torch.device) -> dict:
    def version(module: str) -> str | None:
        try:
            return importlib.import_module(module).__version__
        except ImportError:
            return None

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu {platform.machine()}"
    return {"device": name, "torch": torch.__version__, "triton": version("triton"), "timm": version("timm")}


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# --------------------------------------------------------------------------------------------- train step
class FreeLoss(nn.Module):
    """The floor's objective: the mean of the student's head outputs. It costs nothing, yet backpropagates
    through the head and the backbone to every trainable parameter, so backward and AdamW do full work."""

    def forward(self, student_maps, teacher_maps, boxes, teacher_fg=None) -> torch.Tensor:
        return sum(m.float().mean() for m in student_maps) / len(student_maps)


def build_trainer(cfg, device: torch.device, amp_dtype, objective: str, total_steps: int) -> Trainer:
    """Student, teacher, objective, AdamW and schedules as `neco.train` builds them, in a Trainer."""
    student, teacher = build_student_teacher(cfg.backbone, cfg.loss)
    student.to(device)
    teacher.to(device)
    if cfg.compile:
        # Each configuration builds new modules: stale compile caches would count towards the recompile limit.
        torch._dynamo.reset()
        student.backbone.compile()
        teacher.backbone.compile()
    d = cfg.data
    sizes = [d.global_size] * d.num_global + [d.local_size] * d.num_local
    if objective == "floor":
        loss = FreeLoss()
    else:
        loss = NeCoLoss(cfg.loss, student.backbone.patch_size, sizes, d.num_global, d.batch_size).to(device)
    optimizer = build_optimizer(param_groups(student.backbone, student.head, cfg.optim), cfg.optim, device)
    trainer = Trainer(student=student, teacher=teacher, objective=loss, optimizer=optimizer,
                      schedules=build_schedules(cfg.optim, total_steps), loader=None, sampler=None,
                      settings=TrainerSettings.from_config(cfg), run_record=run_record(cfg),
                      run_dir=Path("."), device=device, amp_dtype=amp_dtype, logger=None,
                      steps_per_epoch=total_steps)
    student.train()
    teacher.eval()
    return trainer


def train_step(trainer: Trainer, crops: list[torch.Tensor], boxes: dict) -> float:
    """One optimizer step exactly as `Trainer.fit` runs it (accumulate=1), minus logging and checkpoints."""
    trainer.schedules.apply(trainer.optimizer, trainer.state.step)
    loss = trainer.compute_loss(crops, boxes)
    value = float(loss.detach())  # host-device sync, as in Trainer.fit: its NaN check reads every loss
    if not math.isfinite(value):
        raise FloatingPointError(f"the loss became {value}")
    trainer.scaler.scale(loss).backward()
    trainer._optimizer_step()
    return value


def random_batch(data_cfg, device: torch.device, seed: int = 0) -> tuple[list[torch.Tensor], dict]:
    """Random crops on the device and valid pairwise boxes drawn by the MultiCrop sampler on a fake image."""
    torch.manual_seed(seed)
    multicrop = build_multicrop(data_cfg)
    per_image = [pairwise_boxes(multicrop.sample_boxes(*SOURCE_IMAGE), multicrop.sizes, data_cfg.num_global)
                 for _ in range(data_cfg.batch_size)]
    boxes = {k: torch.stack([b[k] for b in per_image]).to(device) for k in ("gc", "all")}
    crops = [torch.randn(data_cfg.batch_size, 3, s, s, device=device) for s in multicrop.sizes]
    return crops, boxes


def measure_step(cfg, device, amp_dtype, objective: str, warmup: int, steps: int) -> dict:
    sorter = cfg.loss.sorter if objective == "neco" else None
    record = {"kind": "step", "objective": objective, "sorter": sorter,
              "backbone": cfg.backbone.name, "global_size": cfg.data.global_size,
              "local_size": cfg.data.local_size, "batch": cfg.data.batch_size, "compile": cfg.compile,
              "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
              "warmup": warmup, "steps": steps}
    fresh_memory(device)
    try:
        trainer = build_trainer(cfg, device, amp_dtype, objective, warmup + steps + 1)
        crops, boxes = random_batch(cfg.data, device)
        for _ in range(warmup):
            train_step(trainer, crops, boxes)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(steps):
            record["loss"] = train_step(trainer, crops, boxes)
        sync(device)
        elapsed = time.perf_counter() - start
        record.update(step_ms=1000 * elapsed / steps, images_per_s=steps * cfg.data.batch_size / elapsed,
                      peak_gib=peak_gib(device))
    except Exception as err:  # one failed configuration must not cost the others their measurements
        record["error"] = failure(err)
    trainer = crops = boxes = None  # noqa: F841  (release the models before the next configuration)
    fresh_memory(device)
    return record


def step_ratio(neco: dict, floor: dict) -> dict | None:
    """NeCo over floor for step time and peak memory, against the targets of that crop size."""
    if "step_ms" not in neco or "step_ms" not in floor:
        return None
    size = neco["global_size"]
    out = {"kind": "ratio", "global_size": size, "sorter": neco["sorter"], "compile": neco["compile"],
           "time_ratio": neco["step_ms"] / floor["step_ms"], "peak_gib": neco["peak_gib"]}
    if neco["peak_gib"] is not None:
        out["memory_ratio"] = neco["peak_gib"] / floor["peak_gib"]
    target = STEP_TARGETS.get(size)
    if target:
        out["targets"] = target
        # One verdict per target (None without a figure: no memory figures on a CPU), then all of them.
        out["checks"] = {k: None if out.get(k) is None else out[k] <= v for k, v in target.items()}
        out["met"] = None if None in out["checks"].values() else all(out["checks"].values())
    return out


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m neco.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU run: vit_tiny, batch 2, 1 step")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--backbone", default="dinov2_vits14_reg")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sizes", default="224,518", help="global crop sizes, comma-separated")
    p.add_argument("--local-size", type=int, default=98)
    p.add_argument("--dense-sizes", default="224", help="global sizes that also run loss.sorter=dense")
    p.add_argument("--triton-sizes", default="224,518", help="global sizes that also run loss.sorter=triton")
    p.add_argument("--precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32")
    p.add_argument("--compile", action="store_true", help="nn.Module.compile on both backbones")
    p.add_argument("--compile-sort", action="store_true", help="also time torch.compile'd sparse sorts")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sort-rows", type=int, default=3136)
    p.add_argument("--sort-warmup", type=int, default=3)
    p.add_argument("--sort-reps", type=int, default=20)
    p.add_argument("--workers", help="loader processes, comma-separated, one loader and e2e row each (8; --quick: 2)")
    p.add_argument("--loader-rounds", type=int, default=4, help="batches per worker in the loader measure")
    p.add_argument("--e2e-steps", type=int,
                   help="timed end-to-end steps after --warmup (64; --quick: 2); many more than the 2 x workers "
                        "batches the loader prefetches, or the prefetched ones hide a slow loader")
    p.add_argument("--jpeg-dir", type=Path,
                   help="folder of JPEGs for the loader and e2e parts: filled once if empty, reused after "
                        "(default: a temporary folder)")
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS), help=f"subset of {','.join(PARTS)}")
    p.add_argument("--out", type=Path, help="also write the JSON lines to this file")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. loss.network=odd_even")
    args = p.parse_args(argv)
    if args.quick:
        args.device, args.backbone, args.batch, args.sizes, args.local_size = "cpu", "vit_tiny", 2, "64", 32
        args.dense_sizes, args.triton_sizes, args.warmup, args.steps, args.sort_rows = "64", "64", 0, 1, 16
        args.sort_warmup, args.sort_reps, args.loader_rounds = 0, 1, 1
    # Given explicitly, these two hold under --quick too (the e2e part with or without worker processes).
    args.workers = args.workers or ("2" if args.quick else "8")
    args.e2e_steps = (2 if args.quick else 64) if args.e2e_steps is None else args.e2e_steps
    if args.e2e_steps < 1:
        p.error(f"--e2e-steps {args.e2e_steps}: time at least 1 step")
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose among {','.join(PARTS)}")
    try:
        args.workers = [int(w) for w in str(args.workers).split(",")]
    except ValueError:
        p.error(f"--workers {args.workers}: give numbers of loader processes, comma-separated (e.g. 0,2)")
    return args


def base_config(args):
    cfg = OmegaConf.structured(TrainConfig)  # the published ViT-S/14 recipe's loss and optimizer settings
    cfg.backbone.name, cfg.backbone.weights = args.backbone, "random"
    cfg.data.batch_size, cfg.data.local_size, cfg.compile = args.batch, args.local_size, args.compile
    cfg.loss.sorter = "sparse"  # the NeCo row's sorter; the triton rows are added where the kernels run
    cfg.merge_with(OmegaConf.from_dotlist(args.overrides))
    return cfg


def print_table(records: list[dict], file=sys.stderr) -> None:
    env = records[0]
    print(f"\nneco.bench on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
          f"timm {env['timm']})", file=file)
    for r in records:
        if r["kind"] == "step":
            what = r["objective"] + (f"/{r['sorter']}" if r["sorter"] else "")
            what += " compiled" if r["compile"] else ""
            kind = "floor" if r["objective"] == "floor" else "reference"
            anchor = None if r["compile"] else ANCHORS.get(r["global_size"], {}).get(kind)
            ref = f"   anchor {anchor[0]:.0f} img/s, {anchor[1]:.1f} GiB" if anchor else ""
            if "error" in r:
                print(f"  step {r['global_size']:>4} {what:<22} {r['error']}", file=file)
            else:
                mem = f"{r['peak_gib']:6.1f} GiB" if r["peak_gib"] is not None else "     - GiB"
                print(f"  step {r['global_size']:>4} {what:<22} {r['images_per_s']:8.1f} img/s {mem}{ref}",
                      file=file)
        elif r["kind"] == "ratio":
            verdict = {True: "met", False: "NOT met", None: "-"}
            checks = r.get("checks", {})
            goal = ", ".join(f"{k} <= {v} {verdict[checks.get(k)]}" for k, v in r.get("targets", {}).items())
            mem = f"memory x{r['memory_ratio']:.2f}" if "memory_ratio" in r else "memory -"
            peak = f", peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else ""
            sorter = f" {r['sorter']}" if r.get("sorter") else ""
            print(f"  NeCo/floor {r['global_size']:>4}{sorter}: time x{r['time_ratio']:.2f}, {mem}{peak}"
                  f"   targets: {goal or '-'}", file=file)
        elif r["kind"] == "sort" and "error" not in r:
            peak = f"{r['peak_mib']:7.0f} MiB" if r["peak_mib"] is not None else "      - MiB"
            target = SORT_TARGET_MS[r["network"]]
            verdict = "MET" if r["fwd_bwd_ms"] <= target else "NOT MET"
            print(f"  sort {r['network']:<8} {r['impl']:<16} fwd+bwd {r['fwd_bwd_ms']:8.2f} ms  "
                  f"fwd {r['fwd_ms']:7.2f} ms  {peak}   target {target} ms: {verdict}", file=file)
        elif r["kind"] == "skip":
            print(f"  {r['what']}: skipped, {r['reason']}", file=file)
        elif r["kind"] == "loader":
            rate = f"{r['images_per_s']:.1f}" if r["images_per_s"] else "-"
            print(f"  loader {r['global_size']}/{r['local_size']} workers={r['workers']}: {rate} img/s "
                  f"({r['images_per_s_with_startup']:.1f} with start-up)", file=file)
        elif r["kind"] == "e2e":
            print(bench_e2e.table_line(r), file=file)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    torch.set_float32_matmul_precision("high")  # as neco.train: TF32 for the objective's fp32 products
    amp_dtype = resolve_precision(args.precision, device)
    parts = set(args.parts.split(","))
    if args.compile:
        # One static graph per crop shape (three per configuration): faster than one dynamic-shape graph,
        # whose inductor lowering of the patch grid has failed on this model.
        torch._dynamo.config.automatic_dynamic_shapes = False
    env = environment(device)
    out = args.out.open("w") if args.out else None
    records = []

    def emit(record: dict | None) -> None:
        if record is None:
            return
        record = {**env, **record}
        records.append(record)
        line = json.dumps(record)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()  # a run cut short keeps what it measured

    emit({"kind": "env", "quick": args.quick, "python": platform.python_version(), "parts": sorted(parts)})
    if "sort" in parts:
        for r in measure_sorts(args, device, compiled=False):
            emit(r)
    if "step" in parts:
        sizes = [int(s) for s in args.sizes.split(",")]
        dense_sizes = {int(s) for s in args.dense_sizes.split(",") if s}
        triton_sizes = {int(s) for s in args.triton_sizes.split(",") if s} & set(sizes)
        skip = triton_skip_reason(device) if triton_sizes else None
        if skip:
            emit({"kind": "skip", "what": "step triton", "reason": skip})
        for size in sizes:
            cfg = base_config(args)
            cfg.data.global_size = size
            neco = measure_step(cfg, device, amp_dtype, "neco", args.warmup, args.steps)
            emit(neco)
            fused = None
            if size in triton_sizes and not skip and cfg.loss.sorter != "triton":
                # "NeCo step, triton sorter": the same step with the fused sorting kernels.
                cfg.loss.sorter = "triton"
                fused = measure_step(cfg, device, amp_dtype, "neco", args.warmup, args.steps)
                emit(fused)
                cfg.loss.sorter = neco["sorter"]
            floor = measure_step(cfg, device, amp_dtype, "floor", args.warmup, args.steps)
            emit(floor)
            emit(step_ratio(neco, floor))
            if fused:
                emit(step_ratio(fused, floor))
            if size in dense_sizes:
                cfg.loss.sorter = "dense"
                emit(measure_step(cfg, device, amp_dtype, "neco", args.warmup, args.steps))
    if parts & {"loader", "e2e"}:
        loader_and_e2e(args, device, amp_dtype, parts, records, emit)
    if args.compile_sort and "sort" in parts:
        for r in measure_sorts(args, device, compiled=True):
            emit(r)
    if out:
        out.close()
    print_table(records)
    return records


def loader_and_e2e(args, device, amp_dtype, parts: set, records: list, emit) -> None:
    """The loader alone and training end to end, at the largest global size, on one folder of JPEGs."""
    cfg = base_config(args)
    cfg.data.global_size = max(int(s) for s in args.sizes.split(","))
    batch, warmup = cfg.data.batch_size, max(args.warmup, 1)
    loader_batches = args.loader_rounds * max(max(args.workers), 1)
    needed = max(loader_batches if "loader" in parts else 0, warmup + args.e2e_steps if "e2e" in parts else 0)
    sorters = [cfg.loss.sorter]
    triton_sizes = {int(s) for s in args.triton_sizes.split(",") if s}
    if "e2e" in parts and cfg.data.global_size in triton_sizes and cfg.loss.sorter != "triton":
        skip = triton_skip_reason(device)
        if skip:
            emit({"kind": "skip", "what": "e2e triton", "reason": skip})
        else:
            sorters.append("triton")
    size = bench_e2e.QUICK_JPEG_SIZE if args.quick else bench_e2e.JPEG_SIZE
    with exit_on_user_error(), bench_e2e.jpeg_folder(args.jpeg_dir, batch * needed, size) as folder:
        data = bench_e2e.folder_summary(folder)
        for workers in args.workers if "loader" in parts else ():
            emit(bench_e2e.measure_loader(cfg, folder, workers, loader_batches) | data)
        for sorter in sorters if "e2e" in parts else ():
            cfg.loss.sorter = sorter
            for workers in args.workers:
                record = bench_e2e.measure_e2e(cfg, device, amp_dtype, folder, workers, args.warmup,
                                               args.e2e_steps, build_trainer)
                emit(bench_e2e.compare(record | data, records))


if __name__ == "__main__":
    main()
