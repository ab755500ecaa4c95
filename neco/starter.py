"""`python -m neco.starter`: make the quickstart's starting checkpoint (a small pretrained model to post-train).

NeCo post-trains a model that already has good image-level features (DINO, DINOv2). For the embedded CPU demo
we make such a model ourselves: `vit_tiny` trained on the synthetic scenes with *image-level* labels only (which
object classes appear in a random crop: multi-label classification of mean-pooled patch tokens). It never sees a
mask pixel by pixel, so its patch features are shaped by a global objective, like those of the foundation models
NeCo starts from; what NeCo adds is consistency of patch neighbourhoods. The run is deterministic for a seed and
writes a timm-format state dict of the backbone (`neco/assets/vit_tiny_synthetic.pt` by default).

    python -m neco.starter                      # a few minutes on two CPU cores
    python -m neco.starter --steps 50 --out /tmp/starter.pt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from tqdm.auto import tqdm

from neco.config import asset_path
from neco.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from neco.data.synthetic import SyntheticScenes
from neco.models.backbone import build_backbone

MIN_AREA = 0.02  # a class counts as present in a crop when it covers at least 2 % of it


class PresenceCrops(Dataset):
    """Random crops of the synthetic scenes with the set of object classes they contain (background excluded)."""

    def __init__(self, scenes: SyntheticScenes, size: int):
        self.scenes = scenes
        self.joint = T.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True)
        self.photometric = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                                      T.RandomGrayscale(0.2)])
        self.normalize = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True),
                                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int):
        image, mask = self.scenes[index]
        image, mask = self.joint(tv_tensors.Image(T.functional.pil_to_tensor(image)), tv_tensors.Mask(mask))
        image = self.normalize(self.photometric(image))
        counts = torch.bincount(mask.flatten(), minlength=self.scenes.num_classes).float()
        present = (counts / mask.numel() >= MIN_AREA)[1:].float()
        return image, present


def pretrain(steps: int, batch_size: int, seed: int, image_size: int, crop_size: int, lr: float) -> nn.Module:
    torch.manual_seed(seed)
    scenes = SyntheticScenes("train", num_images=4096, image_size=image_size, seed=seed)
    loader = DataLoader(PresenceCrops(scenes, crop_size), batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=0, generator=torch.Generator().manual_seed(seed))
    # timm's per-sample stochastic depth, with which the shipped starter was made.
    backbone = build_backbone("vit_tiny", weights="random", drop_path_rate=0.1, drop_path_mode="per_sample")
    classifier = nn.Linear(backbone.embed_dim, scenes.num_classes - 1)
    params = list(backbone.parameters()) + list(classifier.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    step, start = 0, time.perf_counter()
    bar = tqdm(total=steps, desc="pretrain vit_tiny (image-level labels)", unit="step")
    while step < steps:
        for images, present in loader:
            if step >= steps:
                break
            logits = classifier(backbone(images).mean(dim=(1, 2)))
            loss = F.binary_cross_entropy_with_logits(logits, present)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            bar.update(1)
            if step % 10 == 0:
                accuracy = ((logits > 0).float() == present).float().mean()
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy.item():.3f}")
    bar.close()
    print(f"pretrained {steps} steps in {time.perf_counter() - start:.0f} s")
    return backbone


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=asset_path("vit_tiny_synthetic.pt"))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--image-size", type=int, default=96, help="size of the synthetic scenes")
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    backbone = pretrain(args.steps, args.batch_size, args.seed, args.image_size, args.crop_size, args.lr)
    state = {k: v.detach().clone().contiguous() for k, v in backbone.state_dict().items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
