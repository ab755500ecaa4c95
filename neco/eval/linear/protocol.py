"""Linear segmentation (METHOD.md §6.4; the reference's ``linear_finetune.py`` and ``eval_linear.py``).

A 1x1 convolution ``D -> C`` is trained on the frozen backbone's patch tokens, its logits bilinearly
upsampled to 100x100 masks, with SGD for 25 epochs; the val mIoU (identity matching, all classes) is taken
every epoch and the best three heads are kept. The published number is the best val mIoU at 100x100: lower
than DINOv2-paper linear numbers, which score at full resolution (``mask_size: null`` here).

Each epoch sees freshly augmented train images, so their features are recomputed every epoch (that is the
protocol). ``augment: false`` trains on the cached features of the plain resized train images instead: much
faster, not the published protocol, and recorded in the result's options.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from tqdm.auto import tqdm

from neco.choices import LabelResize, MiouClasses
from neco.errors import ConfigError
from neco.eval.context import EvalContext, ProtocolResult, options_dict, typed_options
from neco.eval.linear.data import train_subset, training_pairs
from neco.eval.linear.head import (
    TopK,
    confusion_on_features,
    eval_mode,
    head_logits,
    linear_miou,
    load_head,
    make_head,
    masked_cross_entropy,
)
from neco.eval.primitives.batches import evaluated_count
from neco.eval.primitives.features import IMAGENET_MEAN, IMAGENET_STD, normalize, resize_image
from neco.eval.primitives.labels import LEGACY_NEAREST

log = logging.getLogger(__name__)

__all__ = ["LinearOptions", "run", "evaluate_head"]


@dataclass
class LinearOptions:
    train_split: str = "train"  # VOC: "train" is trainaug (10,582 images)
    val_split: str = "val"
    image_size: int = 448
    mask_size: Optional[int] = 100  # masks and logits scored at 100x100 (published); null: full input size
    epochs: int = 25
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_step: int = 20  # StepLR: lr x lr_gamma every lr_step epochs (one drop, at epoch 20 of 25)
    lr_gamma: float = 0.1
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    augment: bool = True  # false: train on cached unaugmented features (fast; not the published protocol)
    train_fraction: float = 1.0  # COCO-Stuff/Things: 0.1 of train2017 (per_dataset in conf/eval/linear.yaml)
    # Reference quirk (METHOD.md §10.14): the ADE20K training loader is not shuffled. null: as the reference's loader
    # for the dataset (ADE20K false, every other true).
    shuffle: Optional[bool] = None
    drop_last: bool = True  # the training loader drops its last partial batch, as the reference
    # Reference quirk (METHOD.md §10.13): VOC's val loader drops its last partial batch, so in-training validation
    # scores 1,408 of 1,449 images at batch 128. null: as the reference's loader for the dataset (VOC true; the
    # COCO loaders keep every image, and so do the others here). Head-only evaluation (``head``) always scores
    # the whole split, as eval_linear.py does.
    drop_last_val: Optional[bool] = None
    val_batch_size: int = 128  # the reference's val batch (= train batch); only decides what drop_last_val drops
    val_every: int = 1  # epochs between validations (the last epoch is always validated)
    keep_top: int = 3  # best heads kept in <out_dir>/heads
    # Reference quirk (METHOD.md §10.14), as eval.overcluster.miou_classes: "all" averages every class id, so with
    # ADE20K (151 ids, 0 ignored) the ignore id's IoU, always 0, is averaged in; "exclude_ignore" leaves that
    # id out (150 classes, x151/150).
    miou_classes: MiouClasses = MiouClasses.all
    # A saved head (<out_dir>/heads/*.pt): skip training, only score it at eval_mask_size, on features at the
    # input size it was trained with (stored in the file; image_size is then not used).
    head: Optional[str] = None
    eval_mask_size: Optional[int] = 448  # eval_linear.py's mask_eval_size; null: full input size
    # How the 448 px ground truth (train and val) is shrunk to mask_size / eval_mask_size: legacy_nearest
    # (torch's nearest, top-left source pixel of each cell: the reference) | centre (PIL's nearest at cell
    # centres). See neco/eval/primitives/labels.py.
    label_resize: LabelResize = LabelResize.legacy_nearest


# The reference's loaders by dataset (METHOD.md §10.13, §10.14).
_VAL_DROPS_LAST_BATCH = {"voc"}
_TRAIN_NOT_SHUFFLED = {"ade20k"}


def reference_loader_settings(opts: LinearOptions, dataset_name: str) -> tuple[bool, bool]:
    """``(shuffle, drop_last_val)``, the reference's per-dataset behaviour where the option is null."""
    shuffle = opts.shuffle if opts.shuffle is not None else dataset_name not in _TRAIN_NOT_SHUFFLED
    drop = opts.drop_last_val if opts.drop_last_val is not None else dataset_name in _VAL_DROPS_LAST_BATCH
    return shuffle, drop


