"""The one label-resize module (neco.eval.primitives.labels): each named sampling rule, the crop box and the
two-step mask pipeline give the documented, different outputs on hand-made maps, and each equals the library
operation a caller used before (PIL's nearest, torch's nearest, PIL crop + resize, torchvision resized_crop)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from neco.choices import LabelResize
from neco.eval.primitives.labels import (
    CENTRE,
    LABEL_RESIZE_MODES,
    LEGACY_NEAREST,
    nearest_source_indices,
    resize_label_map,
    resize_mask,
    tokens_to_mask,
)

GRID4 = np.arange(16).reshape(4, 4)
GRID6 = np.arange(36).reshape(6, 6)


def pil_nearest(labels: np.ndarray, size: tuple[int, int], box=None) -> np.ndarray:
    img = Image.fromarray(labels.astype(np.int32))  # mode "I"
    if box is not None:
        img = img.crop(box)
    return np.asarray(img.resize((size[1], size[0]), Image.Resampling.NEAREST))


def torch_nearest(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].round().long()


def test_the_modes_are_the_config_enum():
    assert set(LABEL_RESIZE_MODES) == set(LabelResize) and LEGACY_NEAREST == "legacy_nearest" and CENTRE == "centre"
    # A config value (the enum member) and its plain string select the same rule.
    assert resize_label_map(GRID4, 2, LabelResize.centre).tolist() == resize_label_map(GRID4, 2, "centre").tolist()


def test_legacy_reads_the_top_left_and_centre_the_middle_of_each_cell():
    assert nearest_source_indices(4, 2, LEGACY_NEAREST).tolist() == [0, 2]
    assert nearest_source_indices(4, 2, CENTRE).tolist() == [1, 3]
    assert nearest_source_indices(6, 4, LEGACY_NEAREST).tolist() == [0, 1, 3, 4]
    assert nearest_source_indices(6, 4, CENTRE).tolist() == [0, 2, 3, 5]
    assert nearest_source_indices(3, 5, LEGACY_NEAREST).tolist() == [0, 0, 1, 1, 2]  # upsampling differs too
    assert nearest_source_indices(3, 5, CENTRE).tolist() == [0, 0, 1, 2, 2]
    # PIL's own tie rounding, kept: output pixel 3 of 7 has its centre exactly on source pixel 1's edge
    # ((3 + 0.5) * 2 / 7 = 1), and PIL reads pixel 0 there.
    assert nearest_source_indices(2, 7, CENTRE).tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert resize_label_map(GRID4, 2, LEGACY_NEAREST).tolist() == [[0, 2], [8, 10]]
    assert resize_label_map(GRID4, 2, CENTRE).tolist() == [[5, 7], [13, 15]]


@pytest.mark.parametrize("hw,size", [((7, 9), (3, 3)), ((40, 48), (32, 32)), ((33, 17), (100, 100)),
                                     ((375, 500), (448, 448)), ((5, 5), (7, 3))])
def test_each_rule_is_its_library_operation(hw, size):
    labels = np.random.default_rng(sum(hw)).integers(0, 300, hw).astype(np.int32)
    centre = resize_label_map(labels, size, CENTRE)
    assert centre.dtype == np.int32 and np.array_equal(centre, pil_nearest(labels, size))
    legacy = resize_label_map(torch.from_numpy(labels).long(), size, LEGACY_NEAREST)
    assert legacy.dtype == torch.int64 and torch.equal(legacy, torch_nearest(torch.from_numpy(labels), size))


def test_crop_box_resizes_the_region_not_the_whole_map():
    box = (1, 0, 4, 4)  # (left, top, right, bottom): columns 1..3, every row
    assert resize_label_map(GRID4, (2, 2), LEGACY_NEAREST, box=box).tolist() == [[1, 2], [9, 10]]
    assert resize_label_map(GRID4, (2, 2), CENTRE, box=box).tolist() == [[5, 7], [13, 15]]
    with pytest.raises(ValueError, match="does not lie inside"):
        resize_label_map(GRID4, 2, CENTRE, box=(-1, 0, 3, 4))  # PIL and torchvision would pad, differently
    with pytest.raises(ValueError, match="does not lie inside"):
        resize_label_map(GRID4, 2, CENTRE, box=(2, 0, 2, 4))


@pytest.mark.parametrize("box", [(0, 0, 48, 40), (3, 5, 30, 40), (10, 1, 21, 13)])
@pytest.mark.parametrize("size", [8, 32, 100])
def test_crop_box_is_pil_crop_resize_and_torchvision_resized_crop(box, size):
    labels = np.random.default_rng(size).integers(0, 256, (40, 48)).astype(np.int32)
    got = resize_label_map(labels, (size, size), CENTRE, box=box)
    assert np.array_equal(got, pil_nearest(labels, (size, size), box))  # the linear protocol's crops
    left, top, right, bottom = box
    want = TF.resized_crop(torch.from_numpy(labels)[None].float(), top, left, bottom - top, right - left,
                           [size, size], InterpolationMode.NEAREST)[0].round().long()
    got = resize_label_map(torch.from_numpy(labels).long(), size, LEGACY_NEAREST, box=box)
    assert torch.equal(got, want)  # the Hummingbird memory's crops


def test_mask_pipeline_two_steps_each_with_its_rule():
    # 6x6 ground truth -> 4 px input -> 2x2 evaluation masks: every combination of the two rules differs from
    # the others or from a single 6 -> 2 step.
    got = {(i, s): resize_mask(GRID6, 4, 2, label_resize=s, input_resize=i).tolist()
           for i in LABEL_RESIZE_MODES for s in LABEL_RESIZE_MODES}
    assert got[(CENTRE, CENTRE)] == [[14, 17], [32, 35]]
    assert got[(CENTRE, LEGACY_NEAREST)] == [[0, 3], [18, 21]]  # NeCo's loaders, then the reference's shrink
    assert got[(LEGACY_NEAREST, CENTRE)] == [[7, 10], [25, 28]]
    assert got[(LEGACY_NEAREST, LEGACY_NEAREST)] == [[0, 3], [18, 21]]
    assert resize_label_map(GRID6, 2, CENTRE).tolist() == [[7, 10], [25, 28]] != got[(CENTRE, CENTRE)]
    # 4x4 -> 4 -> 2: the default shrink is the reference's, the single resize to the input size the loaders'.
    assert resize_mask(GRID4, 4, 2).tolist() == [[0, 2], [8, 10]]
    assert resize_mask(GRID4, 4, 2, label_resize=CENTRE).tolist() == [[5, 7], [13, 15]]
    assert resize_mask(GRID4, 2, input_resize=LEGACY_NEAREST).tolist() == [[0, 2], [8, 10]]  # Hummingbird's
    assert resize_mask(GRID4, 2).tolist() == [[5, 7], [13, 15]]
    # No second step without mask_size (or with the input size): the quick check's and Hummingbird's masks.
    assert resize_mask(GRID6, 4).tolist() == pil_nearest(GRID6, (4, 4)).tolist()
    assert resize_mask(GRID6, 4, 4, label_resize=LEGACY_NEAREST).tolist() == resize_mask(GRID6, 4).tolist()
    assert resize_mask(GRID6, 4, input_resize=LEGACY_NEAREST).tolist() == resize_label_map(GRID6, 4).tolist()
    assert resize_mask(GRID6, 4).dtype == np.int32


def test_token_maps_follow_the_rule_of_the_masks():
    tokens = torch.arange(4).view(1, 2, 2)  # 2x2 tokens of 2 px on a 4 px input, shown on 3x3 masks
    assert tokens_to_mask(tokens, 4, 3, LEGACY_NEAREST)[0].tolist() == [[0, 0, 1], [0, 0, 1], [2, 2, 3]]
    assert tokens_to_mask(tokens, 4, 3, CENTRE)[0].tolist() == [[0, 1, 1], [2, 3, 3], [2, 3, 3]]


def test_boolean_maps_keep_their_dtype_and_match_torchs_nearest_on_floats():
    # The attention monitor's foreground maps (token grid -> mask size), formerly interpolated as floats.
    maps = torch.rand(3, 5, 7, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    got = resize_label_map(maps, (45, 45), LEGACY_NEAREST)
    want = F.interpolate(maps.float(), size=(45, 45), mode="nearest").bool()
    assert got.dtype == torch.bool and torch.equal(got, want)


def test_unknown_rule_names_the_valid_ones():
    with pytest.raises(ValueError, match="legacy_nearest.*centre"):
        resize_label_map(GRID4, 2, "bilinear")
