"""Which images a batched evaluation visits (METHOD.md §10.13).

The reference evaluates with a sequential loader that, in some protocols, drops the last partial batch, so
fewer images than the split holds are scored: VOC val (1,449 images) gives 1,440 at batch 32 and 1,408 at
batch 128. The protocols reproduce that by scoring only the first :func:`evaluated_count` images.
"""

from __future__ import annotations

__all__ = ["evaluated_count"]


def evaluated_count(num_images: int, batch_size: int, drop_last: bool) -> int:
    """Images a sequential loader of ``batch_size`` visits: all, or only the full batches with ``drop_last``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return (num_images // batch_size) * batch_size if drop_last else num_images
