"""Faults in downloads and weight files, injected: hostile addresses, cut-short and wrong downloads, damaged
files. Each ends in one line naming the setting, and nothing bad is cached (non-finite weights and the entry
points: test_faults_weights_load.py)."""

import http.server
import os
import random
import threading
from pathlib import Path

import pytest
import torch

from neco.models import BACKBONES, WeightsError, build_backbone
from neco.models.backbone import create_vit
from neco.models.downloads import parse_hf, url_cache_path
from neco.models.weights import read_checkpoint, resolve_weights


def tiny_state():
    return create_vit(BACKBONES["vit_tiny"]).state_dict()


def tiny_bytes(tmp_path) -> bytes:
    torch.save(tiny_state(), tmp_path / "payload.pth")
    return (tmp_path / "payload.pth").read_bytes()


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------- confinement

HOSTILE_URLS = [
    "https://host/../../../../tmp/x.pth",
    "https://host/a/%2e%2e/%2e%2e/%2e%2e/%2e%2e/x.pth",
    "https://host/a/%2E%2E%2f%2E%2E%2fx.pth",
    "https://host/..%5c..%5cx.pth",
    "https://host/a\\..\\..\\x.pth",
    "https://host/%00/x.pth",
    "https://host/C:/x.pth",
    "https://host/a/..",
    "https:///x.pth",
    "https://../x.pth",
    "https://..%2f..%2ftmp/x.pth",
    "https://host..evil/x.pth",
    "https://user:pw@host:99999/x.pth",
    "https://host:80@../x.pth",
    "https://[::1]/x.pth",
    "https://host/",
    "https://host/x.pth#sha256=zz",
]
# Odd but harmless: each must land inside the cache.
ODD_URLS = ["https://host//etc/passwd", "https://host/./././x.pth", "https://user:pw@Host:8080/a/x.pth",
            "https://host/x.pth?next=../../../b", "https://host/%252e%252e/x.pth", "https://host/a/%2e/x.pth"]


def fake_network(monkeypatch, payload: bytes, seen: list | None = None):
    """Every URL answers ``payload`` with an honest Content-Length."""
    import email.message
    import io
    import urllib.response

    def urlopen(url, *args, **kwargs):
        if seen is not None:
            seen.append(url)
        headers = email.message.Message()
        headers["Content-Length"] = str(len(payload))
        return urllib.response.addinfourl(io.BytesIO(payload), headers, url, 200)

    monkeypatch.setattr("urllib.request.urlopen", urlopen)


@pytest.mark.parametrize("url", HOSTILE_URLS + ODD_URLS)
def test_no_url_names_a_file_outside_the_cache(url, tmp_path, monkeypatch):
    fake_network(monkeypatch, tiny_bytes(tmp_path))
    cache = tmp_path / "sandbox" / "weights"
    before = files_under(tmp_path)
    try:
        path = resolve_weights(url, None, "vit_tiny", cache)
    except WeightsError as err:
        assert url in str(err) and "\n" not in str(err) and "backbone.weights" in str(err)
        assert url not in ODD_URLS, err
    else:
        assert url in ODD_URLS
        assert Path(os.path.abspath(path)).is_relative_to(cache) and path.is_file()
    assert all(p.is_relative_to(cache) for p in files_under(tmp_path) - before)  # nothing written elsewhere


@pytest.mark.parametrize("spec", [
    "hf://owner/repo/../../../x.pt", "hf://owner/repo/%2e%2e/%2e%2e/x.pt", "hf://../repo/x.pt",
    "hf://owner/../x.pt", "hf://owner/repo@../x.pt", "hf:///etc/passwd", "hf://owner/repo/a\\..\\x.pt",
    "hf://owner/repo/C:/x.pt", "hf://own%2f..%2f/repo/x.pt",
])
def test_no_hf_address_names_a_file_outside_the_cache(spec, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append(a))
    with pytest.raises(WeightsError) as err:
        resolve_weights(spec, None, "vit_tiny", tmp_path / "weights")
    assert "\n" not in str(err.value) and "backbone.weights=" in str(err.value)
    assert calls == []  # refused before anything is fetched


def test_a_hub_answer_outside_the_cache_is_refused(tmp_path, monkeypatch):
    import huggingface_hub

    outside = tmp_path / "elsewhere.pt"
    torch.save(tiny_state(), outside)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(outside))
    with pytest.raises(WeightsError, match="outside the weights cache"):
        resolve_weights("hf://owner/repo/w.pt", None, "vit_tiny", tmp_path / "weights")


def test_random_hostile_paths_stay_inside_the_cache(tmp_path):
    # Paths assembled from the pieces of traversal tricks: every one is refused or lands inside the cache.
    pieces = ["..", "%2e%2e", "%2E.", ".", "a", "%5c", "\\", "", "%2f", "C:", "%00", "~", "%252e%252e", "//"]
    rng = random.Random(0)
    cache, refused = tmp_path / "weights", 0
    for _ in range(2000):
        path = "/".join(rng.choice(pieces) for _ in range(rng.randint(1, 6))) + rng.choice(["/x.pth", "x.pth", ""])
        for address, flat in ((f"https://host/{path}", False), (f"https://host/{path}", True)):
            try:
                dst = url_cache_path(address, cache, flat, "backbone.weights")
            except WeightsError as err:
                refused += 1
                assert "\n" not in str(err)
            else:
                assert os.path.normpath(dst).startswith(str(cache) + os.sep), (address, dst)
        try:
            repo, _, file = parse_hf(f"hf://owner/repo/{path}", "backbone.weights")
        except WeightsError:
            refused += 1
        else:
            assert os.path.normpath(cache / repo / file).startswith(str(cache / repo) + os.sep), path
    assert refused > 1000  # the generator does produce hostile paths


# ------------------------------------------------------------------------------------------- verified downloads


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


@pytest.fixture
def server(tmp_path):
    """A local HTTP server: /good.pth is a vit_tiny checkpoint; /short.pth announces 15 MB and sends 100 kB."""
    payload, hits = tiny_bytes(tmp_path), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the name http.server calls
            hits.append(self.path)
            body = payload if self.path == "/good.pth" else b"\0" * 100_000
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload) if self.path == "/good.pth" else 15_000_000))
            self.end_headers()
            self.wfile.write(body)  # then the connection closes: a short body for /short.pth

        def log_message(self, *args):
            pass

    httpd = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", payload, hits
    httpd.shutdown()
    httpd.server_close()


def test_a_download_cut_short_is_never_cached(server, tmp_path):
    base, _, hits = server
    cache = tmp_path / "weights"
    for attempt in (1, 2):  # the second run downloads again: nothing was kept
        with pytest.raises(WeightsError) as err:
            build_backbone("vit_tiny", weights=f"{base}/short.pth", cache_dir=cache)
        msg = str(err.value)
        assert "\n" not in msg and "backbone.weights" in msg and "short.pth" in msg
        assert "after 100000 of 15000000 bytes" in msg or "IncompleteRead" in msg
        assert [p for p in files_under(cache) if not p.name.endswith(".lock")] == []  # no partial file left
        assert hits.count("/short.pth") == attempt


def test_the_temporary_name_is_unique_to_the_process(tmp_path, monkeypatch):
    import email.message
    import io
    import urllib.response

    cache, listed = tmp_path / "weights", []

    class Body(io.BytesIO):
        def read(self, n=-1):
            listed.extend(p.name for p in files_under(cache))
            return super().read(n)

    def urlopen(url, *args, **kwargs):
        headers = email.message.Message()
        headers["Content-Length"] = "999"
        return urllib.response.addinfourl(Body(b"x" * 10), headers, url, 200)

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    with pytest.raises(WeightsError, match="after 10 of 999 bytes"):
        resolve_weights("https://host/w.pth", None, "vit_tiny", cache)
    partial = [n for n in listed if n.endswith(".partial")]
    assert partial and all(n.startswith(f".w.pth.{os.getpid()}.") for n in partial)
    assert not (cache / "urls/host/w.pth").exists() and not any(p.suffix == ".partial" for p in files_under(cache))


def test_sha256_suffix_is_checked(server, tmp_path):
    import hashlib

    base, payload, hits = server
    cache, digest = tmp_path / "weights", hashlib.sha256(payload).hexdigest()
    wrong = "0" * 64
    with pytest.raises(WeightsError, match=f"SHA-256 is {digest}, not {wrong}; nothing was cached"):
        build_backbone("vit_tiny", weights=f"{base}/good.pth#sha256={wrong}", cache_dir=cache)
    assert [p for p in files_under(cache) if not p.name.endswith(".lock")] == []
    model = build_backbone("vit_tiny", weights=f"{base}/good.pth#sha256={digest.upper()}", cache_dir=cache)
    assert model.cls_token.shape == (1, 1, 128)
    cached = cache / "urls" / f"127.0.0.1_{base.rsplit(':', 1)[1]}" / "good.pth"
    assert cached.read_bytes() == payload
    build_backbone("vit_tiny", weights=f"{base}/good.pth#sha256={digest}", cache_dir=cache)
    assert hits.count("/good.pth") == 2  # the wrong one, then once; the third run used the cache
    with pytest.raises(WeightsError, match="the cached file .*good.pth has another SHA-256"):
        build_backbone("vit_tiny", weights=f"{base}/good.pth#sha256={wrong}", cache_dir=cache)
    with pytest.raises(WeightsError, match="the part after '#' must be sha256=<64 hex digits>"):
        build_backbone("vit_tiny", weights=f"{base}/good.pth#md5=abc", cache_dir=cache)


# ------------------------------------------------------------------------------------------- damaged files


def damaged_files(tmp_path) -> list[Path]:
    good = tmp_path / "good.pth"
    torch.save(tiny_state(), good)
    data = good.read_bytes()
    contents = {f"random{seed}.pt": random.Random(seed).randbytes(5000) for seed in range(4)}
    contents |= {"empty.pt": b"", "text.pt": b"hello world\n", "cut.pth": data[: len(data) // 2],
                 "zipjunk.pt": b"PK\x03\x04" + bytes(200), "pickle.pt": b"\x80\x02" + bytes(50),
                 "cut.safetensors": b"\xff" * 9}
    paths = []
    for name, content in contents.items():
        (tmp_path / name).write_bytes(content)
        paths.append(tmp_path / name)
    return paths


def test_damaged_files_are_one_line_without_torch_advice(tmp_path):
    for path in damaged_files(tmp_path):
        for key in ("backbone.weights", "checkpoint", "resume"):
            with pytest.raises(WeightsError) as err:
                read_checkpoint(path, key=key)
            msg = str(err.value)
            assert msg.startswith(f"{key}={path}: not a readable") and "\n" not in msg, msg
            assert "weights_only" not in msg and "arbitrary code" not in msg, msg
