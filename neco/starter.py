"""`python -m neco.starter`: make the quickstart's starting checkpoint (a small "foundation model").

NeCo post-trains a model that already has good image-level features (DINO, DINOv2). For the embedded CPU demo we
make such a model ourselves: `vit_tiny` pretrained for a few minutes on the synthetic scenes with an image-level
self-distillation objective in the style of DINO (Caron et al., 2021: an EMA teacher, centred and sharpened
teacher targets over prototypes, multi-crop). Nothing in that objective looks at patch neighbourhoods, which is
what NeCo then adds. The run is deterministic for a given seed on a given machine and writes a timm-format state
dict of the backbone (`neco/assets/vit_tiny_synthetic.pt` by default).

    python -m neco.starter                      # about five minutes on two CPU cores
    python -m neco.starter --steps 50 --out /tmp/starter.pt
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from neco.config import asset_path
from neco.data.multicrop import MultiCrop
from neco.data.synthetic import SyntheticTrain
from neco.models.backbone import build_backbone
from neco.models.ema import ema_update


class PrototypeHead(nn.Module):
    """Mean-pooled patch tokens -> MLP -> L2-normalised bottleneck -> prototype logits."""

    def __init__(self, in_dim: int, hidden: int = 256, bottleneck: int = 64, prototypes: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.prototypes = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, prototypes, bias=False))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = tokens.mean(dim=(1, 2))
        return self.prototypes(F.normalize(self.mlp(pooled), dim=-1))


def self_distillation_loss(student_logits, teacher_logits, center, num_global, student_temp=0.1,
                           teacher_temp=0.04):
    """Cross-entropy from each teacher global view to every other student view."""
    targets = F.softmax((teacher_logits - center) / teacher_temp, dim=-1).chunk(num_global)
    preds = F.log_softmax(student_logits / student_temp, dim=-1).chunk(len(student_logits) // len(targets[0]))
    total, pairs = 0.0, 0
    for t, target in enumerate(targets):
        for v, pred in enumerate(preds):
            if v != t:
                total = total + (-(target * pred).sum(-1)).mean()
                pairs += 1
    return total / pairs


def pretrain(steps: int, batch_size: int, seed: int, image_size: int, lr: float) -> nn.Module:
    torch.manual_seed(seed)
    crops = MultiCrop(global_size=64, local_size=32, global_scale=(0.3, 1.0), local_scale=(0.05, 0.3))
    dataset = SyntheticTrain(crops, split="train", num_images=2048, image_size=image_size, seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0,
                        generator=torch.Generator().manual_seed(seed))
    backbone = build_backbone("vit_tiny", weights="random", drop_path_rate=0.1)
    student = nn.ModuleDict({"backbone": backbone, "head": PrototypeHead(backbone.embed_dim)})
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.04)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    center = torch.zeros(1, student["head"].prototypes.out_features)
    step, bar = 0, tqdm(total=steps, desc="pretrain vit_tiny", unit="step")
    start = time.perf_counter()
    while step < steps:
        for views, _ in loader:
            if step >= steps:
                break
            big = torch.cat(views[:2])
            small = torch.cat(views[2:])
            with torch.no_grad():
                teacher_logits = teacher["head"](teacher["backbone"](big))
            student_logits = torch.cat([student["head"](student["backbone"](x)) for x in (big, small)])
            loss = self_distillation_loss(student_logits, teacher_logits, center, num_global=2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            momentum = 0.99 + 0.01 * step / steps
            ema_update(teacher, student, momentum)
            center = 0.9 * center + 0.1 * teacher_logits.mean(dim=0, keepdim=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    print(f"pretrained {steps} steps in {time.perf_counter() - start:.0f} s")
    return teacher["backbone"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=asset_path("vit_tiny_synthetic.pt"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    backbone = pretrain(args.steps, args.batch_size, args.seed, args.image_size, args.lr)
    state = {k: v.detach().clone().contiguous() for k, v in backbone.state_dict().items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
