"""Data: multi-crop training transform with pairwise boxes, synthetic scenes, on-disk training readers and
evaluation datasets (images with masks mapped to train ids)."""

from .datasets import (
    IMAGENET100_WNIDS,
    BadImageCounter,
    DatasetNotFound,
    ImageFileDataset,
    ImageFolderDataset,
    ImageReadError,
    bad_image_count,
    build_train_dataset,
    coco_train,
    find_voc,
    imagenet100_train,
    imagenet_train,
    load_rgb,
    voc_trainaug,
)
from .eval_datasets import (
    EVAL_DATASETS,
    MaskError,
    SegmentationDataset,
    build_eval_dataset,
    scan_eval_split,
    select_images,
)
from .multicrop import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropSamplingError,
    MultiCrop,
    pairwise_boxes,
    sample_crop_boxes,
)
from .synthetic import SyntheticScenes, SyntheticTrain

__all__ = [
    "EVAL_DATASETS",
    "IMAGENET100_WNIDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BadImageCounter",
    "CropSamplingError",
    "DatasetNotFound",
    "ImageFileDataset",
    "ImageFolderDataset",
    "ImageReadError",
    "MaskError",
    "MultiCrop",
    "SegmentationDataset",
    "SyntheticScenes",
    "SyntheticTrain",
    "bad_image_count",
    "build_eval_dataset",
    "build_train_dataset",
    "coco_train",
    "find_voc",
    "imagenet100_train",
    "imagenet_train",
    "load_rgb",
    "pairwise_boxes",
    "sample_crop_boxes",
    "scan_eval_split",
    "select_images",
    "voc_trainaug",
]
