"""Weight files in timm and safetensors layouts, weight sources (cache, URL, Hugging Face, offline) and pickles
that must never run: read by ``build_backbone`` from files the tests write themselves."""

import email.message
import io
import logging
import os
import pickle
import urllib.error
import urllib.request
import urllib.response

import pytest
import torch
from helpers import randomize_
from safetensors.torch import save_file

from neco.models import BACKBONES, WeightsError, build_backbone
from neco.models.backbone import create_vit


def save(obj, path):
    torch.save(obj, path)
    return str(path)


# ------------------------------------------------------------------------------------------------ timm files


@pytest.fixture(scope="module")
def tiny_sd():
    return randomize_(create_vit(BACKBONES["vit_tiny"]), seed=6).state_dict()


def assert_loaded(backbone, sd):
    own = backbone.state_dict()
    assert set(own) == set(sd)
    for k, v in sd.items():
        torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_timm_state_dict_round_trip(tiny_sd, tmp_path, fmt):
    path = tmp_path / f"tiny.{fmt}"
    if fmt == "pth":
        torch.save(tiny_sd, path)
    else:
        save_file({k: v.contiguous() for k, v in tiny_sd.items()}, str(path))
    b = build_backbone("vit_tiny", weights=str(path))
    assert_loaded(b, tiny_sd)
    # And our own state dict loads back unchanged (it is timm's format).
    assert_loaded(build_backbone("vit_tiny", weights=save(b.state_dict(), tmp_path / "again.pth")), tiny_sd)


def test_stored_grid_resampled_to_img_size(tiny_sd, tmp_path, caplog):
    path = save(tiny_sd, tmp_path / "tiny.pth")
    native = build_backbone("vit_tiny", weights=path).eval()
    with caplog.at_level(logging.WARNING):
        small = build_backbone("vit_tiny", weights=path, img_size=64).eval()
    assert small.grid_size == 8 and "resampled" in caplog.text
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # resampled once at load with the run-time formula: same result at 64 px
        torch.testing.assert_close(small(x), native(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ sources


def test_missing_file_names_the_key_and_path(tmp_path):
    with pytest.raises(WeightsError, match=r"backbone\.weights=.*nope\.pth: no such file"):
        build_backbone("vit_tiny", weights=str(tmp_path / "nope.pth"))


def test_default_offline_gives_one_clear_error(tmp_path, monkeypatch):
    def offline(url, *a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(WeightsError) as e:
        build_backbone("dinov2_vitl14_reg", cache_dir=tmp_path)
    msg = str(e.value)
    assert BACKBONES["dinov2_vitl14_reg"].weights_url in msg
    assert str(tmp_path / "dinov2_vitl14_reg4_pretrain.pth") in msg and "backbone.weights" in msg


def test_url_is_downloaded_once_and_same_names_do_not_collide(tiny_sd, tmp_path, monkeypatch):
    calls = []

    def fake_urlopen(url, *a, **k):
        calls.append(url)
        buffer = io.BytesIO()
        torch.save({name: v + (len(calls) - 1) for name, v in tiny_sd.items()}, buffer)
        headers = email.message.Message()
        headers["Content-Length"] = str(buffer.tell())
        return urllib.response.addinfourl(io.BytesIO(buffer.getvalue()), headers, url, 200)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    small, base = "https://example.org/vit-small/model.ckpt", "https://example.org/vit-base/model.ckpt"
    for _ in range(2):
        assert_loaded(build_backbone("vit_tiny", weights=small, cache_dir=tmp_path), tiny_sd)
    b = build_backbone("vit_tiny", weights=base, cache_dir=tmp_path)  # same file name, another file
    torch.testing.assert_close(b.cls_token, tiny_sd["cls_token"] + 1)
    assert calls == [small, base]  # once each
    assert (tmp_path / "urls/example.org/vit-small/model.ckpt").is_file()


def fake_hub(tmp_path, sd, calls):
    def hf_hub_download(repo_id, filename, *, revision=None, local_dir=None, **kwargs):
        calls.append((repo_id, filename, revision))
        dst = os.path.join(local_dir, filename)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        torch.save(sd, dst)
        return dst

    return hf_hub_download


def test_hf_weights_fetched_once_into_the_cache(tiny_sd, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub(tmp_path, tiny_sd, calls))
    spec = "hf://FunAILab/NeCo@v1/vit-small/dinov2-architectures/model.ckpt"
    for _ in range(2):
        assert_loaded(build_backbone("vit_tiny", weights=spec, cache_dir=tmp_path), tiny_sd)
    assert calls == [("FunAILab/NeCo", "vit-small/dinov2-architectures/model.ckpt", "v1")]
    assert (tmp_path / "huggingface/FunAILab/NeCo@v1/vit-small/dinov2-architectures/model.ckpt").is_file()


def test_hf_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache (offline mode)")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(WeightsError) as e:
        build_backbone("vit_tiny", weights="hf://owner/repo/sub/w.safetensors", cache_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "huggingface/owner/repo/sub/w.safetensors") in msg and "backbone.weights" in msg
    with pytest.raises(WeightsError, match=r"hf://<owner>/<repo>"):
        build_backbone("vit_tiny", weights="hf://owner/file.pth", cache_dir=tmp_path)


def test_tiny_has_no_default_weights():
    with pytest.raises(WeightsError, match="backbone.weights=random"):
        build_backbone("vit_tiny")


# ------------------------------------------------------------------------------------------------ pickles


class Payload:
    """Stands for arbitrary code in a pickle: a weights-only load must refuse to build it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "plain pickle"])
def test_pickled_code_is_refused_and_never_runs(tiny_sd, tmp_path, how):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    if how == "torch.save":
        torch.save({"state_dict": tiny_sd, "extra": Payload(marker)}, path)
    else:  # a bare pickle (protocol 2, which torch's legacy reader accepts) with the payload as the weights
        path.write_bytes(pickle.dumps({"cls_token": Payload(marker)}, protocol=2))
    with pytest.raises(WeightsError, match=r"\(posix\.system\) and is refused"):
        build_backbone("vit_tiny", weights=str(path))
    assert not marker.exists()
    # The file really carries code: an unrestricted unpickler runs it.
    if how == "torch.save":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


# ------------------------------------------------------------------------------------------------ mismatches


def test_strict_mismatch_report_and_non_strict_load(tiny_sd, tmp_path, caplog):
    bad = {k: v for k, v in tiny_sd.items() if k != "blocks.3.mlp.fc2.bias"}
    bad["blocks.1.attn.extra"] = torch.zeros(3)
    path = save(bad, tmp_path / "bad.pth")
    with pytest.raises(WeightsError) as e:
        build_backbone("vit_tiny", weights=path)
    msg = str(e.value)
    assert "1 missing" in msg and "blocks.3.mlp.fc2.bias" in msg
    assert "1 unexpected" in msg and "blocks.1.attn.extra" in msg and "backbone.strict=false" in msg
    with caplog.at_level(logging.WARNING):
        b = build_backbone("vit_tiny", weights=path, strict=False)
    assert "blocks.3.mlp.fc2.bias" in caplog.text
    key = "blocks.0.attn.qkv.weight"
    torch.testing.assert_close(b.state_dict()[key], tiny_sd[key])
