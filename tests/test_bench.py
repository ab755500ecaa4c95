"""`python -m neco.bench`: the quick CPU run, the loader and end-to-end rows, the floor loss, and the sorter against
float64 (CPU and GPU)."""

from __future__ import annotations

import io
import json
import math
import time

import numpy as np
import pytest
import torch

from neco import bench, bench_e2e
from neco.data import datasets
from neco.data.workers import available_cpus
from neco.loss.sorting import SORT_NETWORKS, diff_sort, diff_sort_dense

ENV_KEYS = {"device", "torch", "triton", "timm", "kind"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.jsonl"
    records = bench.main(["--quick", "--out", str(out)])
    return records, out


def _positive(record: dict, *keys: str) -> None:
    for key in keys:
        value = record[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, record)


def test_quick_prints_json_lines_with_the_expected_keys(quick_run):
    records, out = quick_run
    lines = out.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    assert parsed == records
    assert all(ENV_KEYS <= r.keys() for r in parsed)
    assert parsed[0]["kind"] == "env" and parsed[0]["device"].startswith("cpu")
    assert len({(r["device"], r["torch"], r["timm"]) for r in parsed}) == 1

    steps = [r for r in parsed if r["kind"] == "step"]
    expected = {("neco", "sparse"), ("floor", None), ("neco", "dense")}
    assert {(r["objective"], r["sorter"]) for r in steps} == expected
    for r in steps:
        assert r["backbone"] == "vit_tiny" and r["batch"] == 2 and r["precision"] == "fp32"
        _positive(r, "images_per_s", "step_ms")
        assert math.isfinite(r["loss"])
    (ratio,) = [r for r in parsed if r["kind"] == "ratio"]
    _positive(ratio, "time_ratio")

    sorts = [r for r in parsed if r["kind"] == "sort"]
    expected = {(impl, network) for impl in ("sparse", "dense") for network in SORT_NETWORKS}
    assert {(r["impl"], r["network"]) for r in sorts} >= expected
    for r in sorts:
        assert r["n"] == 49 and r["steepness"] == 100.0
        _positive(r, "fwd_bwd_ms", "fwd_ms")

    (loader,) = [r for r in parsed if r["kind"] == "loader"]
    _positive(loader, "images_per_s_with_startup")


def test_table_names_every_measurement(quick_run):
    buffer = io.StringIO()
    bench.print_table(quick_run[0], file=buffer)
    text = buffer.getvalue()
    assert "NeCo/floor" in text and "sort bitonic" in text and "loader" in text


# ------------------------------------------------------------------------------------ loader and end to end
@pytest.fixture(scope="module")
def e2e_run():
    return bench.main(["--quick", "--parts", "step,loader,e2e"])


def test_e2e_row_counts_the_configured_steps_beside_the_step_and_the_loader(e2e_run):
    (step,) = [r for r in e2e_run if r["kind"] == "step" and r["sorter"] == "sparse"]
    (loader,) = [r for r in e2e_run if r["kind"] == "loader"]
    (e2e,) = [r for r in e2e_run if r["kind"] == "e2e"]
    assert ENV_KEYS <= e2e.keys() and "error" not in e2e, e2e
    assert (e2e["backbone"], e2e["global_size"], e2e["local_size"], e2e["batch"]) == ("vit_tiny", 64, 32, 2)
    assert e2e["sorter"] == "sparse" and e2e["workers_requested"] == 2 and e2e["steps"] == 2
    assert e2e["workers"] == loader["workers"] == min(2, available_cpus())
    # Every timed step took one batch from the DataLoader, and nothing else was counted.
    assert e2e["images"] == e2e["steps"] * e2e["batch"] == 4
    _positive(e2e, "images_per_s", "images_per_s_second_half", "seconds")
    assert e2e["images_per_s"] == pytest.approx(e2e["images"] / e2e["seconds"])
    assert 0 <= e2e["loader_wait_s"] <= e2e["seconds"] and math.isfinite(e2e["loss"])
    # The three rows read the same JPEG folder, and the e2e row carries the other two of this run.
    assert e2e["files"] == loader["files"] >= 2 * 3 and e2e["source_image"] == loader["source_image"] == [160, 120]
    assert e2e["step_only_images_per_s"] == step["images_per_s"]
    assert e2e["e2e_over_step"] == pytest.approx(e2e["images_per_s"] / step["images_per_s"])
    # No targets below 518 px: nothing is judged on a size the targets were not set for.
    assert "targets" not in e2e and "checks" not in e2e
    buffer = io.StringIO()
    bench.print_table(e2e_run, file=buffer)
    (line,) = [t for t in buffer.getvalue().splitlines() if t.strip().startswith("e2e") and "img/s" in t]
    assert f"e2e/step x{e2e['e2e_over_step']:.2f}" in line and "workers=" in line


def test_e2e_time_includes_waiting_for_a_slow_loader(monkeypatch):
    delay = 0.25
    read = datasets.ImageFileDataset.__getitem__

    def slow(self, index):
        time.sleep(delay)
        return read(self, index)

    # Without workers the images load in the training process, where the patched reader runs.
    monkeypatch.setattr(datasets.ImageFileDataset, "__getitem__", slow)
    (e2e,) = [r for r in bench.main(["--quick", "--parts", "e2e", "--workers", "0"]) if r["kind"] == "e2e"]
    assert "error" not in e2e, e2e
    assert e2e["workers"] == 0 and e2e["images"] == 4
    assert e2e["loader_wait_s"] >= e2e["images"] * delay
    assert e2e["seconds"] >= e2e["loader_wait_s"]
    assert e2e["images_per_s"] <= 1 / delay
    assert "step_only_images_per_s" not in e2e  # the step was not measured in this run


def test_a_failing_e2e_configuration_is_an_error_row_and_the_run_goes_on(monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (injected)")

    monkeypatch.setattr(bench, "build_trainer", out_of_memory)
    records = bench.main(["--quick", "--parts", "loader,e2e", "--workers", "0"])
    (loader,) = [r for r in records if r["kind"] == "loader"]
    (e2e,) = [r for r in records if r["kind"] == "e2e"]
    _positive(loader, "images_per_s_with_startup")
    assert "out of memory (injected)" in e2e["error"] and "images_per_s" not in e2e
    assert "out of memory (injected)" in bench_e2e.table_line(e2e)


def test_jpeg_folder_is_filled_once_and_topped_up(tmp_path):
    folder = tmp_path / "jpegs"
    with bench_e2e.jpeg_folder(folder, 3, (64, 48)) as used:
        assert used == folder
    first = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert len(first) == 3
    with bench_e2e.jpeg_folder(folder, 3, (64, 48)):
        pass
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == first  # reused, not rewritten
    count = bench_e2e.DISTINCT_JPEGS + 2
    with bench_e2e.jpeg_folder(folder, count, (64, 48)):
        pass
    files = sorted(folder.iterdir())
    assert len(files) == count and all(first[n] == (folder / n).stat().st_mtime_ns for n in first)
    # Past the distinct images, the files repeat them (links): same bytes as the image they stand for.
    assert files[-1].read_bytes() == files[1].read_bytes() != files[0].read_bytes()
    assert bench_e2e.folder_summary(folder) == {"files": count, "source_image": [64, 48],
                                                "jpeg_kib": pytest.approx(files[0].stat().st_size / 1024, rel=0.5)}


def test_jpeg_dir_with_too_few_images_of_its_own_is_one_line_exit_2(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    bench_e2e.texture(np.random.default_rng(0), 32, 24).save(folder / "mine.jpg")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--parts", "loader", "--jpeg-dir", str(folder)])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: --jpeg-dir") and "holds 1 images" in err[0], err
    assert [p.name for p in folder.iterdir()] == ["mine.jpg"]  # a user's folder is not written into


def test_unknown_part_and_bad_workers_are_refused(capsys):
    for argv in (["--parts", "step,e2x"], ["--workers", "two"], ["--e2e-steps", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            bench.parse_args(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown e2x" in err and "--workers two" in err and "--e2e-steps 0" in err


def test_floor_loss_reaches_every_trainable_parameter():
    args = bench.parse_args(["--quick"])
    device = torch.device("cpu")
    cfg = bench.base_config(args)
    cfg.data.global_size = 32
    cfg.data.local_size = 16
    trainer = bench.build_trainer(cfg, device, None, "floor", total_steps=2)
    crops, boxes = bench.random_batch(cfg.data, device)
    loss = trainer.compute_loss(crops, boxes)
    loss.backward()
    named = [(n, p) for n, p in trainer.student.named_parameters() if p.requires_grad]
    assert named
    for name, param in named:
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    # The optimizer step and the EMA run on it as in training.
    before = [p.detach().clone() for p in trainer.teacher.parameters()]
    trainer._optimizer_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.teacher.parameters(), strict=True))


# ------------------------------------------------------------------------------------ sorter vs float64
def _run(fn, x, probe_v, probe_m, network):
    x = x.detach().clone().requires_grad_(True)
    values, matrix = fn(x, network, 100.0, "cauchy")
    ((values * probe_v).sum() + (matrix * probe_m).sum()).backward()
    return values.detach(), matrix.detach(), x.grad


def _max_error(actual, expected) -> float:
    # Relative to the largest entry: gradients reach ~steepness * n, values and matrices ~1.
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()


def check_sparse_against_float64_dense(device: torch.device, rows: int, seed: int = 0) -> None:
    """The fast sorter on `device` against the float64 dense reference path on the same device.

    float64 must agree to rounding; float32 (the training dtype) within what steep comparators make of its
    rounding (values and matrices 2e-4 of their scale, as against diffsort; gradients 1e-3)."""
    g = torch.Generator().manual_seed(seed)
    # Cosine similarities lie in [-1, 1]; a few rows of near ties hit the steep part of every comparator.
    x = torch.rand(rows, 49, generator=g, dtype=torch.float64) * 2 - 1
    x[:8] = x[:8, :1] + 1e-4 * torch.randn(8, 49, generator=g, dtype=torch.float64)
    probe_v = torch.randn(rows, 49, generator=g, dtype=torch.float64)
    probe_m = torch.randn(rows, 49, 49, generator=g, dtype=torch.float64)
    x, probe_v, probe_m = x.to(device), probe_v.to(device), probe_m.to(device)
    for network in SORT_NETWORKS:
        reference = _run(diff_sort_dense, x, probe_v, probe_m, network)
        exact = _run(diff_sort, x, probe_v, probe_m, network)
        single = _run(diff_sort, x.float(), probe_v.float(), probe_m.float(), network)
        for what, ref, a, b in zip(("values", "matrix", "gradient"), reference, exact, single, strict=True):
            assert a.dtype == torch.float64 and b.dtype == torch.float32
            assert torch.isfinite(b).all(), (network, what)
            assert _max_error(a, ref) < 1e-10, (network, what, _max_error(a, ref))
            tol = 1e-3 if what == "gradient" else 2e-4
            assert _max_error(b, ref) < tol, (network, what, _max_error(b, ref))


def test_sparse_sorter_matches_float64_dense_on_cpu():
    check_sparse_against_float64_dense(torch.device("cpu"), rows=64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sparse_sorter_matches_float64_dense_on_gpu():
    device = torch.device("cuda")
    check_sparse_against_float64_dense(device, rows=3136, seed=1)  # one NeCo sort: 64 images x 49 cells
    # The float64 dense path on the GPU is itself the CPU's to rounding.
    x = torch.rand(256, 49, dtype=torch.float64) * 2 - 1
    for network in SORT_NETWORKS:
        gpu = diff_sort_dense(x.cuda(), network, 100.0)[1].cpu()
        torch.testing.assert_close(gpu, diff_sort_dense(x, network, 100.0)[1], rtol=0, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sorter_under_bf16_autocast_on_gpu_runs_in_float32():
    x = torch.rand(3136, 49, device="cuda").to(torch.bfloat16).requires_grad_(True)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        values, X = diff_sort(x, "bitonic", steepness=100.0)
    assert values.dtype == X.dtype == torch.float32
    X.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    ref_values, ref_X = diff_sort(x.detach().float(), "bitonic", steepness=100.0)
    assert torch.equal(values.detach(), ref_values) and torch.equal(X.detach(), ref_X)
