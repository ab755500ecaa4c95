"""Build the components of a training run from its config: device, precision, data, student and teacher."""

from __future__ import annotations

import copy
import logging
import random

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from neco.data.datasets import TRAIN_DATASETS, build_train_dataset
from neco.data.multicrop import MultiCrop
from neco.data.sampler import ResumableSampler
from neco.data.workers import cap_workers
from neco.engine.signals import ignore_in_workers
from neco.errors import ConfigError
from neco.models.backbone import build_backbone
from neco.models.encoder import DenseEncoder
from neco.models.head import ProjectionHead

log = logging.getLogger("neco")

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: no CUDA device is available here; use device=cpu or device=auto")
    return device


def resolve_precision(name: str, device: torch.device):
    """Autocast dtype for backbone and head (None = fp32). The objective always runs in fp32 or wider."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name not in PRECISIONS:
        raise ConfigError(f"precision={name!r}: choose auto, bf16, fp16 or fp32")
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return PRECISIONS[name]


def dataset_roots(paths) -> dict[str, str]:
    return {"coco": paths.coco, "imagenet": paths.imagenet, "voc": paths.voc, "folder": paths.folder}


def build_multicrop(data_cfg) -> MultiCrop:
    return MultiCrop(
        global_size=data_cfg.global_size, local_size=data_cfg.local_size, num_global=data_cfg.num_global,
        num_local=data_cfg.num_local, global_scale=data_cfg.global_scale, local_scale=data_cfg.local_scale,
        min_intersection=data_cfg.min_intersection, jitter_strength=data_cfg.jitter_strength,
        blur_strength=data_cfg.blur_strength, max_resample=data_cfg.max_resample)


def build_loader(data_cfg, paths, seed: int, rank: int = 0, world_size: int = 1):
    """Dataset, resumable sampler and loader. The loader's own generator keeps the global RNG untouched when an
    iterator is created, so a resumed run draws exactly the random numbers of the uninterrupted one."""
    synthetic = {"split": "train", "num_images": data_cfg.synthetic_images, "image_size": data_cfg.synthetic_size,
                 "seed": data_cfg.synthetic_seed}
    parts = [p.strip() for p in data_cfg.name.replace(",", "+").split("+")]
    if not all(p in TRAIN_DATASETS or p in ("imagenet100k",) for p in parts):
        raise ConfigError(f"data.name={data_cfg.name!r}: choose {', '.join(TRAIN_DATASETS)} or several joined "
                          "by '+' (e.g. coco+imagenet100)")
    dataset = build_train_dataset(data_cfg.name, dataset_roots(paths), build_multicrop(data_cfg), synthetic,
                                  on_bad_image=data_cfg.on_bad_image)
    sampler = ResumableSampler(len(dataset), shuffle=data_cfg.shuffle, seed=seed, rank=rank, world_size=world_size)
    loader = DataLoader(
        dataset, batch_size=data_cfg.batch_size, sampler=sampler, num_workers=cap_workers(data_cfg.num_workers),
        drop_last=data_cfg.drop_last, pin_memory=torch.cuda.is_available(),
        # The generator seeds the workers' augmentations: one stream per process (rank 0 = single process).
        persistent_workers=False, generator=torch.Generator().manual_seed(seed + rank),
        worker_init_fn=ignore_in_workers)
    return dataset, sampler, loader


def _disable_drop_path(module: nn.Module) -> None:
    for sub in module.modules():
        if hasattr(sub, "drop_prob"):
            sub.drop_prob = 0.0


def build_student_teacher(backbone_cfg, loss_cfg, cache_dir: str | None = None):
    """Student (stochastic depth) and teacher (none) share the loaded backbone weights; the heads are random.

    The reference initialises the two heads independently (METHOD.md §10.3); loss.teacher_head_init=copy starts the
    teacher head as a copy of the student's instead.
    """
    backbone = build_backbone(backbone_cfg.name, weights=backbone_cfg.weights, strict=backbone_cfg.strict,
                              checkpoint_model=backbone_cfg.checkpoint_model,
                              drop_path_rate=backbone_cfg.drop_path_rate, cache_dir=cache_dir,
                              drop_path_mode=backbone_cfg.drop_path_mode, cls_position=backbone_cfg.cls_position)
    teacher_backbone = copy.deepcopy(backbone)
    _disable_drop_path(teacher_backbone)
    head_cfg = loss_cfg.head
    head = ProjectionHead(backbone.embed_dim, head_cfg.hidden_dim, head_cfg.out_dim, head_cfg.num_layers)
    if loss_cfg.teacher_head_init == "copy":
        teacher_head = copy.deepcopy(head)
    elif loss_cfg.teacher_head_init == "independent":
        teacher_head = ProjectionHead(backbone.embed_dim, head_cfg.hidden_dim, head_cfg.out_dim, head_cfg.num_layers)
    else:
        raise ConfigError(f"loss.teacher_head_init={loss_cfg.teacher_head_init!r}: choose independent or copy")
    student = DenseEncoder(backbone, head)
    teacher = DenseEncoder(teacher_backbone, teacher_head)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher
