"""Data: the random-resized-crop rule (shared with the evaluations), multi-crop training transform with pairwise
boxes, synthetic scenes, on-disk training readers and evaluation datasets (images with masks mapped to train ids).

Names are imported on first use, so that ``python -m neco.data.check`` and ``prepare`` do not pay for
torchvision (needed by the multi-crop transform only).
"""

import importlib

_EXPORTS = {
    "crops": ("CROP_ATTEMPTS", "random_resized_crop_params"),
    "datasets": ("IMAGENET100_WNIDS", "BadImageCounter", "DatasetNotFound", "ImageFileDataset", "ImageFolderDataset",
                 "ImageReadError", "bad_image_count", "build_train_dataset", "coco_train", "find_voc",
                 "imagenet100_train", "imagenet_train", "load_rgb", "voc_trainaug"),
    "eval_datasets": ("EVAL_DATASETS", "MaskError", "SegmentationDataset", "build_eval_dataset", "scan_eval_split",
                      "select_images"),
    "multicrop": ("IMAGENET_MEAN", "IMAGENET_STD", "CropSamplingError", "MultiCrop", "pairwise_boxes",
                  "sample_crop_boxes"),
    "synthetic": ("SyntheticScenes", "SyntheticTrain"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    raise AttributeError(f"module 'neco.data' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
