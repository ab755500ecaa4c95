"""Build the evaluation of one backbone from the config of `python -m neco.eval` and run its protocols."""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from neco.data.workers import cap_workers
from neco.engine.log import environment_info
from neco.engine.setup import resolve_device, resolve_precision, seed_everything
from neco.errors import ConfigError
from neco.eval.context import EXPLICIT_KEY, EvalContext, ProtocolResult
from neco.eval.primitives.features import FeatureExtractor
from neco.eval.results import append_to_table, write_results_json
from neco.models.backbone import Backbone, build_backbone
from neco.models.weights import WeightsError

log = logging.getLogger("neco")

# Protocol name (the option of the `eval` group) -> module exposing run(ctx, cfg) -> ProtocolResult.
PROTOCOLS = {
    "overcluster": "neco.eval.overcluster.protocol",
    "hummingbird": "neco.eval.hummingbird.protocol",
    "linear": "neco.eval.linear.protocol",
    "unsup_seg": "neco.eval.unsupervised.protocol",
    "quick": "neco.eval.quick.protocol",
}


def selected_protocols(eval_cfg: Mapping) -> dict[str, dict]:
    """``{protocol: options}`` from ``cfg.eval`` (``eval=<protocol>`` or ``eval=[p1,p2]``)."""
    eval_cfg = dict(eval_cfg or {})
    chosen = {k: dict(v or {}) for k, v in eval_cfg.items() if isinstance(v, Mapping)}
    unknown = [k for k in chosen if k not in PROTOCOLS]
    if unknown:
        raise ConfigError(f"eval={','.join(unknown)}: unknown protocol; choose from {', '.join(PROTOCOLS)}")
    strays = [k for k, v in eval_cfg.items() if not isinstance(v, Mapping)]
    if strays:
        raise ConfigError(f"eval.{strays[0]}: not an evaluation protocol; training's monitor settings are "
                          f"monitor.{strays[0]}")
    if not chosen:
        raise ConfigError("no evaluation protocol selected: pass eval=<protocol> or "
                          f"'eval=[p1,p2]' with protocols from {', '.join(p for p in PROTOCOLS if p != 'quick')}")
    return chosen


def explicit_options(overrides: list[str], protocol: str) -> list[str]:
    """Top-level option names of ``protocol`` set on the command line (``eval.<protocol>.<key>=...``)."""
    prefix = f"eval.{protocol}."
    keys = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key.startswith(prefix) and not key[len(prefix):].startswith("per_dataset"):
            keys.append(key[len(prefix):].split(".", 1)[0])
    return keys


def load_model(cfg: DictConfig) -> tuple[Backbone, str]:
    """The backbone with the weights to evaluate, and a key identifying those weights for the cache."""
    bcfg = cfg.backbone
    if cfg.checkpoint is None:
        weights = OmegaConf.select(bcfg, "weights", throw_on_missing=False)
        if weights is None or OmegaConf.is_missing(bcfg, "weights"):
            raise ConfigError(f"backbone={bcfg.name} has no default weights: pass checkpoint=PATH or "
                              "backbone.weights=PATH")
        model = build_backbone(bcfg.name, weights=weights, strict=bcfg.strict, cache_dir=cfg.paths.weights,
                               checkpoint_model=bcfg.checkpoint_model)
        return model.eval(), _weights_key(bcfg.name, str(weights), None, bcfg.checkpoint_model)
    path = Path(os.path.expanduser(cfg.checkpoint))
    if not path.is_file():
        raise WeightsError(f"checkpoint={path}: no such file (a run's checkpoints are in "
                           "<run dir>/checkpoints/last.pt)")
    # This project's checkpoints hold {"student", "teacher"}; NeCo Lightning files "model." and "teacher.".
    # Built with the checkpoint directly, so the log names only the weights that are evaluated.
    model = build_backbone(bcfg.name, weights=str(path.resolve()), strict=bcfg.strict,
                           checkpoint_model=cfg.checkpoint_model, key="checkpoint")
    return model.eval(), _weights_key(bcfg.name, str(path), path, cfg.checkpoint_model)


