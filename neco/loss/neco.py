"""The NeCo objective over all crop pairs of a step: alignment, references, queue and pair losses (METHOD.md §3).

Inputs are the head outputs already arranged as channel-first maps `(B, d, S, S)` per crop (unit vectors per
token). For each ordered pair (teacher global crop t, student crop v != t), both maps are ROI-aligned onto the
k x k grid of the image region the crops share, every image gets k*k reference vectors, and the cross-entropy
between teacher and student soft neighbour orderings is averaged over the pairs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torchvision.ops import roi_align

from neco import choices
from neco.errors import ConfigError
from neco.loss.masks import foreground_cells
from neco.loss.pair import SORTERS, pair_loss
from neco.loss.sorter_choice import resolve_sorter

# The loss is also built from Python without the typed config: its choices are checked against the same enums.
_CHOICES = {
    "network": choices.SortNetwork,
    "distribution": choices.Distribution,
    "similarity": choices.Similarity,
    "references": choices.References,
    "mask": choices.LossMask,
    "reference_source": choices.ReferenceSource,
    "queue_counter": choices.QueueCounter,
    "box_scale": choices.BoxScale,
    "sorter": choices.Sorter,
    "mask_blur_padding": choices.MaskBlurPadding,
    "fg_cell_rule": choices.FgCellRule,
}

QUEUE_ROWS_PER_IMAGE = 10  # the reference pushes 10 random teacher tokens per image and teacher crop


def check_loss_config(cfg) -> None:
    """Fail before training with the option's name when a loss setting is not one we know."""
    for key, choice in _CHOICES.items():
        value, valid = getattr(cfg, key), [member.value for member in choice]
        if value not in valid:
            raise ConfigError(f"loss.{key}={value!r} is not valid; choose one of {', '.join(valid)}")


