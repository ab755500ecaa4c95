"""Backbone weights: where they come from, how they are read, and how a mismatch is reported.

Weights from outside are data, not code: files are read with ``torch.load(weights_only=True)`` or
safetensors, so a file carrying pickled code is refused and the code never runs. Sources:

* ``default``: the backbone's official file, downloaded once into the cache (torch.hub's folder by default);
* ``random``: no weights;
* ``https://...``: downloaded once into ``<cache>/urls/<host>/<path>`` with a progress bar;
* ``hf://<owner>/<repo>[@revision]/<path/in/repo>``: fetched once from the Hugging Face Hub into
  ``<cache>/huggingface/<owner>/<repo>/<path/in/repo>``;
* anything else: a local file (``.safetensors`` files are read with safetensors).

The layouts inside a file and their key conversion are in ``neco.models.formats``. Every mismatch between the
converted weights and the model is reported; strict loading (the default) turns any mismatch into a
``WeightsError`` so a pretrained backbone never starts partly random unnoticed.
"""

from __future__ import annotations

import argparse
import hashlib
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

log = logging.getLogger(__name__)

_MAX_REPORTED_KEYS = 10


class WeightsError(RuntimeError):
    """Weights that cannot be found, read or matched to the backbone (a user-fixable problem)."""


# --------------------------------------------------------------------------------------------- sources


def default_cache_dir() -> Path:
    """Where downloaded weights are kept: torch.hub's checkpoint folder, shared with torch.hub itself."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(
    weights: str | os.PathLike, default_url: str | None, backbone: str, cache_dir: str | Path | None = None,
    key: str = "backbone.weights",
) -> Path | None:
    """Turn a ``backbone.weights`` value into a local file, or ``None`` for random initialisation.

    ``key`` is the config key named in error messages (``checkpoint`` for the export app).
    """
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    if not isinstance(weights, str) or not weights:
        raise WeightsError(
            f"{key}={weights!r} is not a weights source: use 'default', 'random', a checkpoint path, "
            "an https:// URL or hf://<owner>/<repo>/<file>."
        )
    if weights == "random":
        return None
    if weights == "default":
        if default_url is None:
            raise WeightsError(
                f"Backbone '{backbone}' has no default pretrained weights: set {key}=random "
                f"for a random initialisation, or {key}=/path/to/checkpoint."
            )
        # Official files keep their own name so the cache is shared with torch.hub.
        return download(default_url, backbone, cache_dir, key=key, flat=True)
    if weights.startswith(("https://", "http://")):
        return download(weights, backbone, cache_dir, key=key)
    if weights.startswith("hf://"):
        return download_hf(weights, backbone, cache_dir, key=key)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"{key}={weights}: no such file. Set {key} to an existing checkpoint file, an https:// URL, "
            "hf://<owner>/<repo>/<file>, 'default' (official weights) or 'random'."
        )
    return path


def _url_cache_path(url: str, cache: Path, flat: bool, key: str) -> Path:
    parsed = urlparse(url)
    name = Path(parsed.path).name
    if not name:
        raise WeightsError(f"{key}={url}: the URL does not end in a file name.")
    if flat:
        return cache / name
    # Host and path keep two releases with the same file name apart (e.g. the ViT-S and ViT-B files of a
    # project are often both called model.ckpt); a query string (download tokens) gets its own folder.
    folder = cache / "urls" / parsed.netloc / Path(parsed.path.lstrip("/")).parent
    if parsed.query:
        folder = folder / hashlib.sha256(parsed.query.encode()).hexdigest()[:12]
    return folder / name


def download(url: str, backbone: str, cache_dir: str | Path | None = None, key: str = "backbone.weights",
             flat: bool = False) -> Path:
    """Fetch ``url`` into the cache once (with a progress bar); later calls reuse the file, also offline."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dst = _url_cache_path(url, cache, flat, key)
    if dst.is_file():
        return dst
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        from filelock import FileLock

        # Several processes (DDP ranks, array jobs) sharing a cache download the file once.
        with FileLock(str(dst) + ".lock"):
            if not dst.is_file():
                log.info("Downloading weights of backbone '%s' from %s to %s", backbone, url, dst)
                # Looked up on torch.hub at call time so tests can stand in for the network. It writes to a
                # temporary file and renames it, so an interrupted download leaves no partial file.
                torch.hub.download_url_to_file(url, str(dst), progress=True)
    except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
        raise WeightsError(
            f"Could not download the weights of backbone '{backbone}' from {url} ({e}). Download the file "
            f"yourself and put it at {dst}, or set {key}=/path/to/file "
            f"({key}=random starts from random weights)."
        ) from None
    return dst


def _parse_hf(spec: str, key: str) -> tuple[str, str | None, str]:
    parts = spec[len("hf://"):].strip("/").split("/")
    if len(parts) < 3 or not all(parts):
        raise WeightsError(f"{key}={spec}: expected hf://<owner>/<repo>[@revision]/<path/in/repo>.")
    repo, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{repo}", revision or None, "/".join(parts[2:])


def download_hf(spec: str, backbone: str, cache_dir: str | Path | None = None,
                key: str = "backbone.weights") -> Path:
    """Fetch ``hf://<owner>/<repo>[@revision]/<file>`` once into ``<cache>/huggingface/...``."""
    repo_id, revision, filename = _parse_hf(spec, key)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    local_dir = cache / "huggingface" / (repo_id + (f"@{revision}" if revision else ""))
    dst = local_dir / filename
    if dst.is_file():  # once fetched, no network call at all (works offline and on compute nodes)
        return dst
    log.info("Downloading weights of backbone '%s' from the Hugging Face Hub (%s) to %s", backbone, spec, dst)
    try:
        import huggingface_hub

        # Looked up at call time so tests can stand in for the network; it shows its own progress bar.
        got = Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, local_dir=local_dir))
    except Exception as e:  # noqa: BLE001 - the hub's error classes differ between versions; all mean "not here"
        raise WeightsError(
            f"Could not fetch {spec} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"Download the file (hf download {repo_id} {filename} --local-dir {local_dir}) so that "
            f"it is at {dst}, or set {key}=/path/to/file."
        ) from None
    if not got.is_file():
        raise WeightsError(f"Fetching {spec} gave no file at {got}. Put the file at {dst} or set {key}.")
    return got


# --------------------------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path, key: str = "backbone.weights") -> Mapping:
    """Read a checkpoint as plain data (tensors, containers, numbers, strings); never run pickled code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise WeightsError(f"{key}={path}: not a readable safetensors file ({e}).") from None
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
            raise WeightsError(f"{key}={path}: not a readable checkpoint (refused by the weights-only "
                               "reader).") from None
        raise WeightsError(
            f"{key}={path}: the file holds pickled objects other than tensors ({found.group(1)}) "
            "and is refused: outside weights are loaded weights-only. Re-save its state dict with "
            "torch.save(model.state_dict(), ...) or as .safetensors."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightsError(f"{key}={path}: not a readable checkpoint ({e}).") from None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{key}={path}: holds a {type(obj).__name__}, not a state dict.")
    return obj


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
    hint: str | None = None,
) -> LoadReport:
    """Load ``state`` into ``model``; any mismatch raises if ``strict``, else is warned about.

    ``hint`` (e.g. which ``backbone.name`` fits the weights) is added to the report.
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
