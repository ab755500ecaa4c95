"""The Python API: `neco.load_backbone` and `neco.extract_features`, on a tiny random ViT."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_
from PIL import Image

from neco import api as neco  # the functions `neco` re-exports (checked in a subprocess below)
from neco.models import Backbone, WeightsError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def model():
    return randomize_(neco.load_backbone("vit_tiny", weights="random"), seed=0)


def reference(model, x):
    with torch.no_grad():
        return model((x - MEAN) / STD).permute(0, 3, 1, 2)


def test_import_neco_is_cheap_and_api_is_reexported():
    # Run from the repository root, where `neco` is the package itself whatever the install mode.
    code = ("import sys, neco; assert 'torch' not in sys.modules, 'import neco pulled in torch'; "
            "from neco import api; assert neco.load_backbone is api.load_backbone; "
            "assert neco.extract_features is api.extract_features; "
            "assert {'load_backbone', 'extract_features'} <= set(dir(neco)); "
            "assert not hasattr(neco, 'nope')")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, cwd=REPO)


def test_load_backbone_eval_mode_and_weights_file(model, tmp_path):
    assert isinstance(model, Backbone) and not model.training
    assert next(model.parameters()).device.type == "cpu"
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    again = neco.load_backbone("vit_tiny", weights=tmp_path / "tiny.pth", img_size=64)
    assert again.grid_size == 8 and not again.training
    with pytest.raises(WeightsError, match="^weights=.*no such file. Set weights to"):
        neco.load_backbone("vit_tiny", weights=tmp_path / "missing.pth")


def test_features_of_a_tensor_batch(model):
    x = torch.rand(5, 3, 72, 64)
    out = neco.extract_features(model, x, batch_size=2)
    assert out.shape == (5, 128, 9, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference(model, x), rtol=1e-5, atol=1e-5)
    raw = neco.extract_features(model, (x - MEAN) / STD, normalize=False)
    torch.testing.assert_close(raw, out, rtol=1e-5, atol=1e-5)
    as_uint8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(neco.extract_features(model, as_uint8), reference(model, as_uint8 / 255.0),
                               rtol=1e-5, atol=1e-5)


def test_resize_and_pil_images(model):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(50, 70), (64, 64), (90, 40)]]
    images = [Image.fromarray(a) for a in arrays]
    with pytest.raises(ValueError, match="image_size"):
        neco.extract_features(model, images)
    out = neco.extract_features(model, images, image_size=48)
    assert out.shape == (3, 128, 6, 6)
    x = torch.from_numpy(arrays[0]).permute(2, 0, 1)[None].float() / 255
    resized = F.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(out[:1], reference(model, resized), rtol=1e-5, atol=1e-5)
    # Grayscale and palette images become RGB.
    gray = [Image.fromarray(arrays[1][..., 0]), Image.fromarray(arrays[1]).convert("P")]
    assert neco.extract_features(model, gray).shape == (2, 128, 8, 8)


def test_mode_restored_and_bad_input(model):
    model.train()
    neco.extract_features(model, torch.rand(1, 3, 32, 32))
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        neco.extract_features(model, torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="no images"):
        neco.extract_features(model, [])
    with pytest.raises(TypeError, match="PIL images"):
        neco.extract_features(model, ["image.jpg"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_on_cuda_matches_cpu(model):
    x = torch.rand(4, 3, 64, 64)
    cpu = neco.extract_features(model, x)
    cuda = neco.extract_features(model, x, device="cuda")
    model.to("cpu")
    assert cuda.device.type == "cpu" and cuda.dtype == torch.float32
    torch.testing.assert_close(cuda, cpu, rtol=0.05, atol=0.05)  # bf16 autocast
