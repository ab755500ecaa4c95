"""NeCo: Patch Neighbor Consistency post-training and dense evaluation for ViTs.

    import neco
    model = neco.load_backbone("dinov2_vits14", weights="default")
    features = neco.extract_features(model, images)   # (N, D, h, w) patch-feature maps

``load_backbone`` and ``extract_features`` live in ``neco.api``; they are imported on first use so that
``import neco`` (and every ``python -m neco.*`` entry point) does not pay for torch and timm up front.
"""

import logging

# faiss's loader logs at INFO each instruction set it tries ("Could not load library with AVX2 support" on a
# CPU build without it, then the generic build loads and works): with the entry points' INFO logging that is a
# scary line on every run. Its errors still show. Set here, before any neco module imports faiss.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

__version__ = "0.1.0"
__all__ = ["extract_features", "load_backbone"]

_API = ("extract_features", "load_backbone")


def __getattr__(name: str):
    if name in _API:
        from neco import api

        return getattr(api, name)
    raise AttributeError(f"module 'neco' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
