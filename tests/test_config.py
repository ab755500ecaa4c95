"""Every config composes, the presets carry the published values, and typos fail at compose time."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

import neco.config  # noqa: F401
import neco.eval.config  # noqa: F401  (the schema of `python -m neco.eval`)

CONF = Path(__file__).resolve().parents[1] / "conf"


def _compose(overrides=(), config="train"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config, overrides=list(overrides))


def _is_protocol(path: Path) -> bool:
    """Evaluation protocols (`python -m neco.eval`) live in conf/eval/ under `# @package eval.<name>`."""
    return path.read_text().startswith("# @package eval.")


def _options(group: str) -> list[str]:
    root = CONF / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml") if not _is_protocol(p))


PROTOCOLS = sorted(p.stem for p in (CONF / "eval").glob("*.yaml") if _is_protocol(p))


def test_every_protocol_composes_for_evaluation():
    import importlib

    from neco.eval.context import typed_options
    from neco.eval.runner import PROTOCOLS as REGISTERED

    assert set(PROTOCOLS) == set(REGISTERED)
    cfg = _compose([f"eval=[{','.join(PROTOCOLS)}]"], config="evaluate")
    for name in PROTOCOLS:
        module = importlib.import_module(REGISTERED[name])
        schema = next(v for k, v in vars(module).items() if k.endswith("Options") and isinstance(v, type))
        options = OmegaConf.to_container(cfg.eval[name], resolve=True)
        # The yaml lists the schema's defaults, and every per-dataset block is valid for the schema.
        for dataset in ["voc", *options.get("per_dataset", {})]:
            typed_options(schema, options, dataset, name)
        defaults = OmegaConf.to_container(OmegaConf.structured(schema))
        # Values that follow another setting (the quick check's sizes follow the training preset's monitor) are
        # checked against that setting instead.
        follows = {k for k in options if OmegaConf.is_interpolation(cfg.eval[name], k)}
        listed = {k: v for k, v in options.items() if k != "per_dataset" and k not in follows}
        assert listed == {k: defaults[k] for k in listed}, name
        assert all(options[k] == cfg.monitor[k] for k in follows), name


def test_every_experiment_composes_for_evaluation():
    for option in _options("experiment"):
        cfg = _compose([f"experiment={option}", "eval=overcluster"], config="evaluate")
        assert "overcluster" in cfg.eval


@pytest.mark.parametrize("group", ["backbone", "data", "loss", "optim", "monitor", "logger", "paths", "debug",
                                   "experiment"])
def test_every_option_composes(group):
    for option in _options(group):
        cfg = _compose([f"{group}={option}"])
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves...
        if group == "experiment" and OmegaConf.is_missing(cfg.backbone, "weights"):
            continue  # ...except presets that need a user checkpoint (leopart, timetuning, dev)


def test_default_is_the_published_vits14_recipe():
    cfg = _compose(["backbone=dinov2_vits14", "data=coco"])
    assert cfg.backbone.name == "dinov2_vits14" and cfg.backbone.weights == "default"
    assert (cfg.data.global_size, cfg.data.local_size, cfg.data.batch_size) == (518, 98, 64)
    assert (cfg.optim.epochs, cfg.optim.lr_backbone, cfg.optim.lr_heads) == (25, 1e-5, 1e-4)
    assert cfg.loss.references == "queue" and cfg.loss.queue_length == 8192
    assert (cfg.loss.student_steepness, cfg.loss.teacher_steepness) == (100.0, 100.0)
    assert (cfg.loss.network, cfg.loss.distribution, cfg.loss.similarity) == ("bitonic", "cauchy", "cosine")
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (0.04, 0.5)
    assert (cfg.optim.momentum_teacher, cfg.optim.momentum_teacher_end) == (0.9995, 1.0)
    assert cfg.backbone.drop_path_rate == 0.1 and cfg.loss.roi_size == 7 and cfg.loss.mask == "all"
    assert list(cfg.data.global_scale) == [0.25, 1.0] and list(cfg.data.local_scale) == [0.05, 0.25]
    assert (cfg.data.num_global, cfg.data.num_local, cfg.data.min_intersection) == (2, 4, 0.01)
    assert (cfg.loss.head.hidden_dim, cfg.loss.head.out_dim, cfg.loss.head.num_layers) == (2048, 256, 3)
    assert cfg.optim.trainable_blocks is None and cfg.optim.grad_clip is None
    assert cfg.seed == 400


# METHOD.md §8.2: config -> (backbone preset, global crop, batch, epochs, lr_backbone, queue)
PUBLISHED = {
    "neco_224x224": ("dinov2_vits14_reg", 224, 6, 50, 1e-6, False),
    "neco_518x518": ("dinov2_vits14_reg", 518, 6, 50, 1e-6, False),
    "neco_config_dev": ("dinov2_vits14", 224, 55, 50, 1e-6, False),
    "small/neco_dinov2": ("dinov2_vits14", 518, 64, 25, 1e-5, True),
    "small/neco_dinov2r": ("dinov2_vits14_reg", 518, 64, 25, 1e-5, True),
    "small/neco_dinov2r_xr": ("dinov2_vits14_xr", 518, 64, 25, 1e-5, True),
    "small/neco_dino": ("dino_vits16", 224, 45, 50, 1e-5, False),
    "small/neco_leopart": ("dino_vits16", 224, 45, 50, 1e-5, False),
    "small/neco_timetuning": ("dino_vits16", 224, 45, 50, 1e-5, False),
    "base/neco_dinov2": ("dinov2_vitb14", 518, 16, 25, 5e-6, True),
    "base/neco_dinov2r": ("dinov2_vitb14_reg", 518, 16, 25, 1e-6, True),
    "base/neco_dinov2r_xr": ("dinov2_vitb14_xr", 518, 16, 25, 1e-6, True),
}
# METHOD.md §8.3: ablation -> (dataset, network, student steepness, teacher steepness, use_teacher, mask)
ABLATIONS = {
    "steepness_100_100": ("coco", "bitonic", 100, 100, True, "all"),
    "steepness_1000_1000": ("coco", "bitonic", 1000, 1000, True, "all"),
    "steepness_100_1000": ("coco", "bitonic", 100, 1000, True, "all"),
    "steepness_10_100": ("coco", "bitonic", 10, 100, True, "all"),
    "steepness_10_1000": ("coco", "bitonic", 10, 1000, True, "all"),
    "steepness_odd_even": ("coco", "odd_even", 100, 100, True, "all"),
    "steepness_voc": ("voc", "odd_even", 100, 100, True, "all"),
    "steepness_in100": ("imagenet100", "odd_even", 100, 100, True, "all"),
    "steepness_no_teacher": ("voc", "odd_even", 100, 100, False, "all"),
    "steepness_fg": ("voc", "odd_even", 100, 100, True, "fg"),
    "steepness_bg": ("voc", "odd_even", 100, 100, True, "bg"),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_training_presets_match_spec(name):
    backbone, size, batch, epochs, lr, queue = PUBLISHED[name]
    cfg = _compose([f"experiment={name}"])
    assert cfg.backbone.name == backbone
    assert cfg.backbone.strict and cfg.backbone.drop_path_rate == 0.1
    assert (cfg.data.name, cfg.data.global_size, cfg.data.local_size) == ("coco", size, 98)
    assert (cfg.data.batch_size, cfg.optim.epochs, cfg.optim.lr_backbone) == (batch, epochs, lr)
    assert cfg.loss.references == ("queue" if queue else "batch")
    assert (cfg.loss.student_steepness, cfg.loss.teacher_steepness, cfg.loss.network) == (100, 100, "bitonic")
    assert cfg.optim.lr_heads == 1e-4 and cfg.loss.queue_length == 8192 and cfg.loss.mask == "all"
    needs_checkpoint = name in ("neco_config_dev", "small/neco_leopart", "small/neco_timetuning")
    assert OmegaConf.is_missing(cfg.backbone, "weights") == needs_checkpoint


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_presets_match_spec(name):
    data, network, beta_s, beta_t, use_teacher, mask = ABLATIONS[name]
    cfg = _compose([f"experiment=ablations/ablation_{name}"])
    assert cfg.backbone.name == "dinov2_vits14_xr"  # dinov2-reg weights without registers
    assert (cfg.data.name, cfg.data.global_size, cfg.data.batch_size) == (data, 224, 55)
    assert (cfg.optim.epochs, cfg.optim.lr_backbone, cfg.loss.references) == (50, 1e-6, "batch")
    assert (cfg.loss.network, cfg.loss.student_steepness, cfg.loss.teacher_steepness) == (network, beta_s, beta_t)
    assert (cfg.loss.use_teacher, cfg.loss.mask) == (use_teacher, mask)


def test_quickstart_preset_is_small():
    cfg = _compose(["experiment=quickstart"])
    assert cfg.backbone.name == "vit_tiny" and cfg.data.name == "synthetic" and cfg.monitor.name == "quick"
    assert Path(cfg.backbone.weights).is_file(), "the quickstart's starting checkpoint ships with the package"


@pytest.mark.parametrize("override,exc,needle", [
    ("loss.studnet_steepness=3", ConfigCompositionException, "loss.studnet_steepness"),
    ("loss.roi_size=seven", ConfigCompositionException, "loss.roi_size"),
    ("optim.epochs=1.5", ConfigCompositionException, "optim.epochs"),
    ("backbone=vit_huge", MissingConfigException, "dinov2_vits14"),  # lists the valid options
])
def test_compose_errors_name_the_key(override, exc, needle):
    with pytest.raises(exc) as info:
        _compose([override])
    text = str(info.value) + str(info.value.__cause__ or "")
    assert needle in text
