"""The quickstart's evaluation before and after post-training (``monitor=quick``).

Each call measures one state of the networks: dense NN retrieval and k-means mIoU (in %) on the synthetic
validation split (with a segmentation figure), the NeCo loss on held-out crops, and the query-patch similarity
ranking (neco.viz_neighbours). The "before" similarity maps are kept (also on disk, for a resumed run), and every later
call draws them beside its own in ``figures/similarity.png``: the change a few hundred steps make, visible even
where mIoU barely moves.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("neco")

HELDOUT_BATCHES = 4  # of data.batch_size images: 64 held-out images in the quickstart
SIMILARITY_FIGURE_QUERIES = 4


class BeforeAfterEvaluator:
    def __init__(self, cfg, run_dir: Path, device, amp_dtype, student, teacher, objective):
        from neco.data.synthetic import SyntheticScenes, SyntheticTrain
        from neco.engine.setup import build_multicrop
        from neco.heldout import HeldOutLoss

        self.cfg, self.run_dir, self.device, self.amp_dtype = cfg, Path(run_dir), device, amp_dtype
        self.student, self.teacher, self.objective = student, teacher, objective
        size, seed = cfg.data.synthetic_size, cfg.data.synthetic_seed
        self.memory = SyntheticScenes("train", num_images=cfg.monitor.train_images, image_size=size, seed=seed)
        self.val = SyntheticScenes("val", num_images=cfg.monitor.val_images, image_size=size, seed=seed)
        # Held-out crops: the validation scenes through the training transform, never seen in training.
        held_out = SyntheticTrain(build_multicrop(cfg.data), split="val",
                                  num_images=HELDOUT_BATCHES * cfg.data.batch_size, image_size=size, seed=seed)
        self.heldout = HeldOutLoss(held_out, cfg.data.batch_size, cfg.data.num_global,
                                   use_teacher=cfg.loss.use_teacher, seed=cfg.seed, masked=cfg.loss.mask != "all",
                                   blur_padding=cfg.loss.mask_blur_padding)
        self.before_path = self.run_dir / "figures" / "similarity_before.pt"

    def __call__(self, backbone, tag: str) -> dict:
        from neco.eval.quick.evaluate import quick_evaluate

        figures = self.run_dir / "figures"
        figures.mkdir(parents=True, exist_ok=True)
        metrics = quick_evaluate(backbone, self.memory, self.val, self.cfg.monitor.image_size, self.device,
                                 amp_dtype=self.amp_dtype, figure_path=str(figures / f"segmentation_{tag}.png"),
                                 figure_images=self.cfg.monitor.num_figures, progress=self.cfg.logger.progress,
                                 figure_title=f"{self._state(tag)}: synthetic validation images, truth and "
                                              f"predictions (mIoU over all {len(self.val)} images)")
        metrics = {k: v for k, v in metrics.items() if isinstance(v, float)}
        metrics["heldout/neco_loss"] = self.heldout(self.student, self.teacher, self.objective, self.device,
                                                    self.amp_dtype)
        metrics["similarity/ranking_auc"] = self._similarity(backbone, tag)
        return metrics

    @staticmethod
    def _state(tag: str) -> str:
        return {"before": "before post-training", "after": "after post-training"}.get(tag, tag)

    def _similarity(self, backbone, tag: str) -> float:
        """Mean ranking AUC over the validation images' queries; draws the before/now figure after "before"."""
        from neco.eval.quick.evaluate import quick_features
        from neco.viz_neighbours import class_ranking_auc, patch_labels, pick_queries, similarity_maps

        size = self.cfg.monitor.image_size
        feats, masks = quick_features(backbone, self.val, size, device=self.device, amp_dtype=self.amp_dtype,
                                      progress=False)
        labels = patch_labels(masks, feats.shape[1:3])
        queries = pick_queries(labels, ignore_index=self.val.ignore_index)
        maps = similarity_maps(feats, queries)
        auc = torch.tensor([class_ranking_auc(m, labels[q.image], q) for m, q in zip(maps, queries)])
        shown = queries[:SIMILARITY_FIGURE_QUERIES]
        if tag == "before":
            torch.save({"queries": [vars(q) for q in shown], "maps": maps[: len(shown)]}, self.before_path)
        elif self.before_path.is_file():
            self._figure(backbone, torch.load(self.before_path), labels, maps, queries, tag)
        return float(auc.nanmean())

    def _figure(self, backbone, before: dict, labels, maps, queries, tag: str) -> None:
        from neco.eval.primitives.features import resize_image
        from neco.viz_neighbours import Query, save_similarity_figure

        shown = [Query(**q) for q in before["queries"]]
        index = {(q.image, q.row, q.col): i for i, q in enumerate(queries)}
        if any((q.image, q.row, q.col) not in index for q in shown):
            log.warning("similarity figure skipped: the validation split changed since the 'before' evaluation")
            return
        now = torch.stack([maps[index[(q.image, q.row, q.col)]] for q in shown])
        size = self.cfg.monitor.image_size
        images = [resize_image(self.val[i][0], size) for i in range(max(q.image for q in shown) + 1)]
        name = "after NeCo" if tag == "after" else tag
        save_similarity_figure(images, labels, shown, before["maps"], now, self.run_dir / "figures" /
                               "similarity.png", backbone.patch_size, self.val.class_names,
                               self.val.ignore_index, after_name=name)
