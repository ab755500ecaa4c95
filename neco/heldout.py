"""The NeCo objective on held-out crops: the training objective's own measure of what a run changed.

Dense mIoU on a short run moves by fractions of a point; the loss on crops the run never trained on moves
clearly and says whether the student learned to reproduce the teacher's neighbour orderings beyond its
training images. The same crops and references are drawn for every measurement (a fixed seed inside a forked
RNG, so the training run's random stream is untouched), the networks run in eval mode without gradients, and
a copy of the objective is used, so a reference queue is never modified.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch.utils.data import DataLoader

from neco.loss.masks import teacher_foreground


class HeldOutLoss:
    """Mean NeCo loss of ``(student, teacher)`` over ``num_images`` held-out images, in batches of ``batch_size``.

    ``dataset`` yields ``(crops, boxes)`` as the training dataset does (the multi-crop transform applied);
    ``masked`` and ``blur_padding`` are the training's ``loss.mask != all`` and ``loss.mask_blur_padding``.
    """

    def __init__(self, dataset, batch_size: int, num_global: int, use_teacher: bool = True, seed: int = 0,
                 masked: bool = False, blur_padding: str = "reflect"):
        self.dataset, self.batch_size, self.num_global = dataset, batch_size, num_global
        self.use_teacher, self.seed, self.masked = use_teacher, seed, masked
        self.blur_padding = blur_padding

    def _batches(self):
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, drop_last=True, num_workers=0)
        return iter(loader)

    @torch.no_grad()
    def __call__(self, student, teacher, objective, device: torch.device, amp_dtype=None) -> float:
        objective = copy.deepcopy(objective)
        modes = student.training, teacher.training
        student.eval()
        teacher.eval()
        autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                    else contextlib.nullcontext())
        total, count = 0.0, 0
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(self.seed)
                for crops, boxes in self._batches():
                    crops = [c.to(device) for c in crops]
                    boxes = {k: v.to(device) for k, v in boxes.items()}
                    with autocast:
                        student_maps = student(crops)
                        out = (teacher(crops[: self.num_global], with_attention=self.masked) if self.use_teacher
                               else student_maps[: self.num_global])
                    # As in training (neco.engine.trainer): loss.mask=fg|bg weighs cells by the teacher's attention.
                    teacher_maps, fg = out, None
                    if self.masked and self.use_teacher:
                        teacher_maps, attention = out
                        fg = teacher_foreground(attention, self.blur_padding)
                    total += float(objective(student_maps, teacher_maps, boxes, fg))
                    count += 1
        finally:
            student.train(modes[0])
            teacher.train(modes[1])
        if count == 0:
            raise ValueError(f"held-out loss: fewer than batch_size={self.batch_size} held-out images")
        return total / count
