"""Checkpoint layouts: where the backbone sits in a file, and its keys in timm's and DINOv2-hub's layouts.

Files from several projects hold a ViT backbone under different names (METHOD.md §2.7):

* a plain state dict (timm, torch.hub DINOv2, the released NeCo ``*_model.ckpt``/``*_teacher.ckpt`` files);
* a prefix (``module.``, ``backbone.``, Leopart's ``model.``, TimeT's ``feature_extractor.model.``);
* a wrapper (``state_dict``, ``model``), possibly with two networks: DINO full checkpoints
  (``teacher``/``student``), Lightning checkpoints of NeCo (``state_dict`` with ``model.`` = student and
  ``teacher.``), DINOv2 training checkpoints, and this project's own (``student``/``teacher``, ``step``, ``config``).

Every nested mapping is flattened to dotted keys; each key ending in ``cls_token`` marks one backbone, whose
prefix is what precedes it (the reference's rule). Keys under the chosen prefix that contain ``head`` are
projection or classifier heads and are left out, as the reference does. What is not loaded is reported.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from timm.models import vision_transformer as timm_vit

from neco.models.registry import BACKBONES
from neco.models.weights import WeightsError

log = logging.getLogger(__name__)

CHECKPOINT_MODELS = ("auto", "student", "teacher")
_MAX_DEPTH = 6  # nesting levels searched for backbones (optimizer states and configs are shallower in practice)


@dataclass
class Extracted:
    """The backbone found in a checkpoint."""

    state: dict[str, torch.Tensor]
    prefix: str  # dotted path of the backbone in the file ("" for a plain state dict)
    role: str  # "student" | "teacher" | "single"
    ignored: dict[str, int] = field(default_factory=dict)  # group of keys not loaded -> number of tensors
    trained_as: str | None = None  # backbone.name recorded in this project's own checkpoints


def _flatten(obj: Mapping, prefix: str = "", depth: int = 0, out: dict | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of nested mappings under its dotted path (``{"a": {"b": t}}`` -> ``{"a.b": t}``)."""
    out = {} if out is None else out
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            out[key] = v
        elif isinstance(v, Mapping) and depth < _MAX_DEPTH:
            _flatten(v, key + ".", depth + 1, out)
    return out


def _role(prefix: str) -> str:
    """Which network a prefix names. NeCo's and Leopart's Lightning modules keep the student as ``model``."""
    parts = [p.lower() for p in prefix.split(".") if p]
    if any("teacher" in p or p in ("ema", "model_ema", "ema_model", "momentum_encoder") for p in parts):
        return "teacher"
    return "student" if "student" in parts or "model" in parts else "single"


def _is_dino_style(obj: Mapping, prefixes: list[str]) -> bool:
    """DINO and DINOv2 training checkpoints: the teacher is the network those projects release."""
    own = isinstance(obj, Mapping) and "step" in obj and "config" in obj  # this project's checkpoints
    return not own and all(p.endswith("backbone.") for p in prefixes)


def recorded_backbone(obj: Mapping) -> str | None:
    """The ``backbone.name`` a checkpoint of this project was trained with (its saved config), if any."""
    cfg = obj.get("config") if isinstance(obj, Mapping) else None
    backbone = cfg.get("backbone") if isinstance(cfg, Mapping) else None
    name = backbone.get("name") if isinstance(backbone, Mapping) else None
    return name if isinstance(name, str) else None


