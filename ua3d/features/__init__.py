"""Feature sources for ua3d: files, DINOv2 / timm models from local weights, a random stand-in.

* :func:`load_features` / :func:`save_features`: ``.npy``, ``.npz``, ``.pt`` feature files.
* :func:`extract_features`: features of an RGB image from ``dinov2_vits14``, ``dinov2_vitb14``
  (ua3d's own ViT, :class:`VisionTransformer`), ``timm:<name>`` (when timm imports) or
  ``random``; weights come from local files or caches only, never the network.
* :func:`random_features`: a fixed-seed random conv net, for demos without weights.
"""

from .backbones import (
    DINOV2_MODELS,
    MODEL_NAMES,
    CheckpointNotFoundError,
    extract_features,
    load_dinov2,
    model_input_size,
)
from .files import load_features, save_features
from .image import IMAGENET_MEAN, IMAGENET_STD, as_image_tensor
from .random_net import random_features
from .vit import CONFIGS, VisionTransformer, ViTConfig, dinov2_to_timm, timm_to_dinov2

__all__ = [
    "CONFIGS",
    "DINOV2_MODELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_NAMES",
    "CheckpointNotFoundError",
    "ViTConfig",
    "VisionTransformer",
    "as_image_tensor",
    "dinov2_to_timm",
    "extract_features",
    "load_dinov2",
    "load_features",
    "model_input_size",
    "random_features",
    "save_features",
    "timm_to_dinov2",
]
