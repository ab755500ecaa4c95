"""NeCo: Patch Neighbor Consistency post-training and dense evaluation for ViTs."""

__version__ = "0.1.0"
