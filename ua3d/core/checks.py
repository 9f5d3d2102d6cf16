"""Input validation shared by every layer.

Every public entry point calls these before touching torch so that bad input
fails early with a :class:`ValueError` that names the argument and its shape,
instead of failing deep inside torch or, worse, silently returning garbage.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "as_guide",
    "check_finite",
    "check_same_batch",
    "check_size",
    "check_tensor",
]


def check_tensor(x: object, name: str, ndim: int | Sequence[int] | None = None) -> torch.Tensor:
    """Check that ``x`` is a non-empty floating tensor of the expected rank.

    Parameters
    ----------
    x : object
        The candidate tensor.
    name : str
        Argument name used in the error message.
    ndim : int or sequence of int, optional
        Allowed ranks.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    return x


def check_finite(x: torch.Tensor, name: str, mask: torch.Tensor | None = None) -> None:
    """Raise if ``x`` holds NaN or Inf (optionally only where ``mask`` is True)."""
    if not x.is_floating_point():
        return
    bad = ~torch.isfinite(x)
    if mask is not None:
        bad = bad & mask
    if bool(bad.any()):
        n = int(bad.sum())
        raise ValueError(f"{name} contains {n} NaN/Inf value(s) (shape {tuple(x.shape)})")


def check_size(size: object, name: str) -> tuple[int, int]:
    """Normalise a ``(height, width)`` pair of positive integers."""
    if isinstance(size, int):
        size = (size, size)
    try:
        h, w = size  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a (height, width) pair, got {size!r}") from None
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            if isinstance(v, float) and float(v).is_integer():
                continue
            raise ValueError(f"{name} must hold integers, got {size!r}")
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {tuple(size)}")
    return int(h), int(w)


def check_same_batch(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"batch size of {name_a} {tuple(a.shape)} does not match {name_b} {tuple(b.shape)}"
        )


def as_guide(guide: object, name: str = "guide") -> torch.Tensor:
    """Convert a guide image to a float tensor ``[B, C, H, W]``.

    Accepted layouts
    ----------------
    * ``torch.Tensor`` ``[B, C, H, W]`` or ``[C, H, W]``, floating point, values
      nominally in ``[0, 1]`` (any channel count).
    * ``numpy.ndarray`` ``[H, W, C]`` or ``[H, W]``: ``uint8`` is divided by 255,
      ``uint16`` by 65535, floats are taken as they are.

    Returns a floating tensor (float32 for numpy input, the input dtype otherwise).
    """
    if isinstance(guide, np.ndarray):
        if guide.ndim == 2:
            guide = guide[..., None]
        if guide.ndim != 3:
            raise ValueError(f"{name} as a numpy array must be [H, W, C] or [H, W], got shape {guide.shape}")
        if guide.dtype == np.uint8:
            arr = guide.astype(np.float32) / 255.0
        elif guide.dtype == np.uint16:
            arr = guide.astype(np.float32) / 65535.0
        elif np.issubdtype(guide.dtype, np.floating):
            arr = guide.astype(np.float32)
        else:
            raise ValueError(f"{name} numpy dtype {guide.dtype} not supported (uint8, uint16 or float)")
        guide = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]
    if not isinstance(guide, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [B, C, H, W] or a numpy image, got {type(guide).__name__}")
    check_tensor(guide, name, ndim=(3, 4))
    if guide.ndim == 3:
        guide = guide[None]
    if not guide.is_floating_point():
        raise ValueError(f"{name} must be floating point in [0, 1], got dtype {guide.dtype}")
    check_finite(guide, name)
    return guide