def align(maps: torch.Tensor, boxes: torch.Tensor, scale: torch.Tensor | float, k: int) -> torch.Tensor:
    """ROI-align `maps (B, d, S, S)` with `boxes (B, m, 4)` (pixels) -> `(B*m, d, k, k)`, image-major.

    torchvision semantics as the reference: spatial scale 1 on boxes already in token units, adaptive
    sampling, aligned=True (METHOD.md §3.2).
    """
    b, m = boxes.shape[:2]
    index = torch.arange(b, device=boxes.device, dtype=maps.dtype).repeat_interleave(m)[:, None]
    rois = torch.cat([index, boxes.reshape(b * m, 4).to(maps.dtype) * scale], dim=1)
    return roi_align(maps, rois, output_size=k, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class NeCoLoss(nn.Module):
    """Holds the reference queue (a buffer, saved in checkpoints) and computes the loss of one step."""

    def __init__(self, cfg, patch_size: int, crop_sizes: list[int], num_global: int, batch_size: int,
                 world_size: int = 1, sorter: Optional[str] = None):
        """`sorter`: the sorter `cfg.sorter` resolved to (neco.train resolves, logs and records it); without
        it, `cfg.sorter=auto` is resolved on the device of the first maps the loss sees."""
        super().__init__()
        check_loss_config(cfg)
        if sorter is not None and sorter not in SORTERS:
            raise ValueError(f"sorter={sorter!r}: expected one of {', '.join(SORTERS)}")
        self.cfg = cfg
        self.sorter = sorter or str(cfg.sorter)
        self.patch_size = patch_size
        self.crop_sizes = list(crop_sizes)
        self.num_global = num_global
        self.k = cfg.roi_size
        self.teacher_steepness = cfg.student_steepness if cfg.teacher_steepness is None else cfg.teacher_steepness
        if cfg.references == "queue":
            rows = cfg.queue_length // world_size
            needed = batch_size * self.k * self.k
            if rows < needed:
                raise ConfigError(
                    f"loss.queue_length={cfg.queue_length} gives {rows} rows per process, fewer than the "
                    f"{needed} references a batch of {batch_size} needs; raise loss.queue_length or use "
                    "loss.references=batch")
            self.register_buffer("queue", torch.zeros(num_global, rows, cfg.head.out_dim))
            self.register_buffer("queue_entries", torch.zeros(num_global, dtype=torch.long))

    # ----------------------------------------------------------------------------------------------------
    def _box_scale(self, crop: int, grid: int) -> float:
        """Pixels -> token units. The reference divides by the patch size, which is off when the crop is not
        a multiple of it (98 px with patch 16, METHOD.md §10.11); `grid` scales by tokens per pixel instead."""
        if self.cfg.box_scale == "patch":
            return 1.0 / self.patch_size
        return grid / self.crop_sizes[crop]

    @torch.no_grad()
    def _push_queue(self, t: int, tokens: torch.Tensor, keep: Optional[torch.Tensor]) -> None:
        """FIFO update of queue t with random teacher tokens of this step (before the loss, as the reference)."""
        rows = tokens.permute(0, 2, 3, 1).reshape(-1, tokens.shape[1]).to(self.queue.dtype)
        if keep is not None:
            rows = rows[keep.reshape(-1)]  # host-device sync: the number of foreground tokens
        length = self.queue.shape[1]
        m = min(QUEUE_ROWS_PER_IMAGE * tokens.shape[0], length, rows.shape[0])
        if m == 0:
            return
        new = rows[torch.randperm(rows.shape[0], device=rows.device)[:m]]
        self.queue[t] = torch.cat([new, self.queue[t, : length - m]])
        if self.cfg.queue_counter == "shared":
            # Reference: one counter for both queues, advanced once per teacher crop, so in the first steps
            # references are drawn from rows that are still zero (METHOD.md §10.6).
            self.queue_entries.copy_((self.queue_entries + m).clamp_max(length))
        else:
            self.queue_entries[t] = (self.queue_entries[t] + m).clamp_max(length)

    def _queue_refs(self, t: int, batch: int, dim: int) -> torch.Tensor:
        n = self.k * self.k
        length = self.queue.shape[1]
        idx = torch.randperm(length, device=self.queue.device)[: batch * n]
        idx = idx % self.queue_entries[t].clamp_min(1)  # the reference's modulo sampling
        refs = self.queue[t][idx].view(batch, self.k, self.k, dim)
        return refs.permute(0, 3, 1, 2)

    def _batch_refs(self, pool_maps: torch.Tensor, cell_keep: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Shuffle the pair's aligned reference-side vectors and give each image k*k of them (METHOD.md §3.4)."""
        batch, dim = pool_maps.shape[:2]
        n = batch * self.k * self.k
        pool = pool_maps.permute(0, 2, 3, 1).reshape(n, dim)
        if cell_keep is not None:
            pool = pool[cell_keep]  # host-device sync: the number of foreground cells
            if pool.shape[0] == 0:
                return None
        repeats = round(n / pool.shape[0]) + 1
        pool = pool.repeat(repeats, 1)[:n]
        pool = pool[torch.randperm(n, device=pool.device)]
        return pool.view(batch, self.k, self.k, dim).permute(0, 3, 1, 2)

    # ----------------------------------------------------------------------------------------------------
    def forward(self, student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor], boxes: dict,
                teacher_fg: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`student_maps`: one `(B, d, S, S)` map per crop; `teacher_maps`: one per global crop;
        `boxes`: `{"gc": (B, G, N, 4), "all": (B, N, G, 4)}` in crop pixels; `teacher_fg`: `(G, B, 1, S, S)`
        foreground masks (1 = foreground) for loss.mask=fg|bg."""
        cfg, k = self.cfg, self.k
        if self.sorter == "auto":
            self.sorter = resolve_sorter(cfg, student_maps[0].device).value
        # The objective runs in fp32 (float64 stays float64) whatever precision the backbone used.
        student_maps = [_at_least_fp32(m) for m in student_maps]
        teacher_maps = [_at_least_fp32(m) for m in teacher_maps]
        num_crops = len(student_maps)
        batch = student_maps[0].shape[0]
        fg = None
        if cfg.mask != "all":
            fg = teacher_fg if cfg.mask == "fg" else 1.0 - teacher_fg

        if cfg.references == "queue":
            for t in range(self.num_global):
                keep = None if fg is None else fg[t].reshape(batch, -1) > 0.5
                self._push_queue(t, teacher_maps[t], keep)

        total = student_maps[0].new_zeros(())
        for t in range(self.num_global):
            grid_t = teacher_maps[t].shape[-1]
            scale_t = self._box_scale(t, grid_t)
            teacher_all = align(teacher_maps[t], boxes["gc"][:, t], scale_t, k)  # (B*N, d, k, k), b*N + v
            if cfg.reference_source == "student":
                ref_all = align(student_maps[t], boxes["gc"][:, t], scale_t, k)
            else:
                ref_all = teacher_all
            fg_all = None
            if fg is not None:
                # A cell is foreground when every ROI sample falls inside the mask (aligned value 1).
                fg_all = foreground_cells(align(fg[t], boxes["gc"][:, t], scale_t, k), cfg.fg_cell_rule)
            pair_sum = total.new_zeros(())
            for v in range(num_crops):
                if v == t:
                    continue
                grid_v = student_maps[v].shape[-1]
                student = align(student_maps[v], boxes["all"][:, v, t][:, None], self._box_scale(v, grid_v), k)
                teacher = teacher_all[v::num_crops]
                cells = None if fg_all is None else fg_all[v::num_crops].reshape(-1)
                if cfg.references == "queue":
                    refs = self._queue_refs(t, batch, student.shape[1])
                else:
                    refs = self._batch_refs(ref_all[v::num_crops], cells)
                    if refs is None:  # no foreground reference: the pair is skipped but still counts
                        continue
                pair_sum = pair_sum + pair_loss(
                    student, teacher, refs, cfg.student_steepness, self.teacher_steepness,
                    network=cfg.network, similarity=cfg.similarity, distribution=cfg.distribution,
                    art_lambda=cfg.art_lambda, cell_mask=cells, sorter=self.sorter)
            total = total + pair_sum / (num_crops - 1)
        return total / self.num_global
