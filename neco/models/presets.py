"""What the command line's configs say about backbones and the weights cache, for code that runs without Hydra.

The Python API accepts the same backbone names as ``backbone=<name>`` on the command line (the presets of
``conf/backbone/``, e.g. ``neco_vits14`` is the ``dinov2_vits14`` architecture with weights you give) and keeps
downloads in the same folder (``paths.weights`` of ``conf/paths/default.yaml``: ``$NECO_WEIGHTS``, else
``$NECO_ROOT/weights``, else ``./weights``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from neco.project import conf_dir

CONF_DIR = conf_dir()


@dataclass(frozen=True)
class Preset:
    """One file of ``conf/backbone/``: the architecture and its weights (``None``: the user must give them)."""

    name: str  # the preset's name (``backbone=<name>``)
    architecture: str  # the registry name it builds (``backbone.name``)
    weights: str | None


def presets() -> dict[str, Preset]:
    """Every backbone preset of ``conf/backbone/`` by name (empty where the configs are not installed)."""
    from omegaconf import OmegaConf

    found = {}
    for file in sorted((CONF_DIR / "backbone").glob("*.yaml")):
        cfg = OmegaConf.load(file)
        weights = None if OmegaConf.is_missing(cfg, "weights") else cfg.get("weights")
        found[file.stem] = Preset(file.stem, str(cfg.name), None if weights is None else str(weights))
    return found


def default_weights_dir() -> Path:
    """``paths.weights`` as the command line resolves it by default (environment variables included)."""
    from omegaconf import OmegaConf

    default = CONF_DIR / "paths" / "default.yaml"
    if not default.is_file():  # the configs are not installed: the same rule as that file's
        root = os.environ.get("NECO_ROOT", ".")
        return Path(os.environ.get("NECO_WEIGHTS", f"{root}/weights")).expanduser()
    layers = [OmegaConf.load(default)]
    local = CONF_DIR / "paths" / "local" / "default.yaml"  # a machine's own paths, as Hydra merges them
    if local.is_file():
        layers.append(OmegaConf.load(local))
    paths = OmegaConf.merge(*layers)
    return Path(str(paths.weights)).expanduser()
