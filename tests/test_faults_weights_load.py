"""Weights that load but are unusable (NaN, inf) or unreadable, through every entry point (train, eval, export on
the command line, and the Python API); and the Python API's parity with the command line (names, cache, wording)."""

import dataclasses
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import randomize_

from neco import api as neco
from neco.engine.checkpoint import ResumeError, load_checkpoint
from neco.models import BACKBONES, WeightsError
from neco.models.backbone import create_vit
from neco.models.presets import default_weights_dir, presets

ROOT = Path(__file__).resolve().parents[1]
FIRST_BAD = "blocks.1.attn.qkv.weight"  # the first non-finite tensor in state-dict order


def tiny_state(seed=0):
    return randomize_(create_vit(BACKBONES["vit_tiny"]), seed=seed).state_dict()


def poisoned(state, prefix=""):
    """``state`` with 3 NaNs in FIRST_BAD and an inf in a later tensor."""
    state = {f"{prefix}{k}": v.clone() for k, v in state.items()}
    state[f"{prefix}{FIRST_BAD}"].view(-1)[:3] = float("nan")
    state[f"{prefix}blocks.3.mlp.fc2.bias"][0] = float("inf")
    return state


def training_checkpoint(student, teacher, step=3):
    """The layout of this project's checkpoints (the parts the loaders read)."""
    return {"student": student, "teacher": teacher, "step": step, "config": {"backbone": {"name": "vit_tiny"}}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    good = tiny_state()
    paths = {"nan_weights": folder / "nan.pth", "nan_run": folder / "nan_run.pt", "random": folder / "random.pt",
             "good_run": folder / "good_run.pt"}
    torch.save(poisoned(good), paths["nan_weights"])
    torch.save(training_checkpoint(poisoned(good, "backbone."), poisoned(good, "backbone.")), paths["nan_run"])
    torch.save(training_checkpoint({f"backbone.{k}": v for k, v in good.items()},
                                   {f"backbone.{k}": v for k, v in tiny_state(1).items()}), paths["good_run"])
    paths["random"].write_bytes(random.Random(0).randbytes(4096))
    return paths


# ------------------------------------------------------------------------------------------- non-finite weights


def test_python_api_refuses_nan_weights_naming_the_first_tensor(files, tmp_path):
    path = files["nan_weights"]
    for strict in (True, False):  # strict=False loads what matches, never what is broken
        with pytest.raises(WeightsError) as err:
            neco.load_backbone("vit_tiny", weights=path, strict=strict)
        msg = str(err.value)
        assert msg.startswith(f"weights={path}: tensor '{FIRST_BAD}' holds 3 non-finite values"), msg
        assert "Set weights to" in msg and "backbone." not in msg and "\n" not in msg
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in poisoned(tiny_state()).items()}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(WeightsError, match=f"tensor '{FIRST_BAD}'"):
        neco.load_backbone("vit_tiny", weights=tmp_path / "nan.safetensors")
    with pytest.raises(WeightsError, match=f"name={files['nan_run']}.*tensor '{FIRST_BAD}'"):
        neco.load_backbone(str(files["nan_run"]))  # a checkpoint given as the name


def test_resume_refuses_nan_and_damaged_checkpoints(files):
    with pytest.raises(ResumeError) as err:
        load_checkpoint(files["nan_run"])
    msg = str(err.value)
    assert msg.startswith(f"resume={files['nan_run']} (student): tensor 'backbone.{FIRST_BAD}' holds 3 non-finite")
    assert "resume=null" in msg and "\n" not in msg
    with pytest.raises(ResumeError) as err:
        load_checkpoint(files["random"])
    assert str(err.value).startswith(f"resume={files['random']}: not a readable checkpoint")
    assert "weights_only" not in str(err.value)
    assert load_checkpoint(files["good_run"])["step"] == 3


TRAIN = ["experiment=quickstart", "monitor.name=none", "logger.progress=false", "data.batch_size=2",
         "data.synthetic_images=4", "data.synthetic_size=48", "data.global_size=32", "data.local_size=16",
         "loss.roi_size=3", "loss.head.hidden_dim=32", "loss.head.out_dim=16", "max_steps=1"]
