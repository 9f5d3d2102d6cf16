"""Image handling shared by every feature source and AnyUp: ImageNet statistics, RGB -> tensor,
the model input size and the resize + normalisation (a leaf: imports torch and numpy only).

* :func:`as_image_tensor`: ``[H, W, 3]`` uint8 / float in [0, 1] (numpy or torch) -> ``[1, 3, H, W]``.
* :func:`model_input_size`: each side a multiple of the model stride.
* :func:`preprocess`: resize (bicubic, antialiased) and :func:`normalize_image`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "as_image_tensor",
    "model_input_size",
    "normalize_image",
    "preprocess",
]

#: ImageNet RGB statistics (DINOv2, AnyUp and most timm models normalise with them).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def as_image_tensor(image: object, device: str | torch.device = "cpu") -> torch.Tensor:
    """RGB image ``[H, W, 3]`` (numpy or torch; uint8, or float in [0, 1]) -> float32 ``[1, 3, H, W]``."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a numpy array or tensor [H, W, 3], got {type(image).__name__}")
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image must be [H, W, 3] (RGB), got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        x = image.to(device=device, dtype=torch.float32) / 255.0
    elif image.is_floating_point():
        x = image.to(device=device, dtype=torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"image contains NaN/Inf values (shape {tuple(image.shape)})")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"a float image must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    else:
        raise ValueError(f"image dtype must be uint8 or floating point, got {image.dtype}")
    return x.permute(2, 0, 1)[None].contiguous()


def model_input_size(
    size: tuple[int, int], stride: int, image_size: int | tuple[int, int] | None = None
) -> tuple[int, int]:
    """Size ``(H', W')`` the model sees: each side a multiple of ``stride``.

    Parameters
    ----------
    size : ``(H, W)`` of the original image.
    stride : the model's patch size / output stride ``p``.
    image_size : None: keep the resolution, each side rounded to the nearest multiple of ``p``.
        int: scale so the longer side is ``image_size`` (aspect kept), then round each side.
        ``(h, w)``: that size, each side rounded to the nearest multiple of ``p``.
        Every side is at least ``p``.

    >>> model_input_size((100, 150), 14), model_input_size((100, 150), 14, 224)
    ((98, 154), (154, 224))
    """
    H, W = size
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if image_size is None:
        target = (float(H), float(W))
    elif isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        s = image_size / max(H, W)
        target = (H * s, W * s)
    else:
        try:
            th, tw = image_size  # type: ignore[misc]
        except (TypeError, ValueError):
            raise ValueError(
                f"image_size must be None, an int or an (h, w) pair, got {image_size!r}"
            ) from None
        if th <= 0 or tw <= 0:
            raise ValueError(f"image_size must be positive, got {image_size!r}")
        target = (float(th), float(tw))
    return tuple(max(1, round(t / stride)) * stride for t in target)  # type: ignore[return-value]


def preprocess(
    image: torch.Tensor, input_size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Resize ``[1, 3, H, W]`` in [0, 1] to ``input_size`` (bicubic, antialiased) and normalise."""
    x = image
    if tuple(x.shape[-2:]) != tuple(input_size):
        x = F.interpolate(x, size=input_size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return normalize_image(x, mean, std)


def normalize_image(
    image: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """``(image - mean) / std`` per channel of ``[B, C, H, W]``, in the image's dtype and device.

    >>> x = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    >>> normalize_image(x).abs().max().item()
    0.0
    """
    m = torch.tensor(mean, dtype=image.dtype, device=image.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=image.dtype, device=image.device).view(1, -1, 1, 1)
    return (image - m) / s
