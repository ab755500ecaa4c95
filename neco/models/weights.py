"""Backbone weights: where they come from, how they are read, and how their keys become timm's.

Weights from outside are data, not code: files are read with ``torch.load(weights_only=True)`` or
safetensors. Accepted layouts (auto-detected):

* timm ``VisionTransformer`` state dicts;
* torch.hub DINOv2 checkpoints (``mask_token``, ``register_tokens``, SwiGLU ``w12``/``w3``, chunked blocks),
  converted with timm's own DINOv2 key conversion;
* DINO full training checkpoints (``{"teacher": {"backbone.*", "head.*"}, "student": ..., "args": ...}``);
* any of these wrapped in ``state_dict`` / ``model`` / ``teacher`` entries or under a key prefix
  (spec §2.7 steps 1-3: the prefix is what precedes the key ending in ``cls_token``; keys containing
  ``head`` are dropped).

Every mismatch between the converted weights and the model is reported; strict loading (the default)
turns any mismatch into a ``WeightsError`` so a pretrained backbone never starts partly random unnoticed.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn
from timm.models import vision_transformer as timm_vit

log = logging.getLogger(__name__)

# Wrapper entries that hold the weights, in the order they are tried. "teacher" comes first because DINO
# full checkpoints hold both networks and the teacher is the released model.
_WRAPPER_KEYS = ("teacher", "state_dict", "model", "module")
_MAX_REPORTED_KEYS = 10


class WeightsError(RuntimeError):
    """Weights that cannot be found, read or matched to the backbone (a user-fixable problem)."""


# --------------------------------------------------------------------------------------------- sources


def default_cache_dir() -> Path:
    """Where downloaded weights are kept: torch.hub's checkpoint folder, shared with torch.hub itself."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(
    weights: str | os.PathLike, default_url: str | None, backbone: str, cache_dir: str | Path | None = None
) -> Path | None:
    """Turn a ``backbone.weights`` value into a local file, or ``None`` for random initialisation.

    ``"default"`` uses the backbone's official URL, ``"random"`` means no weights, an ``http(s)://``
    address is downloaded once into ``cache_dir``, anything else is a local path.
    """
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    if not isinstance(weights, str) or not weights:
        raise WeightsError(
            f"backbone.weights={weights!r} is not a weights source: use 'default', 'random', "
            "a checkpoint path or an https:// URL."
        )
    if weights == "random":
        return None
    if weights == "default":
        if default_url is None:
            raise WeightsError(
                f"Backbone '{backbone}' has no default pretrained weights: set backbone.weights=random "
                "for a random initialisation, or backbone.weights=/path/to/checkpoint."
            )
        return download(default_url, backbone, cache_dir)
    if weights.startswith(("https://", "http://")):
        return download(weights, backbone, cache_dir)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"backbone.weights={weights}: no such file. Set backbone.weights to an existing checkpoint "
            "file, an https:// URL, 'default' (official weights) or 'random'."
        )
    return path


