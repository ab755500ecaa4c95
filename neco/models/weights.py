"""Backbone weights: where they come from, how they are read, and how a mismatch is reported.

Weights from outside are data, not code: files are read with ``torch.load(weights_only=True)`` or
safetensors, so a file carrying pickled code is refused and the code never runs. Sources:

* ``default``: the backbone's official file, downloaded once into the cache (``paths.weights`` by default);
* ``random``: no weights;
* ``https://...``: downloaded once into ``<cache>/urls/<host>/<path>`` with a progress bar;
* ``hf://<owner>/<repo>[@revision]/<path/in/repo>``: fetched once from the Hugging Face Hub into
  ``<cache>/huggingface/<owner>/<repo>/<path/in/repo>``;
* anything else: a local file (``.safetensors`` files are read with safetensors).

Downloads (confined to the cache, length- and checksum-verified) are in ``neco.models.downloads``; the layouts
inside a file and their key conversion in ``neco.models.formats``. Every mismatch between the converted weights
and the model is reported; strict loading (the default) turns any mismatch into a ``WeightsError`` so a
pretrained backbone never starts partly random unnoticed, and weights holding NaN or inf are refused.
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

import torch
import torch.nn as nn

from neco.errors import WeightsError

log = logging.getLogger(__name__)

_MAX_REPORTED_KEYS = 10


# --------------------------------------------------------------------------------------------- sources


def default_cache_dir() -> Path:
    """Where downloaded weights are kept unless told otherwise: ``paths.weights`` of the default config."""
    from neco.models.presets import default_weights_dir

    return default_weights_dir()


def resolve_weights(
    weights: str | os.PathLike, default_url: str | None, backbone: str, cache_dir: str | Path | None = None,
    key: str = "backbone.weights",
) -> Path | None:
    """Turn a ``backbone.weights`` value into a local file, or ``None`` for random initialisation.

    ``key`` is the setting named in error messages (``checkpoint`` for the export app, ``weights`` for the
    Python API). Downloads go to ``cache_dir`` (default: ``default_cache_dir()``), see ``neco.models.downloads``.
    """
    from neco.models import downloads

    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    if not isinstance(weights, str) or not weights:
        raise WeightsError(
            f"{key}={weights!r} is not a weights source: use 'default', 'random', a checkpoint path, "
            "an https:// URL or hf://<owner>/<repo>/<file>."
        )
    if weights == "random":
        return None
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if weights == "default":
        if default_url is None:
            raise WeightsError(
                f"Backbone '{backbone}' has no default pretrained weights: set {key}=random "
                f"for a random initialisation, or {key}=/path/to/checkpoint."
            )
        # Official files keep their own name, as torch.hub names them.
        return downloads.download(default_url, backbone, cache, key=key, flat=True)
    if weights.startswith(("https://", "http://")):
        return downloads.download(weights, backbone, cache, key=key)
    if weights.startswith("hf://"):
        return downloads.download_hf(weights, backbone, cache, key=key)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"{key}={weights}: no such file. Set {key} to an existing checkpoint file, an https:// URL, "
            "hf://<owner>/<repo>/<file>, 'default' (official weights) or 'random'."
        )
    return path


# --------------------------------------------------------------------------------------------- reading


def _reason(err: Exception) -> str:
    """A short, one-line cause of a failed read, without torch's advice to load the file unsafely."""
    text = str(err).strip()
    if "weights_only" in text or not text:
        return "not a checkpoint torch can read" if text else f"{type(err).__name__}: the file ends early"
    first = text.splitlines()[0].split(". ")[0]
    return f"{type(err).__name__}: {first[:160]}"


def read_checkpoint(path: str | Path, key: str = "backbone.weights") -> Mapping:
    """Read a checkpoint as plain data (tensors, containers, numbers, strings); never run pickled code.

    Any file that cannot be read so (damaged, cut short, not a checkpoint) is one ``WeightsError`` naming
    ``key`` and the file.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for corrupt headers
            raise WeightsError(f"{key}={path}: not a readable safetensors file ({_reason(e)}). "
                               f"Set {key} to an undamaged file.") from None
    # DINO full checkpoints carry their argparse namespace; it is plain data, so it is allowed by name.
    ctx = getattr(torch.serialization, "safe_globals", None)
    try:
        if ctx is None:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with ctx([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # the class or function the file asks to call
        if found is None:  # not a pickle torch understands at all
            raise WeightsError(f"{key}={path}: not a readable checkpoint (damaged, or not a torch file). "
                               f"Set {key} to an undamaged checkpoint file.") from None
        raise WeightsError(
            f"{key}={path}: the file holds pickled objects other than tensors ({found.group(1)}) "
            "and is refused: outside weights are loaded weights-only. Re-save its state dict with "
            "torch.save(model.state_dict(), ...) or as .safetensors."
        ) from None
    except MemoryError:
        raise WeightsError(f"{key}={path}: not a readable checkpoint (it asks for more memory than there is; "
                           f"damaged?). Set {key} to an undamaged checkpoint file.") from None
    except Exception as e:  # noqa: BLE001 - damaged files fail anywhere in the unpickler (KeyError, EOFError, ...)
        raise WeightsError(f"{key}={path}: not a readable checkpoint ({_reason(e)}). "
                           f"Set {key} to an undamaged checkpoint file.") from None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{key}={path}: holds a {type(obj).__name__}, not a state dict.")
    return obj


def check_finite(state: Mapping[str, torch.Tensor], source: str, key: str = "backbone.weights") -> None:
    """Refuse weights holding NaN or inf: naming the file, the first such tensor and the setting to change.

    A network with a single non-finite weight outputs NaN everywhere, which only shows much later (a diverging
    loss, a clustering library's error), far from its cause.
    """
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad = value.numel() - int(finite.sum())
                raise WeightsError(
                    f"{key}={source}: tensor '{name}' holds {bad} non-finite values (NaN or inf) of "
                    f"{value.numel()}; these weights are unusable (saved from a run that diverged?). "
                    f"Set {key} to a checkpoint written before that.")


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
    model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool, source: str, backbone: str,
    hint: str | None = None, key: str = "backbone.weights",
) -> LoadReport:
    """Load ``state`` into ``model``; any mismatch raises if ``strict``, else is warned about.

    ``hint`` (e.g. which ``backbone.name`` fits the weights) is added to the report. Tensors holding NaN or inf
    are refused (``check_finite``) whatever ``strict`` says; ``key`` is the setting named then.
    """
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
    check_finite(usable, source, key)
    if not report.ok:
        text = report.describe(source, backbone) + (f"\n{hint}" if hint else "")
        if strict and hint:  # another architecture: loading part of it is not a fix worth suggesting
            raise WeightsError(text)
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