def _check(opts: LinearOptions) -> None:
    def bad(key, why):
        raise ConfigError(f"eval.linear.{key}: {why}")

    for key in ("image_size", "epochs", "batch_size", "lr_step", "val_batch_size", "val_every", "keep_top"):
        if getattr(opts, key) < 1:
            bad(key, f"must be >= 1, got {getattr(opts, key)}")
    for key in ("mask_size", "eval_mask_size"):
        if getattr(opts, key) is not None and getattr(opts, key) < 1:
            bad(key, f"must be >= 1 or null (full input size), got {getattr(opts, key)}")
    if not 0.0 < opts.train_fraction <= 1.0:
        bad("train_fraction", f"must be in (0, 1], got {opts.train_fraction}")
    for key in ("crop_scale", "crop_ratio"):
        lo_hi = getattr(opts, key)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
            bad(key, f"must be [low, high] with 0 < low <= high, got {list(lo_hi)}")


def _autocast(ctx: EvalContext):
    if ctx.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(ctx.device.type, dtype=ctx.amp_dtype)


def _augmented_batches(ctx, opts, train_set, indices, epoch: int, shuffle: bool, generator: torch.Generator):
    """Freshly augmented images through the frozen backbone: ``(tokens (B, h, w, D) float32, masks)``."""
    pairs = training_pairs(train_set, indices, opts.image_size, opts.mask_size, opts.crop_scale, opts.crop_ratio,
                          opts.hflip, seed=ctx.seed, label_resize=opts.label_resize)
    pairs.set_epoch(epoch)
    sampler = RandomSampler(pairs, generator=generator) if shuffle else SequentialSampler(pairs)
    loader = DataLoader(pairs, batch_size=opts.batch_size, sampler=sampler, drop_last=opts.drop_last,
                        num_workers=ctx.num_workers, pin_memory=ctx.device.type == "cuda")
    # Normalised on the device (uint8 travels); the statistics are made there too, since a (1, 3, 1, 1) CPU
    # tensor does not broadcast against a CUDA batch.
    mean = torch.tensor(IMAGENET_MEAN, device=ctx.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=ctx.device).view(1, 3, 1, 1) * 255.0
    for x, m in loader:
        x = (x.to(ctx.device, non_blocking=True).float() - mean) / std
        with torch.inference_mode(), _autocast(ctx):
            tokens = ctx.model(x)
        # A copy made outside inference mode: the head's backward has to save its input.
        yield tokens.to(torch.float32, copy=True), m.to(ctx.device, non_blocking=True).long()


def _cached_batches(ctx, opts, feats, masks, shuffle: bool, generator: torch.Generator):
    """Batches of precomputed features (``augment: false``), shuffled and cut like the image loader."""
    n = len(feats)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = evaluated_count(n, opts.batch_size, opts.drop_last)
    for start in range(0, stop, opts.batch_size):
        idx = order[start : start + opts.batch_size]
        yield feats[idx].to(ctx.device).float(), masks[idx].to(ctx.device).long()


def _figure(ctx, val_set, image_size, masks, preds, num_classes, ignore_index, name: str) -> list[str]:
    n = 0 if preds is None else min(ctx.num_figures, len(preds))
    if n == 0:
        return []
    from neco.viz import save_segmentation_figure  # matplotlib only when a figure is drawn

    images = torch.stack([
        normalize(torch.from_numpy(resize_image(val_set[i][0], image_size).copy()).permute(2, 0, 1),
                  IMAGENET_MEAN, IMAGENET_STD)
        for i in range(n)
    ])
    path = save_segmentation_figure(images, masks[:n].long(), {"linear head": preds[:n]}, ctx.out_dir / name,
                                    num_classes=num_classes, ignore_index=ignore_index)
    return [str(path)]


