"""Training data: multi-crop transform with pairwise boxes, the embedded synthetic scenes, on-disk readers."""

from .datasets import (
    IMAGENET100_WNIDS,
    DatasetNotFound,
    ImageFileDataset,
    ImageFolderDataset,
    ImageReadError,
    build_train_dataset,
    coco_train,
    imagenet100_train,
    imagenet_train,
    load_rgb,
    voc_trainaug,
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
    "IMAGENET100_WNIDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CropSamplingError",
    "DatasetNotFound",
    "ImageFileDataset",
    "ImageFolderDataset",
    "ImageReadError",
    "MultiCrop",
    "SyntheticScenes",
    "SyntheticTrain",
    "build_train_dataset",
    "coco_train",
    "imagenet100_train",
    "imagenet_train",
    "load_rgb",
    "pairwise_boxes",
    "sample_crop_boxes",
    "voc_trainaug",
]
