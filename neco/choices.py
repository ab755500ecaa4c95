"""The valid values of every choice option of the config schemas (neco.config, neco.eval.*).

Each option is typed with one of these enums, so Hydra/OmegaConf reject an unknown value when the config is
composed (neco.overrides names the key and the valid values in one line before that, for the command line).
A member's name is its value and the enums derive from ``str``: ``cfg.optim.ema_timing == "before_step"``,
dict lookups, f-strings and JSON all see the plain name, and YAML stores the name.
"""

from __future__ import annotations

import enum


class Choice(str, enum.Enum):
    """A string enum whose members print, format and hash as their plain value (equal to their name)."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(self, spec)


def _choice(name: str, *values: str) -> type[Choice]:
    # The functional form allows names that are Python keywords ("raise"); module= keeps members picklable.
    return Choice(name, {v: v for v in values}, module=__name__, qualname=name)


# backbone.*
CheckpointModel = _choice("CheckpointModel", "auto", "student", "teacher")
DropPathMode = _choice("DropPathMode", "reference", "per_sample")
ClsPosition = _choice("ClsPosition", "separate", "folded")

# data.*
BadImagePolicy = _choice("BadImagePolicy", "skip", "raise")

# loss.*
SortNetwork = _choice("SortNetwork", "bitonic", "odd_even")
Distribution = _choice("Distribution", "cauchy", "logistic", "logistic_phi", "gaussian", "reciprocal", "optimal")
Sorter = _choice("Sorter", "auto", "sparse", "triton", "dense")
Similarity = _choice("Similarity", "cosine", "euclidean")
References = _choice("References", "batch", "queue")
LossMask = _choice("LossMask", "all", "fg", "bg")
ReferenceSource = _choice("ReferenceSource", "teacher", "student")
QueueCounter = _choice("QueueCounter", "shared", "per_queue")
TeacherHeadInit = _choice("TeacherHeadInit", "independent", "copy")
BoxScale = _choice("BoxScale", "patch", "grid")
MaskBlurPadding = _choice("MaskBlurPadding", "reflect", "zeros")
FgCellRule = _choice("FgCellRule", "exact", "tolerant")

# optim.*
EmaTiming = _choice("EmaTiming", "before_step", "after_step")
ZeroLossStep = _choice("ZeroLossStep", "advance", "hold")

# eval.* of training, logger.*, top level
MonitorName = _choice("MonitorName", "none", "quick", "kmeans", "attention")
# neco.data.eval_datasets.EVAL_DATASETS (tests check they agree)
EvalDataset = _choice("EvalDataset", "voc", "coco_stuff", "coco_things", "ade20k", "cityscapes", "synthetic")
LoggerName = _choice("LoggerName", "jsonl", "wandb")
WandbMode = _choice("WandbMode", "online", "offline", "disabled")
Precision = _choice("Precision", "auto", "bf16", "fp16", "fp32")

# python -m neco.eval and python -m neco.export
EvalCheckpointModel = _choice("EvalCheckpointModel", "student", "teacher")
ExportFormat = _choice("ExportFormat", "timm", "dinov2_hub", "safetensors")

# Evaluation protocol options (neco.eval.<protocol>)
LabelResize = _choice("LabelResize", "legacy_nearest", "centre")
MiouClasses = _choice("MiouClasses", "all", "exclude_ignore")
HbirdSearch = _choice("HbirdSearch", "auto", "torch", "faiss")
MemoryDtype = _choice("MemoryDtype", "float16", "float32")
MemoryNorm = _choice("MemoryNorm", "per_patch", "per_image_axis_v1")
CooccurrenceAngles = _choice("CooccurrenceAngles", "reference", "fixed")


def plain(value):
    """``value`` with every choice member (also inside dicts, lists and tuples) replaced by its plain string:
    for files read back with ``torch.load(weights_only=True)``, which accepts only built-in types."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value
