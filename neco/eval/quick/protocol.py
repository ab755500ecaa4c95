"""`eval=quick` in `python -m neco.eval`: the quickstart's reduced check (neco.eval.quick.evaluate) as a protocol.

Not a published protocol: dense NN retrieval without augmentation or memory sampling, and k-means with one
restart, on small images. It measures the same thing as training's before/after evaluation, so a quickstart
checkpoint can be re-checked with exactly the numbers the quickstart printed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from neco.eval.context import EvalContext, ProtocolResult, options_dict, typed_options
from neco.eval.quick.evaluate import quick_evaluate


@dataclass
class QuickOptions:
    image_size: int = 96
    train_images: int = 256  # first images of the train split used as the retrieval memory
    val_images: int = 128
    num_neighbours: int = 30
    temperature: float = 0.02
    kmeans_seeds: list[int] = field(default_factory=lambda: [0])


def run(ctx: EvalContext, cfg) -> ProtocolResult:
    opts = typed_options(QuickOptions, cfg, ctx.dataset_name, "quick")
    from torch.utils.data import Subset

    train, val = ctx.dataset("train"), ctx.dataset("val")
    train = Subset(train, range(min(opts.train_images, len(train))))
    val_sub = Subset(val, range(min(opts.val_images, len(val))))
    for sub, full in ((train, ctx.dataset("train")), (val_sub, val)):
        sub.num_classes, sub.ignore_index = full.num_classes, full.ignore_index
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    figure = ctx.out_dir / "segmentation.png"
    metrics = quick_evaluate(
        ctx.model, train, val_sub, opts.image_size, ctx.device, batch_size=ctx.batch_size, amp_dtype=ctx.amp_dtype,
        nn_k=opts.num_neighbours, temperature=opts.temperature, kmeans_seeds=opts.kmeans_seeds,
        figure_path=str(figure), figure_images=ctx.num_figures, per_class=True, progress=ctx.progress,
    )
    scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}  # in % already
    extra = {k: v for k, v in metrics.items() if not isinstance(v, float)}
    return ProtocolResult(metrics=scalars, options=options_dict(opts), figures=[str(figure)], extra=extra)