def _choose(prefixes: list[str], want: str, obj: Mapping, source: str) -> str:
    roles = {p: _role(p) for p in prefixes}
    found = ", ".join(f"'{p}' ({roles[p]})" for p in prefixes)
    if len(prefixes) == 1:
        only = prefixes[0]
        if want != "auto" and roles[only] not in (want, "single"):
            raise WeightsError(f"{source}: backbone.checkpoint_model={want}, but the file holds only the "
                              f"{roles[only]} network '{only}'. Set backbone.checkpoint_model=auto.")
        if want != "auto" and roles[only] == "single":
            log.info("%s holds a single backbone: backbone.checkpoint_model=%s does not apply", source, want)
        return only
    if want == "auto":
        teachers = [p for p in prefixes if roles[p] == "teacher"]
        if teachers and _is_dino_style(obj, prefixes):
            choice = teachers[0]
        else:  # NeCo (Lightning "model." = student) and this project: the student, as the reference loads
            choice = next((p for p in prefixes if roles[p] != "teacher"), prefixes[0])
        log.info("%s holds several backbones (%s): using '%s'; set backbone.checkpoint_model=student|teacher "
                 "to choose", source, found, choice)
        return choice
    matches = [p for p in prefixes if roles[p] == want] or (
        [p for p in prefixes if roles[p] == "single"] if want == "student" else [])
    if not matches:
        raise WeightsError(f"{source}: backbone.checkpoint_model={want}, but the file holds no {want} network "
                          f"(found {found}). Set backbone.checkpoint_model to {' or '.join(CHECKPOINT_MODELS)}.")
    if len(matches) > 1:
        log.warning("%s holds several %s backbones (%s): using the first, '%s'", source, want, found, matches[0])
    return matches[0]


def _group(key: str, prefix: str) -> str:
    """The part of ``key`` that tells where it lives: its path up to where it leaves ``prefix``, then ``*``."""
    k, p = key.split("."), prefix.split(".")[:-1]
    n = 0
    while n < min(len(k) - 1, len(p)) and k[n] == p[n]:
        n += 1
    return ".".join(k[: n + 1]) + (".*" if n + 1 < len(k) else "")


def check_checkpoint_model(value: str | None) -> str:
    value = value or "auto"
    if value not in CHECKPOINT_MODELS:
        raise WeightsError(f"backbone.checkpoint_model={value!r}: choose one of {', '.join(CHECKPOINT_MODELS)}.")
    return value


def extract_backbone_state(obj: Mapping, source: str = "checkpoint", checkpoint_model: str | None = "auto"
                           ) -> Extracted:
    """Find the backbone's tensors in a checkpoint and strip their prefix (METHOD.md §2.7).

    ``checkpoint_model``: for files holding a student and a teacher, which one to load. ``auto`` takes the
    teacher of DINO/DINOv2 training checkpoints and otherwise the student (NeCo Lightning ``model.``, this
    project's ``student``), which is what the reference loads.
    """
    want = check_checkpoint_model(checkpoint_model)
    flat = _flatten(obj) if isinstance(obj, Mapping) else {}
    prefixes = list(dict.fromkeys(k[: -len("cls_token")] for k in flat
                                  if k == "cls_token" or k.endswith(".cls_token")))
    if not prefixes:
        raise WeightsError(f"{source}: no ViT backbone weights found (no key ending in 'cls_token' at any level "
                          "of the file). Check backbone.weights.")
    prefix = _choose(prefixes, want, obj, source)
    state, ignored = {}, {}
    for k, v in flat.items():
        rest = k[len(prefix):]
        if k.startswith(prefix) and "head" not in rest and not any(
                o != prefix and o.startswith(prefix) and k.startswith(o) for o in prefixes):
            state[rest] = v
        else:
            group = _group(k, prefix)
            ignored[group] = ignored.get(group, 0) + 1
    if ignored:
        shown = ", ".join(f"{g} ({n})" for g, n in ignored.items())
        log.info("%s: loading the backbone at '%s' (%d tensors); not loaded: %s", source, prefix, len(state), shown)
    role = _role(prefix) if len(prefixes) > 1 else "single"
    return Extracted(state, prefix, role, ignored, recorded_backbone(obj))


# --------------------------------------------------------------------------------------------- key layouts


def is_dinov2_hub_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """True for keys as written by the official DINOv2 code (torch.hub checkpoints, DINOv2 training)."""
    return (
        "mask_token" in state
        or "register_tokens" in state
        or any(re.match(r"blocks\.\d+\.(\d+\.)?mlp\.w(12|3)\.", k) for k in state)
        or any(re.match(r"blocks\.\d+\.\d+\.", k) for k in state)
    )