def download(url: str, backbone: str, cache_dir: str | Path | None = None) -> Path:
    """Fetch ``url`` into the cache once; later calls reuse the file."""
    dst = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dst = dst / Path(urlparse(url).path).name
    if dst.is_file():
        return dst
    log.info("Downloading weights of backbone '%s' from %s to %s", backbone, url, dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        # Looked up on torch.hub at call time so tests can stand in for the network.
        # It writes to a temporary file and renames it, so an interrupted download leaves no partial file.
        torch.hub.download_url_to_file(url, str(dst), progress=True)
    except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
        raise WeightsError(
            f"Could not download the weights of backbone '{backbone}' from {url} ({e}). Download the file "
            f"yourself and put it at {dst}, or set backbone.weights=/path/to/file "
            "(backbone.weights=random starts from random weights)."
        ) from None
    return dst


# --------------------------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path) -> Mapping:
    """Read a checkpoint as plain data (tensors, containers, numbers, strings); never run pickled code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise WeightsError(f"backbone.weights={path}: not a readable safetensors file ({e}).") from None
    # DINO full checkpoints carry their argparse namespace; it is plain data, so it is allowed by name.
    ctx = getattr(torch.serialization, "safe_globals", None)
    try:
        if ctx is None:
            return torch.load(path, map_location="cpu", weights_only=True)
        with ctx([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # the class or function the file asks to call
        if found is None:  # not a pickle torch understands at all
            raise WeightsError(f"backbone.weights={path}: not a readable checkpoint.") from None
        raise WeightsError(
            f"backbone.weights={path}: the file holds pickled objects other than tensors ({found.group(1)}) "
            "and is refused: outside weights are loaded weights-only. Re-save its state dict with "
            "torch.save(model.state_dict(), ...) or as .safetensors."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightsError(f"backbone.weights={path}: not a readable checkpoint ({e}).") from None


def extract_backbone_state(obj: Mapping, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the backbone's tensors in a checkpoint and strip their key prefix (spec §2.7 steps 1-3)."""
    cls_keys: list[str] = []
    for _ in range(len(_WRAPPER_KEYS) + 1):
        if not isinstance(obj, Mapping):
            break
        cls_keys = [k for k in obj if isinstance(k, str) and k.endswith("cls_token")]
        if cls_keys:
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not cls_keys:
        raise WeightsError(
            f"{source}: no ViT backbone weights found (no key ending in 'cls_token', also looked inside "
            f"{', '.join(map(repr, _WRAPPER_KEYS))}). Check backbone.weights."
        )
    prefix = cls_keys[0][: -len("cls_token")]
    if len(cls_keys) > 1:
        # Several networks in one file (e.g. student and teacher): take the first, as the reference does.
        others = ", ".join(repr(k[: -len("cls_token")]) for k in cls_keys[1:])
        log.warning("%s holds several backbones; using prefix %r (also found: %s)", source, prefix, others)
    return {
        k[len(prefix):]: v
        for k, v in obj.items()
        if isinstance(k, str) and k.startswith(prefix) and "head" not in k and isinstance(v, torch.Tensor)
    }


# --------------------------------------------------------------------------------------------- conversion


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

    ``drop_registers`` is the "XR" case (spec §2.7 (b)): weights trained with registers loaded into a
    model without them. The registers are dropped and this is logged, never silent.
    """
    state = dict(state)
    if drop_registers:
        dropped = [k for k in ("register_tokens", "reg_token") if k in state]
        if "reg_token" in state and not getattr(model, "no_embed_class", True):
            # timm's register layout folds the CLS position embedding into cls_token and stores no CLS
            # entry in pos_embed; a zero entry restores the CLS-inclusive layout with identical outputs.
            pos = state["pos_embed"]
            state["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
        for k in dropped:
            state.pop(k)
        log.warning(
            "%s: dropped %s: weights trained with register tokens are loaded into a model without "
            "registers (XR variant, spec §2.7); the network runs without them.",
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


# --------------------------------------------------------------------------------------------- loading


@dataclass
class LoadReport:
    """What did not match when loading a state dict into a model."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # key, checkpoint, model shape
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, source: str, backbone: str) -> str:
        def keys(items: list[str]) -> str:
            more = len(items) - _MAX_REPORTED_KEYS
            return ", ".join(items[:_MAX_REPORTED_KEYS]) + (f", ... ({more} more)" if more > 0 else "")

        lines = [f"Weights from {source} do not match backbone '{backbone}' ({self.loaded} tensors match):"]
        if self.missing:
            lines.append(f"  {len(self.missing)} missing (in the model only): {keys(self.missing)}")
        if self.unexpected:
            n = len(self.unexpected)
            lines.append(f"  {n} unexpected (in the weights only): {keys(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} weights {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched]
            lines.append(f"  {len(self.mismatched)} with a different shape: {keys(shown)}")
        if any(k in ("reg_token", "register_tokens") for k in self.unexpected):
            lines.append("  The weights have register tokens: use the '_reg' backbone, or '_xr' to drop them")
        return "\n".join(lines)


def load_checked(
    model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool, source: str, backbone: str
) -> LoadReport:
    """Load ``state`` into ``model``; any mismatch raises if ``strict``, else is warned about."""
    own = model.state_dict()
    report = LoadReport(
        missing=[k for k in own if k not in state],
        unexpected=[k for k in state if k not in own],
        mismatched=[(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                    if k in own and v.shape != own[k].shape],
    )
    bad = {k for k, _, _ in report.mismatched}
    usable = {k: v for k, v in state.items() if k in own and k not in bad}
    report.loaded = len(usable)
    if not report.ok:
        text = report.describe(source, backbone)
        if strict:
            raise WeightsError(
                text + "\nSet backbone.strict=false to load the matching tensors anyway "
                "(the others keep their random initialisation)."
            )
        if not usable:
            raise WeightsError(text + "\nNothing matches: these are not weights for this backbone.")
        log.warning("%s\nbackbone.strict=false: loading the %d matching tensors.", text, len(usable))
    model.load_state_dict(usable, strict=False)
    return report