def evaluate_head(
    ctx: EvalContext,
    head_path,
    mask_size: Optional[int] = 448,
    *,
    split: str = "val",
    drop_last_val: bool = False,
    val_batch_size: int = 128,
    miou_classes: Optional[str] = None,
    keep_predictions: int = 0,
    label_resize: str = LEGACY_NEAREST,
) -> dict:
    """Score a saved head on ``split`` at ``mask_size`` (``None``: the input size), as ``eval_linear.py``.

    The features come at the head's own input size (stored with it); logits are upsampled to ``mask_size``
    and the masks nearest-resized to it (``label_resize``). ``miou_classes`` (``all`` | ``exclude_ignore``)
    defaults to the setting the head was trained with. Returns ``miou`` and ``pixel_acc`` (percent),
    ``per_class_iou``, ``num_images``.
    """
    head, meta = load_head(head_path)
    head = head.to(ctx.device)
    image_size = int(meta["image_size"])
    if miou_classes is None:
        miou_classes = meta.get("options", {}).get("miou_classes", "all")
    dataset = ctx.dataset(split)
    if dataset.num_classes != head.out_channels:
        raise ConfigError(f"eval.linear.head: the head predicts {head.out_channels} classes, "
                          f"{ctx.dataset_name} has {dataset.num_classes}")
    feats, masks = ctx.features(split, image_size, mask_size, label_resize=label_resize)
    n = evaluated_count(len(feats), val_batch_size, drop_last_val)
    conf, preds = confusion_on_features(head, feats[:n], masks[:n], dataset.num_classes, dataset.ignore_index,
                                        ctx.device, keep_predictions=keep_predictions)
    iou, miou, acc = linear_miou(conf, dataset.ignore_index, miou_classes == "all")
    return {"miou": miou, "pixel_acc": acc, "per_class_iou": (100 * iou).tolist(), "num_images": n,
            "image_size": image_size, "mask_size": masks.shape[-1], "epoch": meta.get("epoch"),
            "stored_miou": meta.get("miou"), "predictions": preds, "masks": masks[:keep_predictions]}


def _run_head_only(ctx: EvalContext, opts: LinearOptions) -> ProtocolResult:
    val_set = ctx.dataset(opts.val_split)
    res = evaluate_head(ctx, opts.head, opts.eval_mask_size, split=opts.val_split,
                        miou_classes=opts.miou_classes, keep_predictions=ctx.num_figures,
                        label_resize=opts.label_resize)
    figures = _figure(ctx, val_set, res["image_size"], res["masks"], res["predictions"], val_set.num_classes,
                      val_set.ignore_index, "linear_head_eval.png")
    extra = {k: res[k] for k in ("per_class_iou", "num_images", "image_size", "mask_size", "epoch", "stored_miou")}
    return ProtocolResult(metrics={"miou": res["miou"], "pixel_acc": res["pixel_acc"]},
                          options=options_dict(opts), figures=figures, extra=extra)


