"""Low-shot training subsets (METHOD.md §6.3): fixed image-id lists per (dataset, fraction, seed).

A list is read from ``subset_dir`` when the user has one, otherwise generated deterministically from the seed.
Either way it is saved next to the result so that the number can be reproduced.

File names looked up in ``subset_dir``, first match wins (``<tag>`` is ``1_div_<n>`` when the fraction is 1/n,
else ``frac_<fraction>``; ``<n>`` = 1/fraction):

1. ``<dataset>_<tag>_<seed>.txt`` (the name this module writes, so a saved ``subsets/`` folder can be reused);
2. ``<pub>/<tag>/<prefix>_<n>_<seed>.txt`` and 3. ``<tag>/<prefix>_<n>_<seed>.txt``: the layout of the
   published open-hummingbird-eval lists (``file_sets/voc/1_div_128/trainaug_128_42.txt``,
   ``file_sets/ade20k/1_div_8/training_8_42.txt``), i.e. pass ``subset_dir=<that repo>/file_sets``.

One image id per line (blank lines ignored). Generated lists: ``numpy.random.default_rng(seed).choice`` without
replacement over the sorted ids of the split, ``round(fraction * N)`` of them (at least 1), saved sorted. The
published lists have other sizes (VOC 1/8, 1/64, 1/128: 1,320 / 160 / 80 images; ADE20K 2,550 / 300 / 150), so use
them to compare with published numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Subset

from neco.errors import ConfigError

# Dataset name -> (folder, file prefix) of the published lists.
PUBLISHED = {"voc": ("voc", "trainaug"), "ade20k": ("ade20k", "training")}


def fraction_denominator(fraction: float) -> int | None:
    """``n`` when ``fraction`` is 1/n (to 1e-6), else None."""
    n = 1.0 / fraction
    return int(round(n)) if abs(n - round(n)) < 1e-6 * n else None


def fraction_tag(fraction: float) -> str:
    n = fraction_denominator(fraction)
    return f"1_div_{n}" if n is not None else f"frac_{fraction:g}"


def subset_candidates(subset_dir, dataset_name: str, fraction: float, seed: int) -> list[Path]:
    root, tag, n = Path(subset_dir).expanduser(), fraction_tag(fraction), fraction_denominator(fraction)
    paths = [root / f"{dataset_name}_{tag}_{seed}.txt"]
    if n is not None and dataset_name in PUBLISHED:
        folder, prefix = PUBLISHED[dataset_name]
        paths += [root / folder / tag / f"{prefix}_{n}_{seed}.txt", root / tag / f"{prefix}_{n}_{seed}.txt"]
    return paths


def read_ids(path) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def dataset_ids(dataset) -> list[str]:
    """Every image id of ``dataset`` (``image_id(i)`` when it has one, else the index as a string)."""
    image_id = getattr(dataset, "image_id", None)
    return [image_id(i) if image_id else str(i) for i in range(len(dataset))]


def generate_ids(all_ids: list[str], fraction: float, seed: int) -> list[str]:
    ids = sorted(all_ids)
    size = max(1, int(round(fraction * len(ids))))
    chosen = np.random.default_rng(seed).choice(len(ids), size=size, replace=False)
    return sorted(ids[i] for i in chosen)


def select(dataset, ids: list[str]):
    """The images of ``dataset`` with these ids, in this order (``dataset.select`` when it exists)."""
    if hasattr(dataset, "select"):
        return dataset.select(ids)
    where = {v: i for i, v in enumerate(dataset_ids(dataset))}
    missing = [v for v in ids if v not in where]
    if missing:
        raise ConfigError(f"{len(missing)} subset ids are not in the {getattr(dataset, 'split', '')} split "
                          f"(first: {missing[:3]}); check eval.hummingbird.subset_dir")
    return Subset(dataset, [where[v] for v in ids])


def resolve_subset(dataset, dataset_name: str, fraction: float, seed: int, subset_dir, out_dir) -> dict:
    """Ids of the low-shot subset and where they came from; the list is saved to ``out_dir/subsets/``.

    Returns ``{"ids", "source" (the file read, or "generated"), "saved" (path written)}``.
    """
    if subset_dir:
        tried = subset_candidates(subset_dir, dataset_name, fraction, seed)
        found = next((p for p in tried if p.is_file()), None)
        if found is None:
            raise ConfigError(f"eval.hummingbird.subset_dir={subset_dir}: no list for fraction {fraction} seed "
                              f"{seed}; looked for {', '.join(str(p) for p in tried)} (leave subset_dir unset "
                              "to generate the lists)")
        ids, source = read_ids(found), str(found)
        if not ids:
            raise ConfigError(f"subset list {found} is empty")
    else:
        ids, source = generate_ids(dataset_ids(dataset), fraction, seed), "generated"
    saved = Path(out_dir) / "subsets" / f"{dataset_name}_{fraction_tag(fraction)}_{seed}.txt"
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text("".join(f"{v}\n" for v in ids))
    return {"ids": ids, "source": source, "saved": str(saved)}
