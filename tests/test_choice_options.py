"""Every choice option is an enum of the schema: a wrong value fails when the config is composed (not silently
at run time), in one line naming the key and the valid values; a right one reaches the code as a plain string."""

import dataclasses
import enum
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from neco import choices as choice_enums
from neco.config import ExportConfig, TrainConfig
from neco.errors import ConfigError
from neco.eval.config import EvalAppConfig
from neco.eval.context import options_dict, typed_options
from neco.eval.hummingbird.protocol import HummingbirdOptions
from neco.eval.linear.protocol import LinearOptions
from neco.eval.overcluster.protocol import OverclusterOptions
from neco.eval.quick.protocol import QuickOptions
from neco.eval.unsupervised.protocol import UnsupSegOptions
from neco.overrides import check_overrides

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
WRONG = "no_such_choice"


def choice_fields(schema: type, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted key, enum type) of every enum-typed field of ``schema``, nested dataclasses included."""
    found = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            found.append((prefix + f.name, tp))
        elif dataclasses.is_dataclass(tp):
            found += choice_fields(tp, f"{prefix}{f.name}.")
    return found


TRAIN = choice_fields(TrainConfig)
EVAL_APP = [(k, t) for k, t in choice_fields(EvalAppConfig) if (k, t) not in TRAIN]
EXPORT = choice_fields(ExportConfig)
PROTOCOLS = {"hummingbird": HummingbirdOptions, "linear": LinearOptions, "overcluster": OverclusterOptions,
             "quick": QuickOptions, "unsup_seg": UnsupSegOptions}
PROTOCOL_CHOICES = [(p, k, t) for p, schema in PROTOCOLS.items() for k, t in choice_fields(schema)]


def test_the_known_silent_options_are_typed():
    keys = {k for k, _ in TRAIN}
    assert {"optim.ema_timing", "optim.zero_loss_step", "loss.distribution", "loss.mask", "precision",
            "logger.name", "data.on_bad_image", "backbone.drop_path_mode", "monitor.name"} <= keys
    assert {("hummingbird", "memory_norm"), ("linear", "label_resize"), ("unsup_seg", "angles")} <= {
        (p, k) for p, k, _ in PROTOCOL_CHOICES}


def test_the_evaluation_datasets_agree():
    from neco.choices import EvalDataset
    from neco.data.eval_datasets import EVAL_DATASETS

    assert tuple(EvalDataset.__members__) == EVAL_DATASETS


def _expect_one_line(message: str, key: str, choices: type[enum.Enum]):
    assert "\n" not in message
    assert f"{key}={WRONG} is not a valid choice" in message
    assert "choose one of: " + ", ".join(choices.__members__) in message


@pytest.mark.parametrize("config,schema,key,choices", [("train", TrainConfig, k, t) for k, t in TRAIN]
                         + [("evaluate", EvalAppConfig, k, t) for k, t in EVAL_APP]
                         + [("export", ExportConfig, k, t) for k, t in EXPORT], ids=lambda v: getattr(v, "__name__", v))
def test_a_wrong_choice_fails_at_compose_time(config, schema, key, choices):
    # The command line: checked before Hydra composes, one line.
    with pytest.raises(ConfigError) as err:
        check_overrides([f"{key}={WRONG}"], schema)
    _expect_one_line(str(err.value), key, choices)
    # Composition itself (YAML presets, the compose API) rejects it too, naming the key and the valid names.
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as err:
            # export composes backbone.* only where a backbone is selected
            extra = ["backbone=dinov2_vits14"] if config == "export" and key.startswith("backbone.") else []
            compose(config, overrides=[*extra, f"{key}={WRONG}"])
    text = f"{err.value} {err.value.__cause__}"
    assert key in text and f"expected one of [{', '.join(choices.__members__)}]" in text
    # Every valid name composes.
    for name in choices.__members__:
        check_overrides([f"{key}={name}"], schema)


@pytest.mark.parametrize("protocol,key,choices", PROTOCOL_CHOICES, ids=lambda v: getattr(v, "__name__", v))
def test_a_wrong_protocol_choice_is_one_line(protocol, key, choices):
    with pytest.raises(ConfigError) as err:
        typed_options(PROTOCOLS[protocol], {key: WRONG}, protocol=protocol)
    _expect_one_line(str(err.value), f"eval.{protocol}.{key}", choices)
    for name in choices.__members__:
        opts = typed_options(PROTOCOLS[protocol], {key: name}, protocol=protocol)
        assert getattr(opts, key) == name
        assert json.loads(json.dumps(options_dict(opts)))[key] == name
        assert type(options_dict(opts)[key]) is str  # saved heads are read back with weights_only=True


@pytest.mark.parametrize("protocol", ["hummingbird", "linear", "overcluster", "unsup_seg"])
def test_the_protocol_presets_hold_valid_choices(protocol):
    """The shipped options of each protocol, for every dataset block, are valid values of its choices."""
    options = OmegaConf.load(CONF / "eval" / f"{protocol}.yaml")
    for dataset in [None, *options.get("per_dataset", {})]:
        typed_options(PROTOCOLS[protocol], options, dataset, protocol)


def test_a_sweep_with_one_wrong_choice_is_refused():
    with pytest.raises(ConfigError, match="loss.mask=bgg is not a valid choice \\(did you mean bg\\?\\)"):
        check_overrides(["loss.mask=fg,bgg"], TrainConfig)
    check_overrides(["loss.mask=fg,bg", "optim.ema_timing=EmaTiming.after_step"], TrainConfig)


def test_choices_compare_print_and_round_trip_as_plain_names():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["optim.ema_timing=after_step", "data.on_bad_image=raise"])
    assert cfg.optim.ema_timing == "after_step" and f"{cfg.optim.ema_timing}" == "after_step"
    assert cfg.data.on_bad_image == "raise" and {"raise": 1}[cfg.data.on_bad_image] == 1
    text = OmegaConf.to_yaml(cfg, resolve=True)  # config.yaml
    assert "ema_timing: after_step" in text and "on_bad_image: raise" in text
    resumed = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(text))
    assert resumed.optim.ema_timing == "after_step" and resumed.data.on_bad_image == "raise"
    info = json.loads(json.dumps({"optim.ema_timing": cfg.optim.ema_timing}))  # run_info.json
    assert info == {"optim.ema_timing": "after_step"}
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # a checkpoint's "config"
    assert type(plain["optim"]["ema_timing"]) is str


def _run(module, *args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NECO_OUTPUT": str(cwd / "out")}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def _assert_one_line_exit_2(proc, needle):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr[-2000:]


def test_train_cli_refuses_a_misspelt_choice(tmp_path):
    proc = _run("neco.train", "optim.ema_timing=afterstep", "--cfg", "job", cwd=tmp_path)
    _assert_one_line_exit_2(proc, "optim.ema_timing=afterstep is not a valid choice (did you mean after_step?); "
                                  "choose one of: before_step, after_step")


def test_eval_cli_refuses_a_misspelt_protocol_choice_before_anything_runs(tmp_path):
    # Checked with the command line: a typo in the last of several protocols does not wait for the others.
    proc = _run("neco.eval", "eval=[overcluster,hummingbird]", "eval.hummingbird.memory_norm=per_image",
                "--cfg", "job", cwd=tmp_path)
    _assert_one_line_exit_2(proc, "eval.hummingbird.memory_norm=per_image is not a valid choice (did you mean "
                                  "per_image_axis_v1?); choose one of: per_patch, per_image_axis_v1")
    proc = _run("neco.eval", "eval=[overcluster,hummingbird]", "eval.hummingbird.memory_norm=per_image_axis_v1",
                "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0 and "memory_norm: per_image_axis_v1" in proc.stdout, proc.stderr[-2000:]


def test_protocol_options_are_looked_up_for_every_protocol():
    from neco.eval.config import PROTOCOL_OPTIONS, protocol_option_type
    from neco.eval.runner import PROTOCOLS as RUN

    assert set(PROTOCOL_OPTIONS) == set(RUN) and set(PROTOCOLS) == set(RUN)
    for protocol, key, choices in PROTOCOL_CHOICES:
        assert protocol_option_type(f"eval.{protocol}.{key}") is choices
        with pytest.raises(ConfigError, match=f"eval.{protocol}.{key}={WRONG} is not a valid choice"):
            check_overrides([f"eval.{protocol}.{key}={WRONG}"], EvalAppConfig, open_type=protocol_option_type)
    # Keys stay open (each protocol checks them when it runs), values of non-choice options are not judged here.
    check_overrides(["++eval.hummingbird.anything=3", "eval.linear.epochs=2", "+eval.linear.per_dataset.voc.lr=1"],
                    EvalAppConfig, open_type=protocol_option_type)


def test_loss_choices_are_what_the_loss_implements():
    """check_loss_config reads the enums: each must list exactly the implementations the loss has."""
    from neco.loss.masks import BLUR_PADDINGS, FG_CELL_RULES
    from neco.loss.pair import SORTERS
    from neco.loss.sorting import DISTRIBUTIONS, SORT_NETWORKS

    def values(choice):
        return {member.value for member in choice}

    assert values(choice_enums.SortNetwork) == set(SORT_NETWORKS)
    assert values(choice_enums.Distribution) == set(DISTRIBUTIONS)
    assert values(choice_enums.Sorter) == set(SORTERS) | {"auto"}
    assert values(choice_enums.MaskBlurPadding) == set(BLUR_PADDINGS)
    assert values(choice_enums.FgCellRule) == set(FG_CELL_RULES)
