"""Hummingbird dense nearest-neighbour retrieval (in-context segmentation), METHOD.md §6.3, as open-hummingbird-eval.

Memory: augmented training crops (``hummingbird.augment``), their L2-normalised patch features and per-patch label
counts, all patches or a rarity-sampled quota per image (``hummingbird.memory``). Queries: the validation patch
features. Each query takes its 30 nearest memory patches by inner product (``primitives.knn``), softmaxes their
similarities / 0.02 and averages their label histograms; the ``(S, S, C)`` scores are upsampled bilinearly to the
input size and the argmax is scored against the ground truth at that size, over the whole validation split,
after Hungarian matching (the reference's). Low-shot fractions rebuild the memory from fixed subsets, one per
seed (``lowshot``).

Queries are normalised per patch: the evaluator searches with the raw query (the ranking of one query does not
depend on its norm) and normalises query and retrieved keys per patch before the softmax, in every release.
With ``memory_norm=per_image_axis_v1`` (the releases up to 1.1.0, see ``hummingbird.memory``) the neighbours are
ranked by the inner product with the stored rows and weighted by the cosine with them, as those releases did.
The validation masks are resized to the input size with ``label_resize`` (the evaluator: torch's nearest on
the mask tensor).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from neco.choices import HbirdSearch, LabelResize, MemoryDtype, MemoryNorm
from neco.errors import ConfigError
from neco.eval.context import EvalContext, ProtocolResult, options_dict, typed_options
from neco.eval.hummingbird.lowshot import resolve_subset, select
from neco.eval.hummingbird.memory import PER_PATCH, MemoryPlan, build_memory
from neco.eval.primitives.features import HUMMINGBIRD_STD, IMAGENET_MEAN, IMAGENET_STD, resize_image
from neco.eval.primitives.knn import make_index, resolve_search, search_blocks
from neco.eval.primitives.metrics import confusion_matrix, hungarian_match, iou_from_confusion, remap_confusion

log = logging.getLogger(__name__)

PUBLISHED_SUBSET_SEEDS = [42, 400, 783, 1293, 4019]


@dataclass
class HummingbirdOptions:
    # Square input size; null = the evaluator's published setting: 504 for patch 14, 512 for patch 16, and for
    # other patch sizes the multiple of the patch size nearest to 512. S = image_size / patch.
    image_size: int | None = None
    # The evaluator's own default is 1; its README numbers (METHOD.md §9.6) use 2, so 2 is ours.
    augmentation_epochs: int = 2
    # Memory rows; null = every patch of every augmented image. 102400 / 1024000 / 10240000 are the standard
    # sizes; 10240000 gives the full-data numbers.
    memory_size: int | None = 10240000
    # A quota memory_size // (images x epochs) above S^2 patches per image is an error (the reference crashes);
    # true keeps every patch of such images instead.
    clamp_memory_quota: bool = False
    num_neighbours: int = 30
    temperature: float = 0.02
    search: HbirdSearch = HbirdSearch.auto  # auto | torch | faiss (auto: faiss where it runs on the device, else torch)
    # float16 | float32 storage of the memory features (torch and faiss-gpu)
    memory_dtype: MemoryDtype = MemoryDtype.float16
    train_split: str = "train"
    val_split: str = "val"
    # 1.0, or a low-shot fraction such as 0.125 (1/8), 0.015625 (1/64), 0.0078125 (1/128): one memory per seed.
    train_fraction: float = 1.0
    subset_seeds: list[int] = field(default_factory=lambda: list(PUBLISHED_SUBSET_SEEDS))
    subset_dir: str | None = None  # folder of subset lists (see neco/eval/hummingbird/lowshot.py); null = generate them
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 2.0])  # area scale (sic, see hummingbird.augment)
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    jitter: float = 0.1  # brightness, contrast, saturation and hue ranges
    jitter_p: float = 0.5  # probability of each of the four jitter ops
    batch_size: int | None = None  # memory-building batch; null = the context's
    query_block: int = 4096  # query patches per search call
    # Reference quirks (METHOD.md §10.19), the reference's behaviour by default:
    blue_std_typo: bool = True  # normalise with blue std 0.255 (train and val); false: 0.225
    ignore_to_background: bool = True  # label 255 -> class 0 in the memory; false: left out of the histograms
    hungarian: bool = True  # Hungarian matching of predictions to classes before the mIoU; false: identity
    # The reference allocates memory_size rows and fills images x epochs x quota of them; the rest stay zero
    # vectors with empty histograms, retrievable at similarity 0. false: only filled rows exist.
    pad_memory_rows: bool = True
    # Validation masks to the input size: legacy_nearest (torch's nearest on the mask tensor, the evaluator's)
    # | centre (PIL's nearest at cell centres). See neco/eval/primitives/labels.py.
    label_resize: LabelResize = LabelResize.legacy_nearest
    # Memory features: per_patch (each patch feature / its norm; the evaluator since November 2024) |
    # per_image_axis_v1 (each feature dimension / its norm over the image's patches: releases up to 1.1.0).
    # Which one the published tables used is not known (docs/REPRODUCE.md).
    memory_norm: MemoryNorm = MemoryNorm.per_patch


def default_input_size(patch_size: int) -> int:
    return {14: 504, 16: 512}.get(patch_size, max(1, round(512 / patch_size)) * patch_size)


def label_transfer(sims: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor, temperature: float,
                   pad_rows: int = 0, row_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Class scores ``(Q, C)``: softmax(sims / T)-weighted mean of the neighbours' label histograms.

    ``labels`` are per-row class counts; index ``-1`` is a zero row. ``pad_rows`` zero rows (similarity 0,
    empty histogram) compete with the retrieved neighbours for the ``k`` places, as in the reference's
    partly filled memory. ``row_norms``: norms of the memory rows when they are not unit vectors; the
    neighbours are then ranked by inner product but weighted by cosine (the evaluator re-normalises keys).
    """
    k = sims.shape[1]
    if pad_rows > 0:
        n = min(pad_rows, k)
        sims = torch.cat([sims, sims.new_zeros(sims.shape[0], n)], dim=1)
        idx = torch.cat([idx, idx.new_full((idx.shape[0], n), -1)], dim=1)
        sims, pos = sims.topk(k, dim=1)
        idx = idx.gather(1, pos)
    if row_norms is not None:
        norms = row_norms[idx.clamp_min(0)].float().clamp_min(1e-12)
        sims = torch.where(idx >= 0, sims.float() / norms, torch.zeros_like(norms))
    counts = labels[idx.clamp_min(0)].float() * (idx >= 0).unsqueeze(-1)
    hist = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1.0)
    weights = torch.softmax(sims.float() / temperature, dim=1)
    return torch.einsum("qk,qkc->qc", weights, hist)


