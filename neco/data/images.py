"""Reading one image robustly: odd formats decoded to 8-bit RGB, and the skip-or-raise policy for bad files.

Training readers and evaluation datasets share these, so a corrupt file is handled the same way everywhere:
``data.on_bad_image=skip`` replaces it by the next readable image and counts it; ``raise`` stops with its path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import ConcatDataset

from neco.errors import ConfigError, UserError

PathLike = Union[str, os.PathLike]
T = TypeVar("T")

log = logging.getLogger("neco")


class ImageReadError(OSError):
    """An image file exists but cannot be decoded."""


class BadImageError(ImageReadError, UserError):
    """Unreadable images a run cannot go on without; the message names the file and ``data.on_bad_image``."""


def printable(text: Union[PathLike, bytes]) -> str:
    """``text`` (a file name, or a message that holds one) as one printable line, safe for any log or terminal.

    Undecodable bytes of a file name (held by Python as lone surrogates) become ``\\xNN``, control characters
    (a newline in a name) are escaped: logging such a name raw to a UTF-8 file fails, and a newline would split
    a one-line error message.
    """
    text = os.fsdecode(text) if isinstance(text, (bytes, os.PathLike)) else str(text)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that did not come from undecodable bytes
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


BAD_IMAGE_POLICIES = ("skip", "raise")
# A bad file is replaced by the next readable one; this many failures in a row means the data is broken.
MAX_CONSECUTIVE_BAD = 16
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit greyscale ('I;16*', or 'I' as PIL opens some 16-bit files) -> 8-bit 'L', scaled by 255/65535.

    PIL's own convert("RGB") clips these values at 255, which turns most 16-bit images white.
    """
    values = np.asarray(im, dtype=np.float64)
    return Image.fromarray(np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8), mode="L")


def load_rgb(path: PathLike, exif: bool = True) -> Image.Image:
    """Open an image as 8-bit RGB: greyscale, palette, CMYK and 16-bit files included.

    ``exif=True`` applies the EXIF orientation tag (phone photos are often stored rotated). Images with a
    pixel-aligned mask must keep ``exif=False``: masks are drawn on the stored pixels, and the reference
    never rotates either.
    """
    try:
        with Image.open(path) as im:
            if exif:
                im = ImageOps.exif_transpose(im)
            if im.mode in _HIGH_BIT_MODES:
                im = _to_8bit(im)
            elif im.mode in ("P", "PA") and "transparency" in im.info:
                # Palette transparency must go through RGBA, or PIL warns and may mis-map colours.
                im = im.convert("RGBA")
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"could not read image {printable(path)}: {printable(str(e))}") from e


class BadImageCounter:
    """How many unreadable images were replaced so far, shared with DataLoader worker processes.

    The count lives in shared memory so the trainer (main process) sees what its workers skipped. Two workers
    failing at the same instant may lose one increment; the count is a warning signal, not an exact tally.
    """

    def __init__(self):
        self._count = torch.zeros((), dtype=torch.int64).share_memory_()
        self._warned: set[str] = set()  # per process: one warning per file

    def record(self, path: str, error: Exception) -> None:
        self._count += 1
        if path not in self._warned:
            self._warned.add(path)
            log.warning("skipping unreadable image (data.on_bad_image=skip): %s", error)

    @property
    def value(self) -> int:
        return int(self._count)


def check_bad_image_policy(policy: str) -> str:
    if policy not in BAD_IMAGE_POLICIES:
        raise ConfigError(f"data.on_bad_image={policy!r}: choose skip (warn, count, use the next image) or raise")
    return policy


def read_or_substitute(read: Callable[[int], T], index: int, size: int, policy: str,
                       counter: BadImageCounter, path_of: Callable[[int], str], source: str = "") -> T:
    """``read(index)``; under ``policy="skip"`` an :class:`ImageReadError` is counted and the next index is
    read instead (the batch keeps its size, and the replacement is deterministic).

    Raises :class:`BadImageError` (a user error: one line, no traceback) under ``policy="raise"``, or when no
    readable image is found to stand in. ``source`` (e.g. ``paths.folder=/data/x``) says where the files are.
    """
    where = f" of {source}" if source else ""
    setting = f"data.on_bad_image=raise, {source}" if source else "data.on_bad_image=raise"
    tries = min(size, MAX_CONSECUTIVE_BAD)
    for step in range(tries):
        i = (index + step) % size
        try:
            return read(i)
        except ImageReadError as e:
            if policy == "raise":
                raise BadImageError(f"{e} ({setting}; set data.on_bad_image=skip to skip unreadable images)") from e
            counter.record(path_of(i), e)
    verdict = f"no image{where} is readable" if tries == size else f"the dataset{where} looks broken"
    images = "images" if tries > 1 else "image"
    raise BadImageError(
        f"{tries} {images} in a row could not be read, starting at {printable(path_of(index))}: {verdict}, "
        "data.on_bad_image=skip has no image to use instead (run python -m neco.data.check)"
    )


def bad_image_count(dataset) -> int:
    """Unreadable images skipped so far by ``dataset`` (or the parts of a concatenation); 0 if it never skips."""
    counters = {}
    stack = [dataset]
    while stack:
        d = stack.pop()
        if isinstance(d, ConcatDataset):
            stack.extend(d.datasets)
        elif isinstance(getattr(d, "bad_counter", None), BadImageCounter):
            counters[id(d.bad_counter)] = d.bad_counter
    return sum(c.value for c in counters.values())
