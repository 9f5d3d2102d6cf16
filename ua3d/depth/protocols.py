"""Low-resolution depth generation: the two protocols behind published guided-depth-SR tables.

* **A, interval sampling** (DJF; the baseline rows of DKN): ``lr = hr[s-1::s, s-1::s]``.
* **A-start**: interval sampling of the first pixel of each block, ``lr = hr[::s, ::s]`` (what a plain
  ``depth[::s, ::s]`` slice gives).
* **B, bicubic** (DKN code, FDSR, DCTNet, JIIF, SUFT, SGNet): ``lr = PIL Image.resize((w//s, h//s), BICUBIC)``
  of the float (mode ``'F'``) HR depth, after cropping the HR depth to a multiple of ``s``.
* **area**, a sensor-like model for real frames with holes: each LR cell is the mean of the *valid* HR
  pixels of its ``s x s`` block, and a hole (NaN) when less than ``min_coverage`` of the block is valid.

Both protocols crop the HR depth to ``(H - H % s, W - W % s)`` (top-left kept), so that ``lr`` is exactly
``s`` times smaller; for protocol A the crop does not change ``lr``.

Holes (NaN) in the HR depth: protocol A samples them as they are (NaN). Protocol B is a weighted average
with negative lobes, so holes must not leak into it as zeros or spread NaN over the whole kernel: where the
HR depth has holes it resizes ``depth * valid`` and ``valid`` with the same PIL filter and divides
(normalised convolution); an LR pixel is kept where the resized ``valid`` (the share of the kernel weight
that fell on valid pixels) is at least ``min_coverage`` and is NaN otherwise. Without holes the result is
PIL's output bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["DESCRIPTIONS", "PROTOCOLS", "crop_to_multiple", "make_lr", "pil_resize"]

PROTOCOLS = ("A", "A-start", "B", "area")

#: one line per protocol, printed with every table
DESCRIPTIONS = {
    "A": "interval sampling hr[s-1::s, s-1::s]",
    "A-start": "interval sampling hr[::s, ::s]",
    "B": "PIL bicubic downsampling",
    "area": "area average over the valid pixels of each block (hole below half coverage)",
}


def pil_resize(image: np.ndarray, size: tuple[int, int], resample: int = Image.BICUBIC) -> np.ndarray:
    """Resize a 2-D float image with PIL in float mode (``'F'``), as the literature's evaluation code does.

    Parameters
    ----------
    image : numpy.ndarray
        ``[H, W]`` real array (converted to float32).
    size : tuple of int
        ``(width, height)`` of the output, PIL order.
    resample : int
        PIL filter, default ``Image.BICUBIC`` (Keys cubic with ``a = -0.5``, antialiased when shrinking).

    Returns
    -------
    numpy.ndarray
        ``[height, width]`` float32.
    """
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D [H, W], got shape {image.shape}")
    if min(size) <= 0:
        raise ValueError(f"size must be positive (width, height), got {size}")
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    return np.asarray(pil.resize(size, resample), dtype=np.float32)


def crop_to_multiple(depth: np.ndarray | torch.Tensor, scale: int) -> np.ndarray | torch.Tensor:
    """Crop the last two axes to a multiple of ``scale`` (keeping the top-left corner).

    Parameters
    ----------
    depth : numpy.ndarray or torch.Tensor
        ``[..., H, W]``.
    scale : int
        Positive integer factor.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        ``[..., H - H % scale, W - W % scale]`` view of ``depth``.
    """
    _check_scale(scale, depth.shape)
    h, w = depth.shape[-2:]
    return depth[..., : h - h % scale, : w - w % scale]


def _check_scale(scale: int, shape: tuple[int, ...]) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    if len(shape) < 2:
        raise ValueError(f"depth must have at least 2 dims [..., H, W], got shape {tuple(shape)}")
    if shape[-2] < scale or shape[-1] < scale:
        raise ValueError(f"depth of shape {tuple(shape)} is smaller than scale {scale}")


def _bicubic_down(hr: np.ndarray, scale: int, min_coverage: float) -> np.ndarray:
    h, w = hr.shape
    size = (w // scale, h // scale)
    valid = np.isfinite(hr)
    if valid.all():
        return pil_resize(hr, size)
    num = pil_resize(np.where(valid, hr, 0.0), size)
    cover = pil_resize(valid.astype(np.float32), size)
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = num / cover
    lr[~(cover >= min_coverage)] = np.nan
    return lr.astype(np.float32)


def _make_lr_2d(hr: np.ndarray, scale: int, protocol: str, min_coverage: float) -> np.ndarray:
    if protocol == "A":
        return np.ascontiguousarray(hr[scale - 1 :: scale, scale - 1 :: scale])
    if protocol == "A-start":
        return np.ascontiguousarray(hr[::scale, ::scale])
    if protocol == "area":
        return _area_down(hr, scale, min_coverage)
    return _bicubic_down(hr, scale, min_coverage)


def _area_down(hr: np.ndarray, scale: int, min_coverage: float) -> np.ndarray:
    h, w = hr.shape[0] // scale, hr.shape[1] // scale
    blocks = hr[: h * scale, : w * scale].reshape(h, scale, w, scale).astype(np.float64)
    valid = np.isfinite(blocks)
    count = valid.sum(axis=(1, 3))
    total = np.where(valid, blocks, 0.0).sum(axis=(1, 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = total / count
    lr[count < min_coverage * scale * scale] = np.nan
    return lr.astype(np.float32)


def make_lr(
    depth_hr: np.ndarray | torch.Tensor, scale: int, protocol: str = "B", *, min_coverage: float = 0.5
) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
    """Make the (cropped) HR / LR pair of a depth map under protocol A or B.

    Parameters
    ----------
    depth_hr : numpy.ndarray or torch.Tensor
        ``[H, W]`` or ``[..., H, W]`` real depth in any units, NaN = invalid (0 is **not** treated as invalid
        here: convert sensor zeros to NaN first, as the dataset readers do).
    scale : int
        Integer downsampling factor ``s >= 1``.
    protocol : {"A", "A-start", "B", "area"}
        ``"A"``: interval sampling ``hr[s-1::s, s-1::s]``; ``"A-start"``: ``hr[::s, ::s]``; ``"B"``: PIL
        bicubic downsampling; ``"area"``: mean of the valid pixels of each block.
    min_coverage : float
        Protocols B and area with holes only: smallest share of the kernel weight (B) or of the block's
        pixels (area) on valid HR pixels for an LR pixel to be kept (see the module docstring).

    Returns
    -------
    hr : numpy.ndarray or torch.Tensor
        ``[..., H', W']`` with ``H' = H - H % s``, ``W' = W - W % s`` (a view of ``depth_hr``).
    lr : numpy.ndarray or torch.Tensor
        ``[..., H'/s, W'/s]`` float32 (numpy) or the input's dtype / device (torch).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if not 0.0 < min_coverage <= 1.0:
        raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage}")
    hr = crop_to_multiple(depth_hr, scale)
    if isinstance(hr, torch.Tensor):
        flat = hr.detach().reshape(-1, *hr.shape[-2:]).to("cpu", torch.float32).numpy()
        lr = np.stack([_make_lr_2d(x, scale, protocol, min_coverage) for x in flat])
        lr_t = torch.from_numpy(lr).reshape(*hr.shape[:-2], *lr.shape[-2:]).to(hr.device, hr.dtype)
        return hr, lr_t
    hr = np.asarray(hr)
    if not np.issubdtype(hr.dtype, np.number):
        raise ValueError(f"depth_hr must be a real array, got dtype {hr.dtype}")
    flat = hr.reshape(-1, *hr.shape[-2:]).astype(np.float32, copy=False)
    lr = np.stack([_make_lr_2d(x, scale, protocol, min_coverage) for x in flat])
    return hr, lr.reshape(*hr.shape[:-2], *lr.shape[-2:])