def upsample_argmax(scores: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, S, S, C)`` scores -> ``(B, size, size)`` labels: bilinear upsampling, then argmax."""
    maps = F.interpolate(scores.permute(0, 3, 1, 2), size=(size, size), mode="bilinear", align_corners=False)
    return maps.argmax(dim=1)


def evaluate_memory(index, labels, val_feats, val_masks, *, num_classes, ignore_index, k, temperature,
                    pad_rows, device, query_block, keep_predictions=0, progress=False, row_norms=None):
    """Confusion matrix ``conf[gt, pred]`` over the whole validation split and the first predictions."""
    n, h, w, _ = val_feats.shape
    size = val_masks.shape[-1]
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    # Images per step: bounds the (images, C, size, size) upsampled score maps to ~2**27 floats.
    step = max(1, min(n, (1 << 27) // (num_classes * size * size)))
    preds = []
    for s in tqdm(range(0, n, step), desc="hummingbird retrieval", disable=not progress, leave=False):
        q = F.normalize(val_feats[s : s + step].to(device).float().reshape(-1, val_feats.shape[-1]), dim=-1)
        sims, idx = search_blocks(index, q, k, query_block)
        scores = label_transfer(sims, idx, labels, temperature, pad_rows, row_norms).view(-1, h, w, num_classes)
        pred = upsample_argmax(scores, size)
        conf += confusion_matrix(pred, val_masks[s : s + step].to(device), num_classes, num_classes, ignore_index)
        if s < keep_predictions:
            preds.append(pred[: keep_predictions - s].cpu())
    return conf.cpu(), (torch.cat(preds) if preds else None)


def score(conf: torch.Tensor, hungarian: bool) -> dict:
    """mIoU (percent) over all classes after the reference's Hungarian matching (or identity)."""
    mapping = hungarian_match(conf) if hungarian else torch.arange(conf.shape[1])
    per_class, miou, acc = iou_from_confusion(remap_confusion(conf, mapping, conf.shape[0]))
    return {"miou": 100 * miou, "pixel_acc": 100 * acc, "per_class_iou": [100 * v for v in per_class.tolist()],
            "mapping": mapping.tolist()}