def to_timm_layout(
    state: dict[str, torch.Tensor], model: nn.Module, drop_registers: bool = False, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Convert a backbone state dict (timm or DINOv2-hub keys) to the keys of the timm ``model``.

    ``drop_registers`` is the "XR" case (METHOD.md §2.7 (b)): weights trained with registers loaded into a
    model without them. The registers are dropped and this is logged, never silent.
    """
    state = dict(state)
    if drop_registers:
        dropped = [k for k in ("register_tokens", "reg_token") if k in state]
        pos = state.get("pos_embed")
        if ("reg_token" in state and not getattr(model, "no_embed_class", True)
                and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]):
            # timm's register layout folds the CLS position embedding into cls_token and stores no CLS
            # entry in pos_embed; a zero entry restores the CLS-inclusive layout with identical outputs.
            state["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
        for k in dropped:
            state.pop(k)
        log.warning(
            "%s: dropped %s: weights trained with register tokens are loaded into a model without "
            "registers (XR variant, METHOD.md §2.7); the network runs without them.",
            source,
            dropped or "nothing (the checkpoint has no register tokens)",
        )
    if is_dinov2_hub_layout(state):
        # DINOv2 training checkpoints chunk the blocks for FSDP ("blocks.<chunk>.<index>."); the inner
        # index is already the global block index.
        state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}
        # timm's DINOv2 key conversion (mask_token dropped, SwiGLU w12/w3 -> fc1/fc2, registers -> reg_token
        # with the CLS position embedding folded into cls_token). It is called directly rather than through
        # checkpoint_filter_fn because that one also resamples patch kernels and position embeddings of
        # other sizes (and fails on some register mismatches): those must be reported, not adapted.
        state = timm_vit._convert_dinov2(state, model)
    return state


def to_hub_layout(state: Mapping[str, torch.Tensor], swiglu: bool) -> dict[str, torch.Tensor]:
    """The inverse of ``to_timm_layout`` for a timm DINOv2-style state dict: torch.hub DINOv2 keys.

    timm folds the CLS position embedding into ``cls_token`` for register models; the hub model adds
    ``pos_embed[:, 0]`` to CLS, so a zero entry there gives the same network. ``mask_token`` exists in the
    hub model only for masked training and is never used at inference: it is written as zeros.
    """
    out = {}
    state = dict(state)
    dim = state["cls_token"].shape[-1]
    if "reg_token" in state:
        out["register_tokens"] = state.pop("reg_token")
        pos = state.pop("pos_embed")
        out["pos_embed"] = torch.cat([pos.new_zeros(1, 1, dim), pos], dim=1)
    for k, v in state.items():
        if swiglu:
            k = re.sub(r"^(blocks\.\d+\.mlp)\.fc1\.", r"\1.w12.", k)
            k = re.sub(r"^(blocks\.\d+\.mlp)\.fc2\.", r"\1.w3.", k)
        out[k] = v
    out["mask_token"] = torch.zeros(1, dim, dtype=state["cls_token"].dtype)
    return out


# --------------------------------------------------------------------------------------------- architecture


def describe_architecture(state: Mapping[str, torch.Tensor]) -> dict | None:
    """Width, depth, patch size and register count of a timm-layout ViT state dict (None if unreadable)."""
    try:
        dim = state["cls_token"].shape[-1]
        patch = state["patch_embed.proj.weight"].shape[-1]
    except (KeyError, IndexError):
        return None
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    reg = state.get("reg_token")
    return {"width": int(dim), "depth": len(blocks), "patch": int(patch),
            "registers": 0 if reg is None else int(reg.shape[1])}


def architecture_hint(state: Mapping[str, torch.Tensor], model: nn.Module, name: str,
                      trained_as: str | None = None) -> str | None:
    """A sentence naming ``backbone.name`` when the weights are of another architecture than the model."""
    theirs, ours = describe_architecture(state), describe_architecture(model.state_dict())
    if theirs is None or ours is None or theirs == ours:
        return None

    def text(a: dict) -> str:
        return f"width {a['width']}, {a['depth']} blocks, patch {a['patch']}, {a['registers']} registers"

    fits = [n for n, s in BACKBONES.items() if (s.embed_dim, s.patch_size, s.num_register_tokens) ==
            (theirs["width"], theirs["patch"], theirs["registers"])]
    hint = f"  The weights are a ViT with {text(theirs)}; backbone '{name}' has {text(ours)}."
    if trained_as and trained_as != name:
        hint += f" The checkpoint was trained with backbone.name={trained_as}."
    if fits:
        hint += f" Set backbone.name to the matching architecture ({', '.join(fits)})."
    return hint