def _weights_key(name: str, weights: str, path: Path | None, which: str) -> str:
    parts = [name, weights, which]
    file = path or (Path(weights) if weights not in ("default", "random") else None)
    if file is not None and file.is_file():
        st = file.stat()
        parts += [str(st.st_size), str(st.st_mtime_ns)]  # a rewritten checkpoint invalidates its cache
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def dataset_getter(cfg: DictConfig):
    """split -> evaluation dataset of ``cfg.data.name`` (built lazily by the context)."""
    from neco.data.eval_datasets import build_eval_dataset

    roots = OmegaConf.to_container(cfg.paths, resolve=True)

    def get(split: str):
        synthetic = None
        if cfg.data.name == "synthetic":
            n = cfg.data.synthetic_images if split.startswith("train") else cfg.synthetic_val_images
            synthetic = {"num_images": n, "image_size": cfg.data.synthetic_size, "seed": cfg.data.synthetic_seed}
        return build_eval_dataset(cfg.data.name, split, roots, synthetic=synthetic)

    return get


def evaluate(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> list[dict]:
    """Run every selected protocol; write results.json (and the table rows); return the records.

    ``overrides``: the command-line overrides; the protocol options they set win over ``per_dataset`` blocks.
    """
    run_dir = Path(run_dir)
    protocols = selected_protocols(OmegaConf.to_container(cfg.eval, resolve=True, enum_to_str=True))
    for name, options in protocols.items():
        options[EXPLICIT_KEY] = explicit_options(list(overrides or []), name)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.precision, device)
    model, model_key = load_model(cfg)
    model.to(device).requires_grad_(False)
    progress = bool(cfg.logger.progress)
    # More loader processes than cores only adds contention; results do not depend on the number.
    num_workers = cap_workers(cfg.num_workers, key="num_workers")
    extractor = FeatureExtractor(model, device=device, amp_dtype=amp_dtype, batch_size=cfg.batch_size,
                                 num_workers=num_workers, model_key=model_key, progress=progress,
                                 cache_dir=cfg.cache_dir if cfg.cache_features else None)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    versions = environment_info(device, cfg.seed)
    get_dataset = dataset_getter(cfg)
    records = []
    for name, options in protocols.items():
        ctx = EvalContext(model=model, patch_size=model.patch_size, embed_dim=model.embed_dim,
                          dataset_name=cfg.data.name, get_dataset=get_dataset, extractor=extractor, device=device,
                          amp_dtype=amp_dtype, out_dir=run_dir / name, seed=cfg.seed, batch_size=cfg.batch_size,
                          num_workers=num_workers, progress=progress, num_figures=cfg.num_figures)
        log.info("evaluating %s with %s on %s", cfg.backbone.name, name, cfg.data.name)
        start = time.perf_counter()
        result: ProtocolResult = importlib.import_module(PROTOCOLS[name]).run(ctx, options)
        seconds = time.perf_counter() - start
        record = {
            "model": cfg.backbone.name,
            "weights": None if cfg.checkpoint else OmegaConf.select(cfg.backbone, "weights"),
            "checkpoint": cfg.checkpoint, "checkpoint_model": cfg.checkpoint_model if cfg.checkpoint else None,
            "data": cfg.data.name, "protocol": name, "options": result.options, "metrics": result.metrics,
            "extra": result.extra, "figures": result.figures, "seconds": round(seconds, 2),
            "run_dir": str(run_dir), "versions": versions,
        }
        records.append(record)
        write_results_json(run_dir / "results.json", records)  # after each protocol: a crash keeps the rest
        summary = ", ".join(f"{k} {v:.2f}" for k, v in result.metrics.items() if isinstance(v, float))
        log.info("%s on %s: %s (%.0f s)", name, cfg.data.name, summary, seconds)
        print(f"{name}: {summary}")
    _pca_figure(ctx, run_dir)
    tables = []
    if cfg.append_table:
        csv_path, md_path = append_to_table(cfg.paths.results, records)
        tables = [Path(csv_path), Path(md_path)]
    from neco.summary import eval_summary

    print("\n" + eval_summary(run_dir, records, tables), flush=True)
    return records


def _pca_figure(ctx: EvalContext, run_dir: Path) -> None:
    """PCA-to-RGB maps of the features of the first validation images (one picture of what was evaluated)."""
    from neco.eval.primitives.features import resize_image
    from neco.viz import save_feature_pca_figure

    dataset = ctx.dataset("val")
    n = min(ctx.num_figures, len(dataset))
    size = 14 * 32 if ctx.patch_size == 14 else ctx.patch_size * 28
    feats, _ = ctx.extractor.extract(dataset, size, indices=range(n), desc="features for the PCA figure")
    images = torch.stack([torch.from_numpy(resize_image(dataset[i][0], size).copy()).permute(2, 0, 1)
                          for i in range(n)]).float() / 255.0
    save_feature_pca_figure(images, feats.float(), run_dir / "figures" / "feature_pca.png")