EVAL = ["data=synthetic", "backbone=vit_tiny", "logger.progress=false"]


@pytest.mark.parametrize("app, args, file, expected", [
    ("neco.train", TRAIN + ["backbone.weights={nan_weights}"], "nan_weights",
     f"error: backbone.weights={{}}: tensor '{FIRST_BAD}' holds 3 non-finite"),
    ("neco.train", TRAIN + ["resume={nan_run}"], "nan_run",
     f"error: resume={{}} (student): tensor 'backbone.{FIRST_BAD}' holds 3 non-finite"),
    ("neco.train", TRAIN + ["resume={random}"], "random", "error: resume={}: not a readable checkpoint"),
    ("neco.eval", EVAL + ["checkpoint={nan_run}"], "nan_run",
     f"error: checkpoint={{}}: tensor '{FIRST_BAD}' holds 3 non-finite"),
    ("neco.eval", EVAL + ["checkpoint={random}"], "random", "error: checkpoint={}: not a readable checkpoint"),
    ("neco.export", ["checkpoint={nan_run}"], "nan_run",
     f"error: checkpoint={{}}: tensor '{FIRST_BAD}' holds 3 non-finite"),
    ("neco.export", ["checkpoint={random}", "backbone=vit_tiny"], "random",
     "error: checkpoint={}: not a readable checkpoint"),
])
def test_entry_points_stop_with_one_line(app, args, file, expected, files, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", NECO_OUTPUT=str(tmp_path / "out"))
    args = [a.format(**files) for a in args]
    proc = subprocess.run([sys.executable, "-m", app, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected.format(files[file])), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "weights_only" not in proc.stderr
    assert not list((tmp_path / "out").rglob("*.pth")) and not list((tmp_path / "out").rglob("*.safetensors"))


# ------------------------------------------------------------------------------------------- API and CLI parity


def cli_backbone(name: str) -> tuple[str, object]:
    """``backbone.name`` and ``backbone.weights`` of the command line's ``backbone=<name>``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import neco.config  # noqa: F401  (registers the typed schemas the configs' defaults name)

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("export", [f"backbone={name}", "checkpoint=x"])
    weights = None if OmegaConf.is_missing(cfg.backbone, "weights") else cfg.backbone.weights
    return cfg.backbone.name, weights


def test_every_backbone_preset_is_a_load_backbone_name(tmp_path, monkeypatch):
    import email.message
    import io
    import urllib.response

    names = sorted(p.stem for p in (ROOT / "conf" / "backbone").glob("*.yaml"))
    assert set(presets()) == set(names) and {"neco_vits14", "leopart_vits16", "vit_tiny"} <= set(names)
    served = {}

    def urlopen(url, *args, **kwargs):
        headers = email.message.Message()
        headers["Content-Length"] = str(len(served[url]))
        return urllib.response.addinfourl(io.BytesIO(served[url]), headers, url, 200)

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    for name in names:
        # A cache per preset: the _reg and _xr presets share an official file, each test file is its own.
        monkeypatch.setenv("NECO_WEIGHTS", str(tmp_path / "cache" / name))
        arch, weights = cli_backbone(name)
        assert presets()[name].architecture == arch and presets()[name].weights == weights
        spec = dataclasses.replace(BACKBONES[arch], timm_kwargs={**BACKBONES[arch].timm_kwargs, "depth": 1})
        monkeypatch.setitem(BACKBONES, arch, spec)  # one block: same names, a fraction of the memory
        state = create_vit(spec).state_dict()  # timm initialises every tensor randomly
        torch.save(state, tmp_path / f"{name}.pth")
        model = neco.load_backbone(name, weights=tmp_path / f"{name}.pth")
        assert model.name == arch and torch.equal(model.cls_token, state["cls_token"])
        if weights is None:  # the preset's weights are the user's to give
            with pytest.raises(WeightsError, match=rf"load_backbone\('{name}'\) needs the weights you give: "
                                                   rf"load_backbone\('{name}', weights='/path/to/checkpoint'\)"):
                neco.load_backbone(name)
        elif spec.weights_url is None:
            with pytest.raises(WeightsError, match="has no default pretrained weights: set weights=random"):
                neco.load_backbone(name)
        else:  # the official file, fetched into the same cache as the command line's
            served[spec.weights_url] = (tmp_path / f"{name}.pth").read_bytes()
            model = neco.load_backbone(name)
            assert torch.equal(model.cls_token, state["cls_token"])
            assert (tmp_path / "cache" / name / spec.weights_url.rsplit("/", 1)[1]).is_file()


def test_api_cache_is_the_cli_paths_weights(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    def cli_weights_dir():
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            return Path(compose("export", ["checkpoint=x"]).paths.weights)

    monkeypatch.delenv("NECO_WEIGHTS", raising=False)
    monkeypatch.setenv("NECO_ROOT", str(tmp_path / "root"))
    assert default_weights_dir() == cli_weights_dir() == tmp_path / "root" / "weights"
    monkeypatch.setenv("NECO_WEIGHTS", str(tmp_path / "w"))
    assert default_weights_dir() == cli_weights_dir() == tmp_path / "w"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.save(tiny_state(), tmp_path / "payload.pth")
    payload = (tmp_path / "payload.pth").read_bytes()
    import email.message
    import io
    import urllib.response

    def urlopen(url, *args, **kwargs):
        headers = email.message.Message()
        headers["Content-Length"] = str(len(payload))
        return urllib.response.addinfourl(io.BytesIO(payload), headers, url, 200)

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    neco.load_backbone("vit_tiny", weights="https://host/v1/w.pth")
    assert (tmp_path / "w" / "urls" / "host" / "v1" / "w.pth").is_file() and not (tmp_path / "torch").exists()
    neco.load_backbone("vit_tiny", weights="https://host/v2/w.pth", cache_dir=tmp_path / "mine")
    assert (tmp_path / "mine" / "urls" / "host" / "v2" / "w.pth").is_file()


def test_a_checkpoint_as_the_name(files, tmp_path):
    model = neco.load_backbone(str(files["good_run"]))
    assert model.name == "vit_tiny" and torch.equal(model.cls_token, tiny_state()["cls_token"])
    teacher = neco.load_backbone(str(files["good_run"]), checkpoint_model="teacher")
    assert torch.equal(teacher.cls_token, tiny_state(1)["cls_token"])
    torch.save(tiny_state(), tmp_path / "plain.pth")
    with pytest.raises(WeightsError, match=r"does not record its backbone: call load_backbone\('<backbone name>'"):
        neco.load_backbone(str(tmp_path / "plain.pth"))
    with pytest.raises(ValueError, match="either as the name or as weights=, not both"):
        neco.load_backbone(str(files["good_run"]), weights="random")
    with pytest.raises(ValueError, match="Unknown backbone 'vit_huge'.*neco_vits14"):
        neco.load_backbone("vit_huge")


def test_api_errors_name_arguments_not_config_keys(files, tmp_path, monkeypatch):
    state = tiny_state()
    torch.save({k: v for k, v in state.items() if k != "norm.bias"}, tmp_path / "partial.pth")
    torch.save(state, tmp_path / "tiny.pth")
    monkeypatch.setitem(BACKBONES, "dino_vits16", dataclasses.replace(BACKBONES["dino_vits16"],
                                                                       timm_kwargs={"depth": 1}))
    cases = [
        (dict(name="vit_tiny", weights=tmp_path / "missing.pth"), "Set weights to an existing checkpoint file"),
        (dict(name="vit_tiny", weights=tmp_path / "partial.pth"), "Set strict=False to load the matching"),
        (dict(name="dino_vits16", weights=tmp_path / "tiny.pth"), "Set name to the matching architecture"),
        (dict(name="vit_tiny", weights=files["good_run"], checkpoint_model="ema"), "checkpoint_model='ema'"),
        (dict(name="vit_tiny", weights=files["random"]), "Set weights to an undamaged checkpoint file"),
        (dict(name="vit_tiny", weights="https://host/../x.pth"), "weights=https://host/../x.pth: the path holds"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(WeightsError) as err:
            neco.load_backbone(kwargs.pop("name"), **kwargs)
        assert expected in str(err.value) and "backbone." not in str(err.value), str(err.value)
