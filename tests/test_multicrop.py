import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.ops import roi_align

from neco.data.multicrop import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropSamplingError,
    MultiCrop,
    pairwise_boxes,
    sample_crop_boxes,
)


def smooth_image(seed: int, width: int = 320, height: int = 240) -> Image.Image:
    """Bicubically upsampled noise: smooth enough that resampling error stays well below real misalignment."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 3, 6, 8, generator=g)
    up = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)[0]
    return Image.fromarray((up.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]


def roi7(image: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    boxes = [box[None].float()]
    return roi_align(image[None], boxes, output_size=7, spatial_scale=1.0, sampling_ratio=-1, aligned=True)[0]


class _Mapped(Dataset):
    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.transform(self.items[i])


def intersection_area(a, b) -> int:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def test_worked_example_of_the_spec():
    # METHOD.md §1.4: 640x480 image, gc0 [100, 50, 500, 350] -> 224, lc0 [300, 200, 420, 290] -> 98.
    abs_boxes = torch.tensor([[100, 50, 500, 350], [0, 0, 640, 480], [300, 200, 420, 290]])
    boxes = pairwise_boxes(abs_boxes, [224, 224, 98], num_global=2)
    assert boxes["gc"].shape == (2, 3, 4) and boxes["all"].shape == (3, 2, 4)
    assert boxes["gc"].dtype == torch.float32
    torch.testing.assert_close(boxes["gc"][0, 2], torch.tensor([112.0, 112.0, 179.2, 179.2]))
    torch.testing.assert_close(boxes["all"][2, 0], torch.tensor([0.0, 0.0, 98.0, 98.0]))
    torch.testing.assert_close(boxes["gc"][0, 2] / 14, torch.tensor([8.0, 8.0, 12.8, 12.8]))
    # gc1 is the whole image: the lc0 region in its frame is the absolute box scaled by 224/640, 224/480.
    torch.testing.assert_close(boxes["gc"][1, 2], torch.tensor([105.0, 93.333336, 147.0, 135.33333]))


def test_pairwise_boxes_rejects_disjoint_crops():
    with pytest.raises(ValueError, match="do not overlap"):
        pairwise_boxes(torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30]]), [8, 8], num_global=1)


@pytest.mark.parametrize("size", [(640, 480), (300, 900), (20, 15), (1, 1)])
def test_sampled_boxes_respect_the_overlap_rules(size):
    width, height = size
    need = int(width * height * 0.01)
    torch.manual_seed(1)
    for _ in range(20):
        b = sample_crop_boxes(width, height).tolist()
        assert len(b) == 6
        for x1, y1, x2, y2 in b:
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert intersection_area(b[1], b[0]) > 2 * need
        for j in range(2, 6):
            assert intersection_area(b[j], b[0]) > need and intersection_area(b[j], b[1]) > need
        boxes = pairwise_boxes(torch.tensor(b), [224, 224, 98, 98, 98, 98], 2)
        for g in range(2):
            torch.testing.assert_close(boxes["gc"][g, g], torch.tensor([0.0, 0.0, 224.0, 224.0]))
            torch.testing.assert_close(boxes["all"][g, g], torch.tensor([0.0, 0.0, 224.0, 224.0]))
        # Every box is a non-empty region inside its own crop frame.
        sizes = torch.tensor([224.0, 224.0, 98, 98, 98, 98])
        for t, side in ((boxes["gc"], sizes[:2, None]), (boxes["all"], sizes[:, None])):
            assert bool((t[..., 2:] > t[..., :2]).all())
            assert bool((t >= -1e-4).all()) and bool((t <= side[..., None] + 1e-4).all())


def test_sampling_follows_the_global_torch_rng():
    torch.manual_seed(7)
    a = sample_crop_boxes(500, 400)
    torch.manual_seed(7)
    b = sample_crop_boxes(500, 400)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_crop_boxes(500, 400))


def test_both_boxes_of_a_pair_see_the_same_image_region():
    """METHOD.md §1.4: ROI-align of the shared region through either crop gives the same 7x7 picture."""
    torch.manual_seed(0)
    transform = MultiCrop(global_size=64, local_size=32, photometric=False)
    errors, shifted_errors = [], []
    for seed in range(4):
        image = smooth_image(seed)
        original = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
        # Boxes are drawn before anything else, so re-seeding recovers the absolute boxes of the crops.
        torch.manual_seed(seed)
        abs_boxes = transform.sample_boxes(*image.size).float()
        torch.manual_seed(seed)
        crops, boxes = transform(image)
        crops = [unnormalise(c) for c in crops]
        for g in range(2):
            for j in range(6):
                if j == g:
                    continue
                via_g = roi7(crops[g], boxes["gc"][g, j])
                via_j = roi7(crops[j], boxes["all"][j, g])
                lo = torch.maximum(abs_boxes[g, :2], abs_boxes[j, :2])
                region = torch.cat([lo, torch.minimum(abs_boxes[g, 2:], abs_boxes[j, 2:])])
                direct = roi7(original, region)
                errors += [(via_g - via_j).abs().mean().item(), (via_g - direct).abs().mean().item()]
                # A box moved by 15 % of its width must be clearly worse: the check has teeth.
                moved = boxes["all"][j, g].clone()
                moved[[0, 2]] += 0.15 * (moved[2] - moved[0])
                shifted_errors.append((via_g - roi7(crops[j], moved)).abs().mean().item())
    # Observed: at most ~2e-3 (interpolation and uint8 rounding) against ~0.15 for the moved boxes.
    assert max(errors) < 0.006, max(errors)
    assert np.mean(shifted_errors) > 20 * np.mean(errors)


def test_output_shapes_and_collation():
    torch.manual_seed(0)
    transform = MultiCrop(global_size=56, local_size=28)
    items = [transform(smooth_image(s, 120, 90)) for s in range(3)]
    crops, boxes = items[0]
    assert [tuple(c.shape) for c in crops] == [(3, 56, 56)] * 2 + [(3, 28, 28)] * 4
    assert all(c.dtype == torch.float32 for c in crops)
    inputs, batch_boxes = default_collate(items)
    assert len(inputs) == 6
    assert [tuple(x.shape) for x in inputs] == [(3, 3, 56, 56)] * 2 + [(3, 3, 28, 28)] * 4
    assert batch_boxes["gc"].shape == (3, 2, 6, 4)
    assert batch_boxes["all"].shape == (3, 6, 2, 4)


def test_photometric_augmentation_changes_pixels_not_boxes():
    image = smooth_image(3)
    torch.manual_seed(5)
    plain_crops, plain_boxes = MultiCrop(48, 24, photometric=False)(image)
    torch.manual_seed(5)
    aug_crops, aug_boxes = MultiCrop(48, 24)(image)
    torch.testing.assert_close(aug_boxes["gc"], plain_boxes["gc"])
    torch.testing.assert_close(aug_boxes["all"], plain_boxes["all"])
    assert any(not torch.allclose(a, p) for a, p in zip(aug_crops, plain_crops, strict=True))
    assert all(torch.isfinite(c).all() for c in aug_crops)


def test_bounded_resampling_raises_a_clear_error():
    transform = MultiCrop(32, 16, min_intersection=0.99, max_resample=20, photometric=False)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="data.min_intersection") as info:
        transform(smooth_image(0, 64, 48))
    assert isinstance(info.value, CropSamplingError)
    assert "64x48" in str(info.value) and "data.max_resample" in str(info.value)
    # Through a loader worker the error keeps its type, so the entry point can report it as a user error.
    loader = DataLoader(_Mapped([smooth_image(0, 64, 48)] * 2, transform), batch_size=2, num_workers=1)
    with pytest.raises(CropSamplingError, match="data.max_resample"):
        next(iter(loader))


def test_tiny_image_is_upsampled_into_valid_crops():
    torch.manual_seed(0)
    image = smooth_image(1, 20, 15)
    crops, boxes = MultiCrop(global_size=64, local_size=32, photometric=False)(image)
    assert [c.shape[-1] for c in crops] == [64, 64, 32, 32, 32, 32]
    assert torch.isfinite(boxes["gc"]).all() and torch.isfinite(boxes["all"]).all()
    assert bool((boxes["gc"][..., 2:] > boxes["gc"][..., :2]).all())
    assert bool((boxes["all"][..., 2:] > boxes["all"][..., :2]).all())


def test_grayscale_and_palette_inputs_give_three_channels():
    torch.manual_seed(0)
    for mode in ("L", "P"):
        crops, _ = MultiCrop(32, 16)(smooth_image(2, 64, 48).convert(mode))
        assert all(c.shape[0] == 3 for c in crops)
