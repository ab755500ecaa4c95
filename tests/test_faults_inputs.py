"""Bad input ends in one clear line (exit 2, no traceback), never in a traceback or a silently changed run.

Each test injects the fault: unreadable images (also inside loader workers), symbolic-link loops, file names that
are not UTF-8, and misspelt keys or group options on the command line of train, eval and export.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from neco.cli import exit_on_user_error
from neco.config import ExportConfig, TrainConfig
from neco.data.datasets import ImageFileDataset, build_train_dataset, list_images
from neco.errors import ConfigError
from neco.eval.config import EvalAppConfig
from neco.overrides import check_overrides, unknown_key_message, unknown_option_message

ROOT = Path(__file__).resolve().parents[1]
TINY = ["experiment=quickstart", "backbone.weights=random", "monitor.name=none", "logger.progress=false",
        "data.batch_size=2", "data.global_size=32", "data.local_size=16", "loss.roi_size=3",
        "loss.head.hidden_dim=32", "loss.head.out_dim=16", "max_steps=1"]


def run_module(module, *args, cwd, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line_error(proc, *needles):
    """Exit 2, stderr is exactly one ``error: ...`` line holding every needle, and no traceback anywhere."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def _good_image(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)


# 1. Unreadable images ------------------------------------------------------------------------------------


