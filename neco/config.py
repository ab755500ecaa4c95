"""Typed schemas of the Hydra config tree, registered in Hydra's ConfigStore.

`conf/train.yaml` lists `train_schema` first in its defaults, so every YAML file of every group is merged
into these dataclasses: a misspelt key or a value of the wrong type fails at compose time, naming the key.
Components receive only their own sub-config (`cfg.loss`, `cfg.optim`, ...), never the whole tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from neco.choices import (
    BadImagePolicy,
    BoxScale,
    CheckpointModel,
    ClsPosition,
    Distribution,
    DropPathMode,
    EmaTiming,
    EvalDataset,
    ExportFormat,
    FgCellRule,
    LoggerName,
    LossMask,
    MaskBlurPadding,
    MonitorName,
    Precision,
    QueueCounter,
    References,
    ReferenceSource,
    Similarity,
    Sorter,
    SortNetwork,
    TeacherHeadInit,
    WandbMode,
    ZeroLossStep,
)


@dataclass
class BackboneConfig:
    name: str = "dinov2_vits14"
    # "default" (the backbone's official weights), "random" (explicit random init), a local path,
    # an https:// URL, or a released checkpoint.
    # Every backbone option sets it; presets that need your own checkpoint leave it missing (???).
    weights: str = MISSING
    strict: bool = True
    # Files holding a student and a teacher: auto (the teacher of DINO/DINOv2 training checkpoints, the student
    # of NeCo and of this project's checkpoints) | student | teacher.
    checkpoint_model: CheckpointModel = CheckpointModel.auto
    drop_path_rate: float = 0.1  # student only; the teacher always runs without stochastic depth
    # reference: DINOv2 blocks with a rate > 0.1 keep the residual for a random batch subset (DINOv2's own rule;
    # the last block at rate 0.1, float32(0.1) > 0.1) | per_sample: timm's per-sample DropPath in every block
    drop_path_mode: DropPathMode = DropPathMode.reference
    # Register models. separate (reference): cls_token and a CLS entry in pos_embed, two tensors for AdamW |
    # folded: timm's layout, the CLS position embedding folded into cls_token (one tensor)
    cls_position: ClsPosition = ClsPosition.separate


@dataclass
class DataConfig:
    # training: synthetic | coco | imagenet100 | imagenet | voc | folder | a+b (concatenation)
    # evaluation: voc | coco_stuff | coco_things | ade20k | cityscapes | synthetic
    name: str = "coco"
    global_size: int = 518
    local_size: int = 98
    num_global: int = 2
    num_local: int = 4
    global_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.25])
    min_intersection: float = 0.01
    max_resample: int = 1000  # the reference resamples forever; we raise a clear error instead
    jitter_strength: float = 1.0
    blur_strength: float = 1.0
    batch_size: int = 64  # per process
    num_workers: int = 8
    shuffle: bool = True
    drop_last: bool = True
    on_bad_image: BadImagePolicy = BadImagePolicy.skip  # skip (warn, count, use the next image) | raise
    # Only for data=synthetic: procedural scenes generated on the fly.
    synthetic_images: int = 512
    synthetic_size: int = 128
    synthetic_seed: int = 0


@dataclass
class HeadConfig:
    hidden_dim: int = 2048
    out_dim: int = 256
    num_layers: int = 3


@dataclass
class LossConfig:
    student_steepness: float = 100.0
    teacher_steepness: Optional[float] = 100.0  # null: reuse the student's steepness (reference behaviour)
    network: SortNetwork = SortNetwork.bitonic  # bitonic | odd_even
    # cauchy | logistic | logistic_phi | gaussian | reciprocal | optimal
    distribution: Distribution = Distribution.cauchy
    art_lambda: float = 0.25
    # auto: triton on a CUDA device where the kernels run (1.6x the sparse step at 518 px on an H200), sparse
    # elsewhere (CPU, MPS, no Triton); run_info.json records the choice and why (neco.loss.sorter_choice).
    # sparse (comparators) | triton (fused CUDA kernels) | dense (slow reference path): the same function.
    sorter: Sorter = Sorter.auto
    similarity: Similarity = Similarity.cosine  # cosine | euclidean
    references: References = References.queue  # batch (in-batch shuffle) | queue (FIFO of past teacher embeddings)
    queue_length: int = 8192  # summed over processes; each process keeps queue_length / world_size rows
    mask: LossMask = LossMask.all  # all | fg | bg
    roi_size: int = 7
    use_teacher: bool = True  # false: the student provides its own (no-grad) targets, as the no-teacher ablation
    head: HeadConfig = field(default_factory=HeadConfig)
    # Reference behaviour by default; each option below names the fix (README: "Faithful to the reference").
    # teacher (reference) | student (as the paper text describes)
    reference_source: ReferenceSource = ReferenceSource.teacher
    queue_counter: QueueCounter = QueueCounter.shared  # shared (reference: one counter for both queues) | per_queue
    # independent (reference) | copy (teacher head = student head)
    teacher_head_init: TeacherHeadInit = TeacherHeadInit.independent
    box_scale: BoxScale = BoxScale.patch  # patch (reference: boxes / patch size) | grid (boxes / (crop size / tokens))
    # reflect (reference: torchvision's GaussianBlur) | zeros
    mask_blur_padding: MaskBlurPadding = MaskBlurPadding.reflect
    fg_cell_rule: FgCellRule = FgCellRule.exact  # exact (reference: aligned mask value >= 1.0) | tolerant (>= 1 - 1e-6)


@dataclass
class OptimConfig:
    epochs: int = 25
    lr_backbone: float = 1e-5
    lr_heads: float = 1e-4
    final_lr: float = 0.0
    scale_lr_with_batch: bool = False  # true: lr *= effective_batch / 256 (off in every published run)
    weight_decay: float = 0.04
    weight_decay_end: float = 0.5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum_teacher: float = 0.9995
    momentum_teacher_end: float = 1.0
    exclude_norm_bias: bool = True
    decay_tokens: bool = True  # reference decays CLS/pos-embed/register tokens; false excludes them
    trainable_blocks: Optional[Any] = None  # null = all; int n -> sorted(blocks)[n:]; list -> those blocks
    grad_clip: Optional[float] = None  # global-norm clipping that really clips (the reference's is a no-op)
    accumulate: int = 1  # micro-batches per optimizer step; in-batch references come from each micro-batch
    ema_timing: EmaTiming = EmaTiming.before_step  # before_step (reference) | after_step
    # A step whose loss is exactly zero is skipped (no update, no EMA). advance (reference): the step still
    # counts, so the lr / wd / momentum schedules move on | hold: the schedules wait for the next real step
    zero_loss_step: ZeroLossStep = ZeroLossStep.advance


@dataclass
class MonitorConfig:
    # What training evaluates along the way (`monitor=`): none | quick (dense NN retrieval + k-means on the synthetic
    # validation split) | kmeans (METHOD.md §6.1) | attention (METHOD.md §6.6; teacher attention, never run by the
    # reference because of a config bug, §10.5). `python -m neco.eval` has its own `eval=<protocol>` group.
    name: MonitorName = MonitorName.none
    before_training: bool = True
    after_training: bool = True
    every_n_epochs: int = 0  # 0: only before/after
    every_n_steps: int = 0  # also every N optimizer steps (0: never)
    image_size: int = 64
    train_images: int = 256
    val_images: int = 128  # quick, and the monitors with dataset=synthetic: images generated for the split
    num_figures: int = 6
    # The monitors (neco.eval.monitors): which split they read, how much of it, and the clustering settings.
    dataset: EvalDataset = EvalDataset.voc  # any dataset of neco.data.eval_datasets (read from paths.*)
    split: str = "val"
    max_images: Optional[int] = None  # first images of the split; null: all (reference 6.1: 20 batches of 32)
    batch_size: int = 32
    mask_size: int = 100  # the k-means monitor scores at mask_size x mask_size
    ks: list[Any] = field(default_factory=lambda: [500, 300, "classes"])  # ints or "classes"
    pca_dim: Optional[int] = 50
    pca_max_points: Optional[int] = 4_000_000
    kmeans_iters: int = 50
    kmeans_restarts: int = 5
    kmeans_seed: int = 1
    per_class: bool = True  # also log per-class precision and recall (as the reference)
    faiss_threads: Optional[int] = None  # null: faiss's default
    attn_threshold: float = 0.6  # fraction of the attention mass kept as foreground
    boundary_as_foreground: bool = False  # true: ignore-labelled pixels count as foreground (reference callback)


@dataclass
class WandbConfig:
    project: str = "neco"
    entity: Optional[str] = None
    mode: WandbMode = WandbMode.offline  # online | offline | disabled
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.jsonl  # jsonl (metrics.jsonl only) | wandb (metrics.jsonl and Weights & Biases)
    log_every: int = 10
    progress: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class PathsConfig:
    root: str = "."
    data: str = "data"
    coco: str = "data/coco/images"  # training: the folder that directly contains train2017/
    coco_eval: str = "data/coco"  # COCO-Stuff/Things evaluation: images/{train,val}2017/ and annotations/
    imagenet: str = "data/imagenet"
    voc: str = "data/voc"
    ade20k: str = "data/ADEChallengeData2016"
    cityscapes: str = "data/cityscapes"
    folder: str = "data/images"
    weights: str = "weights"  # cache for downloaded checkpoints
    output_dir: str = "outputs"
    results: str = "outputs/results"


@dataclass
class TrainConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    run_name: str = "run"
    seed: int = 400
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.auto  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    # true: torch.compile both backbones (one H200 step at 518 px with the triton sorter: 209 images/s eager, 282
    # compiled; bench/README.md). Not chosen automatically: every process compiles again for each crop shape
    # before its first steps, and inductor has failed on this model's dynamic-shape graph (neco/bench.py keeps
    # static shapes for that reason), so a compile can cost start-up time or stop a run that runs eagerly.
    compile: bool = False
    max_steps: Optional[int] = None  # stop early (debugging); schedules still span the full run
    checkpoint_every: int = 1000  # optimizer steps; the end of each epoch always checkpoints
    keep_checkpoints: int = 3
    resume: Optional[str] = "auto"  # auto | null | a run directory | a checkpoint path
    # true: resume even though settings that shape the run changed (README: "Signals, locks and resume")
    resume_force: bool = False


# The options that choose between the reference's behaviour (each default) and a fix; run_info.json records them.
REFERENCE_OPTIONS = (
    "backbone.drop_path_mode", "backbone.cls_position",
    "loss.reference_source", "loss.queue_counter", "loss.teacher_head_init", "loss.box_scale",
    "loss.mask_blur_padding", "loss.fg_cell_rule",
    "optim.decay_tokens", "optim.ema_timing", "optim.zero_loss_step",
)


@dataclass
class ExportConfig:
    """`python -m neco.export` (conf/export.yaml); the backbone group is only selected for non-project files."""

    checkpoint: str = MISSING
    format: ExportFormat = ExportFormat.timm
    checkpoint_model: CheckpointModel = CheckpointModel.auto
    strict: bool = True
    name: str = "export"
    paths: PathsConfig = field(default_factory=PathsConfig)
    backbone: Optional[BackboneConfig] = None


def asset_path(name: str) -> str:
    """Absolute path of a file shipped inside the package (used as `${neco_asset:file}` in configs)."""
    return str(Path(__file__).resolve().parent / "assets" / name)


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    ConfigStore.instance().store(name="export_schema", node=ExportConfig)
    if not OmegaConf.has_resolver("neco_asset"):
        OmegaConf.register_new_resolver("neco_asset", asset_path)


register_configs()