def _check(opts: HummingbirdOptions) -> None:
    if opts.augmentation_epochs < 1:
        raise ConfigError("eval.hummingbird.augmentation_epochs must be >= 1")
    if not 0.0 < opts.train_fraction <= 1.0:
        raise ConfigError(f"eval.hummingbird.train_fraction={opts.train_fraction}: must lie in (0, 1]")
    if opts.train_fraction < 1.0 and not opts.subset_seeds:
        raise ConfigError("eval.hummingbird.subset_seeds is empty: a low-shot fraction needs at least one seed")
    if opts.num_neighbours < 1 or opts.temperature <= 0:
        raise ConfigError("eval.hummingbird.num_neighbours must be >= 1 and temperature > 0")
    if opts.memory_size is not None and opts.memory_size < 1:
        raise ConfigError("eval.hummingbird.memory_size must be a positive number of rows or null")


def run(ctx: EvalContext, cfg) -> ProtocolResult:
    opts = typed_options(HummingbirdOptions, cfg, ctx.dataset_name, "hummingbird")
    _check(opts)
    p = ctx.patch_size
    size = opts.image_size or default_input_size(p)
    if size % p:
        raise ConfigError(f"eval.hummingbird.image_size={size} is not a multiple of the patch size {p}")
    grid = size // p
    std = HUMMINGBIRD_STD if opts.blue_std_typo else IMAGENET_STD
    search = resolve_search(opts.search, ctx.device, "eval.hummingbird.search")
    train, val = ctx.dataset(opts.train_split), ctx.dataset(opts.val_split)
    num_classes, ignore = val.num_classes, val.ignore_index
    val_feats, val_masks = ctx.features(opts.val_split, size, None, mean=IMAGENET_MEAN, std=std,
                                        input_resize=opts.label_resize)
    if val_feats.shape[1:3] != (grid, grid):
        raise ValueError(f"features of {size}px images have grid {tuple(val_feats.shape[1:3])}, expected {grid}")
    dim = val_feats.shape[-1]
    n_fig = min(ctx.num_figures, len(val))

    if opts.train_fraction >= 1.0:
        runs = [(None, train, None)]
    else:
        runs = []
        for seed in opts.subset_seeds:
            sub = resolve_subset(train, ctx.dataset_name, opts.train_fraction, seed, opts.subset_dir, ctx.out_dir)
            runs.append((seed, select(train, sub["ids"]), sub))

    per_seed, first_preds = {}, None
    for seed, dataset, sub in runs:
        plan = MemoryPlan.make(opts.memory_size, len(dataset), opts.augmentation_epochs, grid,
                               opts.clamp_memory_quota)
        pad = plan.zero_rows(opts.memory_size, opts.pad_memory_rows)
        if plan.rows + pad < opts.num_neighbours:
            raise ConfigError(f"the memory has {plan.rows + pad} rows, fewer than "
                              f"eval.hummingbird.num_neighbours={opts.num_neighbours}")
        log.info("hummingbird: %d train images x %d epochs, %d of %d patches each -> %d memory rows (+%d zero), "
                 "%d px, %s search", len(dataset), plan.epochs, plan.per_image, grid * grid, plan.rows, pad, size,
                 search)
        index = make_index(search, plan.rows, dim, ctx.device, opts.memory_dtype)
        # Rows that are not unit vectors need their norms for the cosine weights of the vote.
        row_norms = torch.empty(plan.rows, device=ctx.device) if opts.memory_norm != PER_PATCH else None
        labels = build_memory(
            ctx.model, dataset, index, plan, image_size=size, patch_size=p, num_classes=num_classes,
            ignore_index=ignore, mean=IMAGENET_MEAN, std=std,
            seed=ctx.seed if seed is None else ctx.seed * 1_000_003 + seed,
            device=ctx.device, amp_dtype=ctx.amp_dtype, batch_size=opts.batch_size or ctx.batch_size,
            num_workers=ctx.num_workers, ignore_to_background=opts.ignore_to_background,
            crop_scale=opts.crop_scale, crop_ratio=opts.crop_ratio, jitter=opts.jitter, jitter_p=opts.jitter_p,
            progress=ctx.progress, memory_norm=opts.memory_norm, row_norms=row_norms,
        )
        conf, preds = evaluate_memory(
            index, labels, val_feats, val_masks, num_classes=num_classes, ignore_index=ignore,
            k=opts.num_neighbours, temperature=opts.temperature, pad_rows=pad, device=ctx.device,
            query_block=opts.query_block, keep_predictions=n_fig if first_preds is None else 0,
            progress=ctx.progress, row_norms=row_norms,
        )
        del index, labels, row_norms  # free the memory before the next seed builds its own
        res = score(conf, opts.hungarian)
        if first_preds is None and preds is not None:
            first_preds = torch.as_tensor(res["mapping"])[preds]
        res.update(num_train_images=len(dataset), memory_rows=plan.rows, zero_rows=pad,
                   patches_per_image=plan.per_image)
        if sub is not None:
            res.update(subset_source=sub["source"], subset_file=sub["saved"])
        per_seed["full" if seed is None else str(seed)] = res

    mious = np.array([r["miou"] for r in per_seed.values()])
    metrics = {"miou": float(mious.mean()), "pixel_acc": float(np.mean([r["pixel_acc"] for r in per_seed.values()]))}
    if len(mious) > 1:
        metrics["miou_std"] = float(mious.std())  # population std over the subset seeds
    per_class = np.mean([r["per_class_iou"] for r in per_seed.values()], axis=0).tolist()
    extra = {"image_size": size, "grid": grid, "search": search, "num_classes": num_classes,
             "num_val_images": len(val), "per_class_iou": per_class, "runs": per_seed}
    figures = _figures(ctx, val, first_preds, size, num_classes, ignore, opts.label_resize) if n_fig else []
    return ProtocolResult(metrics=metrics, options=options_dict(opts), figures=figures, extra=extra)


def _figures(ctx, val, preds, size, num_classes, ignore, label_resize) -> list[str]:
    from neco.eval.primitives.labels import resize_mask
    from neco.viz import save_segmentation_figure

    n = preds.shape[0]
    items = [val[i] for i in range(n)]
    images = [resize_image(img, size) for img, _ in items]
    masks = [torch.from_numpy(resize_mask(m, size, input_resize=label_resize).astype(np.int64)) for _, m in items]
    path = ctx.out_dir / "figures" / "hummingbird.png"
    save_segmentation_figure(images, masks, {"retrieval": preds}, path, num_classes, ignore)
    return [str(path)]