def test_raise_policy_names_the_file_and_the_key_from_a_loader_worker(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    _good_image(folder / "a.png")
    (folder / "sub" / "broken.jpg").write_bytes(b"not a jpeg")
    proc = run_module("neco.train", *TINY, "data=folder", f"paths.folder={folder}", "data.num_workers=1",
                      "data.shuffle=false", "data.on_bad_image=raise", f"paths.output_dir={tmp_path / 'out'}",
                      cwd=tmp_path)
    line = assert_one_line_error(proc, "broken.jpg", "data.on_bad_image=raise", "data.on_bad_image=skip",
                                 f"paths.folder={folder}")
    assert "worker" not in line


def test_folder_of_only_bad_images_says_no_image_is_readable(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.jpg", "b.png", "c.jpeg"):
        (folder / name).write_bytes(b"garbage")
    proc = run_module("neco.train", *TINY, "data=folder", f"paths.folder={folder}", "data.num_workers=1",
                      f"paths.output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert_one_line_error(proc, "3 images in a row could not be read", f"no image of paths.folder={folder} is "
                          "readable", "data.on_bad_image=skip")


def test_error_raised_in_a_loader_worker_prints_its_own_message_only(tmp_path, capsys):
    (tmp_path / "x.jpg").write_bytes(b"garbage")
    data = ImageFileDataset([tmp_path / "x.jpg"], on_bad_image="raise", source="paths.folder=here")
    batches = iter(DataLoader(data, num_workers=1, collate_fn=list))
    try:
        with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
            next(batches)
    finally:
        batches._shutdown_workers()  # the failed iterator must not outlive the test (later forks inherit it)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Original Traceback" not in err and "DataLoader worker" not in err
    assert err.startswith(f"error: could not read image {tmp_path / 'x.jpg'}: ")
    assert "(data.on_bad_image=raise, paths.folder=here; set data.on_bad_image=skip" in err


def test_non_utf8_file_name_is_logged_and_reported_safely(tmp_path, capsys):
    bad = os.fsencode(tmp_path) + b"/\xff\xfe name\n.jpg"  # not UTF-8, with a newline in it
    with open(bad, "wb") as f:
        f.write(b"garbage")
    _good_image(tmp_path / "good.png")
    files = list_images(tmp_path)
    assert len(files) == 2
    log_file = tmp_path / "log.txt"
    handler = logging.FileHandler(log_file, encoding="utf-8")  # strict UTF-8, as a run's log file
    logger = logging.getLogger("neco")
    logger.addHandler(handler)
    try:
        data = ImageFileDataset(files, on_bad_image="skip")
        assert data[files.index(os.fsdecode(bad))].size == (40, 40)  # good.png stands in
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert "Logging error" not in capsys.readouterr().err
    logged = log_file.read_text(encoding="utf-8")
    assert r"/\xff\xfe name\n.jpg" in logged and logged.count("\n") == 1
    with pytest.raises(SystemExit), exit_on_user_error():
        ImageFileDataset(files, on_bad_image="raise")[files.index(os.fsdecode(bad))]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and r"\xff\xfe name\n.jpg" in err


def test_unknown_policy_or_dataset_name_is_a_user_error(capsys):
    for kwargs in ({"name": "synthetic", "on_bad_image": "rasie"}, {"name": "coco+imagenet10"}):
        with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
            build_train_dataset(roots={}, **kwargs)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ")
        assert ("data.on_bad_image='rasie'" in err) if "on_bad_image" in kwargs else ("'coco+imagenet10'" in err)


# 2. Symbolic links -------------------------------------------------------------------------------------


def _tree_with_loops(root: Path, loops: int) -> list[str]:
    (root / "sub" / "deeper").mkdir(parents=True)
    files = [root / "a.jpg", root / "sub" / "b.png", root / "sub" / "deeper" / "c.jpg"]
    for f in files:
        _good_image(f)
    os.symlink(root, root / "sub" / "up")  # a loop back to the top
    if loops > 1:
        os.symlink(root / "sub", root / "sub" / "deeper" / "again")
    return sorted(str(f) for f in files)


@pytest.mark.parametrize("loops", [1, 2])
def test_symlink_loops_list_each_file_once(tmp_path, loops):
    expected = _tree_with_loops(tmp_path / "images", loops)
    code = "import sys; from neco.data.datasets import list_images; print('\\n'.join(list_images(sys.argv[1], " \
           "recursive=True)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "images")], capture_output=True, text=True,
                          timeout=60, env=env)  # two loops used to make the walk endless
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == expected


def test_folder_reached_twice_is_listed_once_under_the_same_name(tmp_path):
    real = tmp_path / "images" / "z_real"
    real.mkdir(parents=True)
    _good_image(real / "x.jpg")
    os.symlink(real, tmp_path / "images" / "a_link")
    data = build_train_dataset("folder", {"folder": tmp_path / "images"})
    assert data.files == [str(tmp_path / "images" / "a_link" / "x.jpg")]  # sorted walk: the first name wins


# 3. Unknown keys and group options ---------------------------------------------------------------------


@pytest.mark.parametrize("override", ["+optim.lr_backbon=1e-4", "++optim.lr_backbon=1e-4", "optim.lr_backbon=1e-4"])
def test_misspelt_key_is_refused_with_or_without_plus(tmp_path, override):
    proc = run_module("neco.train", *TINY, override, f"paths.output_dir={tmp_path}", cwd=tmp_path)
    assert_one_line_error(proc, "unknown setting optim.lr_backbon (did you mean optim.lr_backbone?)", override)
    assert not (tmp_path / "runs").exists()  # nothing trained, no config.yaml holding the typo


@pytest.mark.parametrize("args,needles", [
    (["backbone=dinov2_vits16"], ["backbone=dinov2_vits16: no such backbone option", "did you mean dinov2_vits14"]),
    (["experiment=neco_dinov2r"], ["did you mean", "small/neco_dinov2r", "base/neco_dinov2r", "small/: ",
                                   "base/: ", "ablations/: ablation_steepness_", "ablation_steepness_odd_even",
                                   "quickstart"]),
    (["-m", "loss.student_steepness=10,100", "backbone=dinov2_vits14,dinov2_vits16"], ["did you mean dinov2_vits14"]),
    # The evaluation app's group in a training command: where training's own checks are instead.
    (["eval=kmeans_monitor"], ["eval=kmeans_monitor: training has no eval settings",
                               "monitor=none|quick|kmeans|attention", "python -m neco.eval"]),
    (["eval.every_n_epochs=2"], ["eval.every_n_epochs=2: training has no eval settings", "monitor.<option>="]),
])
def test_training_command_line_mistakes(tmp_path, args, needles):
    show = [] if "-m" in args else ["--cfg", "job"]  # a sweep is checked before any of its jobs starts
    proc = run_module("neco.train", *args, f"paths.output_dir={tmp_path}", *show, cwd=tmp_path)
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "multirun").exists()