def run(ctx: EvalContext, cfg) -> ProtocolResult:
    opts = typed_options(LinearOptions, cfg, ctx.dataset_name, "linear")
    _check(opts)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    if opts.head:
        return _run_head_only(ctx, opts)

    train_set, val_set = ctx.dataset(opts.train_split), ctx.dataset(opts.val_split)
    num_classes, ignore_index = val_set.num_classes, val_set.ignore_index
    if train_set.num_classes != num_classes:
        raise ConfigError(f"eval.linear: train split has {train_set.num_classes} classes, val {num_classes}")
    val_feats, val_masks = ctx.features(opts.val_split, opts.image_size, opts.mask_size,
                                        label_resize=opts.label_resize)
    shuffle, drop_last_val = reference_loader_settings(opts, ctx.dataset_name)
    n_val = evaluated_count(len(val_feats), opts.val_batch_size, drop_last_val)
    if n_val == 0:
        raise ConfigError(f"eval.linear.drop_last_val: {len(val_feats)} val images fill no batch of "
                          f"val_batch_size={opts.val_batch_size}")
    val_feats, val_masks = val_feats[:n_val], val_masks[:n_val]
    target_size = val_masks.shape[-1]

    ids_file = ctx.out_dir / "train_ids.txt" if opts.train_fraction < 1.0 else None
    indices = train_subset(train_set, opts.train_fraction, ctx.seed, ids_file)
    if evaluated_count(len(indices), opts.batch_size, opts.drop_last) == 0:
        raise ConfigError(f"eval.linear.batch_size: {len(indices)} train images fill no batch of "
                          f"{opts.batch_size} with drop_last")
    if not opts.augment:
        train_feats, train_masks = ctx.extractor.extract(train_set, opts.image_size, opts.mask_size,
                                                         indices=indices, desc="features train (linear)",
                                                         label_resize=opts.label_resize)

    head = make_head(val_feats.shape[-1], num_classes, ctx.seed).to(ctx.device)
    optim = torch.optim.SGD(head.parameters(), lr=opts.lr, momentum=opts.momentum,
                            weight_decay=opts.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=opts.lr_step, gamma=opts.lr_gamma)
    topk = TopK(opts.keep_top, ctx.out_dir / "heads")
    generator = torch.Generator().manual_seed(ctx.seed)  # the shuffling order of every epoch
    history, best_state, best = [], None, None

    epochs = tqdm(range(opts.epochs), desc="linear", unit="epoch", disable=not ctx.progress)
    with eval_mode(ctx.model):
        for epoch in epochs:
            head.train()
            lr = optim.param_groups[0]["lr"]
            if opts.augment:
                batches = _augmented_batches(ctx, opts, train_set, indices, epoch, shuffle, generator)
            else:
                batches = _cached_batches(ctx, opts, train_feats, train_masks, shuffle, generator)
            loss_sum, steps = torch.zeros((), device=ctx.device), 0
            for tokens, target in batches:
                loss = masked_cross_entropy(head_logits(head, tokens, target_size), target, ignore_index)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                loss_sum += loss.detach()
                steps += 1
            sched.step()
            entry = {"epoch": epoch, "lr": lr, "steps": steps, "train_loss": float(loss_sum) / max(steps, 1)}
            if (epoch + 1) % opts.val_every == 0 or epoch == opts.epochs - 1:
                head.eval()
                conf, _ = confusion_on_features(head, val_feats, val_masks, num_classes, ignore_index, ctx.device)
                iou, miou, acc = linear_miou(conf, ignore_index, opts.miou_classes == "all")
                state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
                payload = {"state_dict": state, "epoch": epoch, "miou": miou, "pixel_acc": acc,
                           "image_size": opts.image_size, "mask_size": opts.mask_size, "num_classes": num_classes,
                           "ignore_index": ignore_index, "dataset": ctx.dataset_name, "options": options_dict(opts)}
                if topk.offer(epoch, miou, payload) and topk.best["epoch"] == epoch:
                    best_state, best = state, {"epoch": epoch, "miou": miou, "pixel_acc": acc,
                                               "per_class_iou": (100 * iou).tolist()}
                entry.update(miou=miou, pixel_acc=acc)
                epochs.set_postfix(miou=f"{miou:.2f}")
                log.info("linear: epoch %d, loss %.4f, val mIoU %.2f", epoch, entry["train_loss"], miou)
            history.append(entry)

    head.load_state_dict(best_state)
    head.eval()
    _, preds = confusion_on_features(head, val_feats[: ctx.num_figures], val_masks[: ctx.num_figures],
                                     num_classes, ignore_index, ctx.device, keep_predictions=ctx.num_figures)
    figures = _figure(ctx, val_set, opts.image_size, val_masks, preds, num_classes, ignore_index, "linear.png")
    return ProtocolResult(
        metrics={"miou": best["miou"], "miou_last": history[-1]["miou"], "pixel_acc": best["pixel_acc"]},
        options=options_dict(opts) | {"shuffle_resolved": shuffle, "drop_last_val_resolved": drop_last_val},
        figures=figures,
        extra={
            "best_epoch": best["epoch"],
            "per_class_iou": best["per_class_iou"],
            "kept_heads": topk.kept,
            "history": history,
            "num_train_images": len(indices),
            "num_val_images": n_val,
            "train_ids": str(ids_file) if ids_file else None,
        },
    )
