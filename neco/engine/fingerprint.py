"""What a resumed run must keep from the run it continues, and the list of what changed.

The fingerprint is the resolved config minus the settings that do not shape the data stream, the model or the
schedules from the checkpoint on: where the run writes and logs, how often it checkpoints, when it stops
(`max_steps`; the schedules span `optim.epochs`), loader processes, evaluation, the device, how the sort is
computed (`loss.sorter`), and the starting weights (the checkpoint replaces them). Any other difference refuses
the resume, unless `resume_force=true`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

from neco.config import TrainConfig
from neco.engine.checkpoint import ResumeError

# Keys (or key prefixes ending in ".") a resume may change on purpose. loss.sorter picks how the same function is
# computed (sparse, triton and dense agree up to float rounding, tests/test_triton_sort.py), like device and
# compile: a run started with sparse (the earlier default) resumes under auto, and on another device.
MAY_CHANGE = (
    "max_steps", "checkpoint_every", "keep_checkpoints", "resume", "resume_force", "run_name", "device",
    "compile", "loss.sorter", "logger.", "paths.", "monitor.", "data.num_workers",
    "backbone.weights", "backbone.strict", "backbone.checkpoint_model",
)


class ResumeRefused(ResumeError):
    """The configuration differs from the checkpoint's in a setting that shapes the run."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def schema_defaults() -> dict[str, Any]:
    return _flatten(OmegaConf.to_container(OmegaConf.structured(TrainConfig), enum_to_str=True))


def _may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


def fingerprint(cfg: DictConfig | dict) -> dict[str, Any]:
    """The settings a resume must keep, flattened to dotted keys."""
    tree = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True) if isinstance(cfg, DictConfig) else cfg
    return {k: v for k, v in _flatten(tree).items() if not _may_change(k)}


def digest(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list]:
    """`{key: [old, new]}` for every key whose value differs (a missing key reads as "<unset>")."""
    missing = "<unset>"
    return {k: [old.get(k, missing), new.get(k, missing)] for k in sorted(set(old) | set(new))
            if old.get(k, missing) != new.get(k, missing)}


def config_changes(old_config: dict, cfg: DictConfig) -> dict[str, list]:
    """Every setting of `cfg` that differs from the checkpoint's resolved config, allowed or not."""
    return differences(_flatten(old_config), _flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)))


def check_resume(checkpoint: dict, cfg: DictConfig, path, force: bool) -> dict[str, list]:
    """Compare the checkpoint's fingerprint with `cfg`'s; refuse a difference unless `force`. Returns the
    differences (empty when none)."""
    old = checkpoint.get("fingerprint")
    if old is None:  # written before fingerprints were stored: derive it from the checkpoint's config
        old = fingerprint(checkpoint.get("config") or {})
    new = fingerprint(cfg)
    defaults = schema_defaults()
    # A setting added to the code after the checkpoint was written, at its default (which keeps the earlier
    # behaviour), or one the code no longer has, is not a change of this run.
    changed = {k: v for k, v in differences(old, new).items()
               if not (k not in old and new[k] == defaults.get(k, "<none>")) and k in new}
    if changed and not force:
        listed = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
        raise ResumeRefused(
            f"resume: {path} was trained with another configuration ({listed}); use the checkpoint's values, "
            "start a new run (another run_name, or resume=null), or set resume_force=true to resume anyway")
    return changed