def test_evaluation_and_export_refuse_misspelt_keys(tmp_path):
    proc = run_module("neco.eval", "+checkpoint_modle=teacher", "--cfg", "job", cwd=tmp_path)
    assert_one_line_error(proc, "unknown setting checkpoint_modle (did you mean checkpoint_model")
    proc = run_module("neco.eval", "eval=[hummingbird,linaer]", "--cfg", "job", cwd=tmp_path)
    assert_one_line_error(proc, "eval=linaer: no such eval option (did you mean linear?)")
    proc = run_module("neco.export", "checkpoint=x.pt", "backbone=dinov2_vits14", "++backbone.nmae=x", cwd=tmp_path)
    assert_one_line_error(proc, "unknown setting backbone.nmae (did you mean backbone.name?)")


def test_keys_the_schema_allows_still_compose(tmp_path):
    # + on a key the schema has (grad_clip is null by default) and ++ under the open per-protocol options of
    # evaluation (each protocol checks its own options when it runs) are accepted.
    proc = run_module("neco.train", "+optim.grad_clip=1.5", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "grad_clip: 1.5" in proc.stdout
    proc = run_module("neco.eval", "++eval.hummingbird.num_neighbours=3", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "num_neighbours: 3" in proc.stdout


def test_help_is_not_checked(tmp_path):
    proc = run_module("neco.train", "--help", "+optim.lr_backbon=1e-4", cwd=tmp_path)
    assert proc.returncode == 0 and "python -m neco.train: post-train" in proc.stdout


@pytest.mark.parametrize("override,needle", [
    ("+lr_backbone=1e-4", "unknown setting lr_backbone (did you mean optim.lr_backbone?), in +lr_backbone=1e-4"),
    ("++data.on_bad_imag=raise", "unknown setting data.on_bad_imag (did you mean data.on_bad_image?)"),
    ("+optim.zzz=1", "unknown setting optim.zzz (optim has: epochs, lr_backbone,"),
    ("+zzz=1", "unknown setting zzz (the config has: backbone, data,"),
    ("+experiment=small/neco_dinov", "experiment=small/neco_dinov: no such experiment option (did you mean "
                                     "small/neco_dino"),
])
def test_override_messages(override, needle):
    with pytest.raises(ConfigError) as err:
        check_overrides([override], TrainConfig)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_schema_lookup_and_option_listing():
    assert unknown_key_message(TrainConfig, "loss.head.out_dim") is None
    assert unknown_key_message(TrainConfig, "optim.trainable_blocks") is None
    assert "did you mean loss.head.out_dim?" in unknown_key_message(TrainConfig, "loss.head.out_dmi")
    assert unknown_key_message(EvalAppConfig, "eval.anything.at_all") is None  # open on purpose
    assert unknown_key_message(ExportConfig, "backbone.weights") is None
    assert "did you mean format?" in unknown_key_message(ExportConfig, "fromat")
    assert unknown_option_message("backbone", "dinov2_vits14") is None
    assert unknown_option_message("experiment", "small/neco_dino") is None
    check_overrides(["hydra.run.dir=x", "hydra/launcher=basic", "~eval", "backbone@x=y", "experiment=null",
                     "data.global_scale=[0.3,1.0]", "optim.lr_backbone=1e-4"], TrainConfig)


def test_protocol_option_typo_is_one_line_with_a_suggestion():
    from neco.eval.context import typed_options
    from neco.eval.hummingbird.protocol import HummingbirdOptions

    with pytest.raises(ConfigError) as err:
        typed_options(HummingbirdOptions, {"num_neigbours": 3}, protocol="hummingbird")
    assert str(err.value) == ("invalid evaluation option eval.hummingbird.num_neigbours: unknown setting "
                              "num_neigbours (did you mean num_neighbours?)")
    with pytest.raises(ConfigError) as err:
        typed_options(HummingbirdOptions, {"num_neighbours": "many"}, protocol="hummingbird")
    assert "eval.hummingbird.num_neighbours" in str(err.value) and "\n" not in str(err.value)
