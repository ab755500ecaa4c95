"""Procedural scenes with pixel-exact masks: the embedded default dataset (no files, no downloads).

Each image is a textured random background (class 0) with a few objects drawn on top of each other. The
object classes differ by shape and texture only: every object's colours are drawn uniformly at random, so
colour says nothing about the class and a model has to look at spatial structure, which is what dense
features are evaluated on. Later objects cover earlier ones and the mask follows the pixels exactly.

Image ``i`` of a split is a pure function of ``(seed, split, i)``: it does not depend on which worker
renders it or in which order, so loaders with any number of workers see the same data.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

CLASS_NAMES = ("background", "disc", "square", "triangle", "ring", "striped blob", "checkered rectangle")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


class SyntheticScenes(Dataset):
    """``(PIL RGB image, LongTensor mask (H, W))`` pairs; class ids ``0 .. num_classes - 1``, 0 = background.

    ``ignore_index`` is provided for evaluators; the masks themselves are exact and contain no ignored pixel.
    """

    class_names = CLASS_NAMES
    num_classes = len(CLASS_NAMES)
    ignore_index = 255

    def __init__(
        self,
        split: str = "train",
        num_images: int = 512,
        image_size: int = 128,
        seed: int = 0,
        max_objects: int = 4,
    ):
        if split not in SPLIT_IDS:
            raise ValueError(f"unknown synthetic split {split!r}; expected one of {sorted(SPLIT_IDS)}")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
        if max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {max_objects}")
        self.split = split
        self.num_images = int(num_images)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.max_objects = int(max_objects)
        # Pixel-centre coordinates, shared by every render.
        centres = np.arange(self.image_size, dtype=np.float32) + 0.5
        self._y, self._x = np.meshgrid(centres, centres, indexing="ij")

    def __len__(self) -> int:
        return self.num_images

    def image_id(self, index: int) -> str:
        """A stable name for image ``index`` (the on-disk datasets use file stems)."""
        return f"{self.split}_{index:06d}"

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLIT_IDS[self.split], index])

    def __getitem__(self, index: int) -> tuple[Image.Image, torch.Tensor]:
        if index < 0:
            index += self.num_images
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} synthetic images")
        image, mask = self.render(self.rng(index))
        return Image.fromarray(image), torch.from_numpy(mask.astype(np.int64))

    # Rendering -----------------------------------------------------------------------------------------

    def render(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One scene from ``rng``: ``uint8 (S, S, 3)`` image and ``uint8 (S, S)`` class mask."""
        size = self.image_size
        canvas = self._background(rng)
        mask = np.zeros((size, size), dtype=np.uint8)
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            cls = int(rng.integers(1, self.num_classes))
            window, inside, texture = self._object(rng, cls)
            colours = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
            canvas[window][inside] = colours[texture[inside].astype(np.intp)]
            mask[window][inside] = cls
        # Fine noise over everything so that no region is perfectly flat.
        canvas += 6.0 * rng.standard_normal(size=canvas.shape, dtype=np.float32)
        return np.clip(canvas, 0, 255).astype(np.uint8), mask

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """A smooth random colour field plus a faint blotchy texture, float32 ``(S, S, 3)``."""
        size = self.image_size
        k = int(rng.integers(2, 6))
        coarse = rng.uniform(0, 255, size=(k, k, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), np.float32)
        # Blotches at a finer scale, one grey-level field modulating all channels.
        m = max(4, size // 8)
        fine = rng.uniform(-25, 25, size=(m, m)).astype(np.float32)
        fine = np.asarray(Image.fromarray(fine).resize((size, size), Image.BILINEAR), np.float32)
        return field + fine[..., None]

    def _object(
        self, rng: np.random.Generator, cls: int
    ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
        """The object's bounding window, the boolean mask of its pixels inside that window, and a 0/1
        texture map choosing between its two colours."""
        size = self.image_size
        cx, cy = rng.uniform(0.15, 0.85, size=2) * size
        r = float(rng.uniform(0.08, 0.22)) * size
        theta = float(rng.uniform(0, 2 * np.pi))
        # Every shape below fits in a disc of radius 1.5 r; only that window is evaluated (speed).
        reach = 1.5 * r
        window = (
            slice(max(0, int(cy - reach)), min(size, int(np.ceil(cy + reach)) + 1)),
            slice(max(0, int(cx - reach)), min(size, int(np.ceil(cx + reach)) + 1)),
        )
        dx, dy = self._x[window] - cx, self._y[window] - cy
        # Object-frame coordinates: a random rotation makes orientation carry no class information.
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        flat = np.zeros(u.shape, dtype=np.uint8)
        name = CLASS_NAMES[cls]
        if name == "disc":
            return window, u * u + v * v <= r * r, flat
        if name == "square":
            return window, np.maximum(np.abs(u), np.abs(v)) <= 0.85 * r, flat
        if name == "triangle":
            # Equilateral triangle with circumradius r: inside every edge's half-plane (inradius r / 2).
            inside = np.ones(u.shape, dtype=bool)
            for phi in (-np.pi / 2, np.pi / 6, 5 * np.pi / 6):
                inside &= u * np.cos(phi) + v * np.sin(phi) <= 0.5 * r
            return window, inside, flat
        if name == "ring":
            d2 = u * u + v * v
            return window, (d2 <= r * r) & (d2 >= (0.55 * r) ** 2), flat
        if name == "striped blob":
            a1, a2 = rng.uniform(0.05, 0.25, size=2)
            p1, p2 = rng.uniform(0, 2 * np.pi, size=2)
            phi = np.arctan2(v, u)
            radius = r * (1 + a1 * np.cos(2 * phi + p1) + a2 * np.cos(3 * phi + p2))
            period = max(4.0, float(rng.uniform(0.3, 0.5)) * r)
            stripes = (np.floor(u / (period / 2)) % 2).astype(np.uint8)
            return window, u * u + v * v <= radius * radius, stripes
        if name == "checkered rectangle":
            half_h = r * float(rng.uniform(0.5, 0.9))
            cell = max(3.0, float(rng.uniform(0.25, 0.4)) * r)
            checks = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.uint8)
            return window, (np.abs(u) <= r) & (np.abs(v) <= half_h), checks
        raise AssertionError(f"no renderer for class {name!r}")


class SyntheticTrain(Dataset):
    """Training view of :class:`SyntheticScenes`: ``transform(image)`` only, masks dropped."""

    def __init__(self, transform: Callable | None = None, **kwargs):
        self.scenes = SyntheticScenes(**kwargs)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int):
        image, _ = self.scenes[index]
        return self.transform(image) if self.transform is not None else image
