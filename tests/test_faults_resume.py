"""Faults that used to change or lose a run's results on resume, and a run directory that cannot be written:
a resume with other settings, metrics repeated after a kill, a full disk, an unwritable output folder."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import TINY, tiny_cfg

import neco.engine.checkpoint as checkpoint_module
from neco.cli import exit_on_user_error
from neco.engine.checkpoint import ResumeError
from neco.engine.disk import OutputError
from neco.engine.fingerprint import ResumeRefused
from neco.engine.log import read_metrics, truncate_metrics
from neco.engine.trainer import Trainer
from neco.train import train


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def snapshot(run: Path) -> dict:
    return {p.name: p.read_bytes() for p in (run / "config.yaml", run / "run_info.json", run / "metrics.jsonl")}


# -------------------------------------------------------------------------------------- resume rules
def test_resume_with_other_data_settings_is_refused_and_leaves_the_run_as_it_was(tmp_path):
    """A full run of the same name must not continue a debug=fast run (other batch and crop sizes)."""
    # debug=fast's own sizes, which the tiny test settings would otherwise replace
    fast = ["debug=fast", "data.batch_size=4", "data.global_size=56", "data.local_size=28"]
    train(tiny_cfg(tmp_path, *fast), tmp_path / "run")
    before = snapshot(tmp_path / "run")
    with pytest.raises(ResumeRefused) as err:
        train(tiny_cfg(tmp_path, "max_steps=4", "seed=1"), tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message and "resume_force=true" in message
    for change in ("data.batch_size: 4 -> 2", "data.global_size: 56 -> 32", "data.local_size: 28 -> 16",
                   "seed: 0 -> 1"):
        assert change in message
    assert "max_steps" not in message and "logger.log_every" not in message  # allowed to change
    assert snapshot(tmp_path / "run") == before  # config.yaml, run_info.json and metrics untouched


def test_other_head_size_is_the_same_refusal_not_a_state_dict_error(tmp_path):
    train(tiny_cfg(tmp_path, "max_steps=2"), tmp_path / "run")
    with pytest.raises(ResumeRefused, match=r"loss.head.out_dim: 16 -> 8"):
        train(tiny_cfg(tmp_path, "max_steps=4", "loss.head.out_dim=8"), tmp_path / "run")
    # Forced anyway, the weights cannot fit: still one line naming what to change.
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(ResumeError, match=r"do not fit this model .*loss.head") as err:
        train(tiny_cfg(tmp_path, "max_steps=4", "loss.head.out_dim=8", "resume_force=true"), tmp_path / "run")
    assert "\n" not in str(err.value)
    # The run's SIGTERM / Ctrl-C handlers are put back: a later signal is not swallowed by a run that is gone.
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_allowed_changes_resume_and_are_recorded(tmp_path):
    train(tiny_cfg(tmp_path, "max_steps=2", "checkpoint_every=1"), tmp_path / "run")
    train(tiny_cfg(tmp_path, "max_steps=4", "checkpoint_every=2", "logger.log_every=2", "keep_checkpoints=1"),
          tmp_path / "run")
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    (resume,) = info["resumes"]
    assert resume["step"] == 2 and resume["forced"] == {}
    assert resume["changed"]["max_steps"] == [2, 4] and resume["changed"]["logger.log_every"] == [1, 2]
    assert "max_steps: 4" in (tmp_path / "run" / "config.yaml").read_text()


def test_resume_force_resumes_and_records_the_differences(tmp_path):
    train(tiny_cfg(tmp_path, "max_steps=2"), tmp_path / "run")
    result = train(tiny_cfg(tmp_path, "max_steps=3", "optim.lr_backbone=0.001", "resume_force=true"),
                   tmp_path / "run")
    assert result["step"] == 3
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["resume_force"] is True
    assert info["resumes"][-1]["forced"] == {"optim.lr_backbone": [0.0001, 0.001]}
    assert "lr_backbone: 0.001" in (tmp_path / "run" / "config.yaml").read_text()


# ----------------------------------------------------------------------------------- metrics after a kill
class Killed(Exception):
    """Stands for a kill between two checkpoints (nothing is saved after it)."""


def test_resume_after_a_kill_does_not_repeat_metrics(tmp_path, monkeypatch):
    full = ["checkpoint_every=2"]
    train(tiny_cfg(tmp_path, "run_name=full", *full), tmp_path / "full")

    original = Trainer._optimizer_step

    def killed_at_step_6(self):
        if self.state.step == 5:
            raise Killed
        return original(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", killed_at_step_6)
    with pytest.raises(Killed):
        train(tiny_cfg(tmp_path, "run_name=part", *full), tmp_path / "part")
    metrics = tmp_path / "part" / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 6, "epoch": 1, "lo')  # a record cut short by the kill
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()[:-1]] == [1, 2, 3, 4, 5]
    assert torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)["step"] == 4

    monkeypatch.undo()
    train(tiny_cfg(tmp_path, "run_name=part", *full), tmp_path / "part")
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, 9))  # step 5 once, the cut line gone
    assert losses(tmp_path / "part") == losses(tmp_path / "full")


def test_metrics_truncation_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": float(s)}) for s in (0, 1, 2, 3)] + [json.dumps({"note": "no step"})]
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OutputError, match="no space left on"):
        truncate_metrics(path, 1)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    monkeypatch.undo()
    assert truncate_metrics(path, 1) == 2
    assert [r.get("step") for r in read_metrics(path)] == [0, 1, None]


# ------------------------------------------------------------------------------------------ full disk
def partial_then(error):
    """A torch.save that writes part of the file, then fails with `error()` (what a full disk does)."""
    def save(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise error()
    return save


def torch_own_error():
    """The RuntimeError torch itself raises when its writer hits a full disk (/dev/full: ENOSPC on write)."""
    try:
        torch.save({"x": torch.zeros(1000)}, "/dev/full")
    except RuntimeError as err:
        return err
    raise AssertionError("writing to /dev/full succeeded")


@pytest.mark.parametrize("kind", ["oserror", "torch"])
def test_full_disk_during_a_checkpoint(tmp_path, monkeypatch, capsys, kind):
    if kind == "torch" and not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system to provoke torch's own write error")
    train(tiny_cfg(tmp_path, "max_steps=2"), tmp_path / "run")
    folder = tmp_path / "run" / "checkpoints"
    before = (folder / "last.pt").read_bytes()
    error = (lambda: OSError(errno.ENOSPC, "No space left on device")) if kind == "oserror" else torch_own_error
    monkeypatch.setattr(checkpoint_module.torch, "save", partial_then(error))
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        train(tiny_cfg(tmp_path, "max_steps=4", "checkpoint_every=1"), tmp_path / "run")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: no space left on {folder}"), err
    assert "paths.output_dir" in err[0] and "partial file was removed" in err[0]
    assert (folder / "last.pt").read_bytes() == before  # the previous checkpoint is intact
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step_2.pt"]  # no partial file left


def test_read_only_filesystem_during_a_checkpoint(tmp_path, monkeypatch):
    train(tiny_cfg(tmp_path, "max_steps=1"), tmp_path / "run")
    folder = tmp_path / "run" / "checkpoints"
    monkeypatch.setattr(checkpoint_module.torch, "save",
                        partial_then(lambda: OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(OutputError, match=r"cannot write step_2.pt in .*checkpoints: Read-only file system") as err:
        train(tiny_cfg(tmp_path, "max_steps=2"), tmp_path / "run")
    assert "\n" not in str(err.value) and "paths.output_dir" in str(err.value)
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step_1.pt"]


def run_cli(tmp_path, output_dir, *overrides):
    return subprocess.run([sys.executable, "-m", "neco.train", *TINY, "max_steps=1", f"paths.output_dir={output_dir}",
                           *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_output_folder_under_a_regular_file_is_one_line(tmp_path):
    """Works as root too: no permission can make a path below a regular file a folder."""
    (tmp_path / "afile").write_text("")
    proc = run_cli(tmp_path, tmp_path / "afile" / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot create or write the output folder")
    assert "paths.output_dir" in lines[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder; the case above covers root")
def test_read_only_output_folder_is_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        proc = run_cli(tmp_path, out)
    finally:
        out.chmod(0o700)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot create or write the output folder")


def test_refused_resume_from_the_command_line_leaves_hydra_files_alone(tmp_path):
    first = run_cli(tmp_path, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart"
    before = snapshot(run) | {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}
    proc = run_cli(tmp_path, tmp_path, "seed=1", "data.batch_size=1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "(data.batch_size: 2 -> 1, seed: 0 -> 1)" in lines[0], lines
    assert snapshot(run) | {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()} == before


def test_old_checkpoint_without_a_setting_added_later_still_resumes(tmp_path):
    """A setting added to the code after a checkpoint was written reads as its default, which keeps the earlier
    behaviour; only another value is a change."""
    train(tiny_cfg(tmp_path, "max_steps=1"), tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["fingerprint"]["loss.queue_counter"], state["config"]["loss"]["queue_counter"]
    torch.save(state, last)
    with pytest.raises(ResumeRefused, match=r"\(loss.queue_counter: <unset> -> per_queue\)"):
        train(tiny_cfg(tmp_path, "max_steps=2", "loss.queue_counter=per_queue"), tmp_path / "run")
    assert train(tiny_cfg(tmp_path, "max_steps=2"), tmp_path / "run")["step"] == 2


def test_checkpoint_from_before_the_monitor_group_still_resumes(tmp_path):
    """Checkpoints written when training's monitors were the `eval` group (and without a stored fingerprint, the
    oldest kind) resume: monitor settings may change on resume, and a setting the code no longer has is no change."""
    train(tiny_cfg(tmp_path, "max_steps=1"), tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["config"]["eval"] = state["config"].pop("monitor")
    del state["fingerprint"]
    torch.save(state, last)
    assert train(tiny_cfg(tmp_path, "max_steps=2"), tmp_path / "run")["step"] == 2


def test_starting_over_sets_the_earlier_run_aside(tmp_path):
    """resume=null in a directory with checkpoints: the new run's files are not mixed with the earlier ones (and
    its step files are not pruned in favour of the earlier, higher-numbered ones)."""
    train(tiny_cfg(tmp_path, "max_steps=3", "checkpoint_every=1"), tmp_path / "run")
    train(tiny_cfg(tmp_path, "max_steps=1", "resume=null", "keep_checkpoints=1"), tmp_path / "run")
    run = tmp_path / "run"
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt", "step_1.pt"]
    (earlier,) = (run / "superseded").iterdir()
    assert [r["step"] for r in read_metrics(earlier / "metrics.jsonl")] == [1, 2, 3]
    assert torch.load(earlier / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
