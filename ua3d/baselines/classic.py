"""Classic upsamplers with the same call shape as :func:`ua3d.upsample`.

``method(guide [B, Cg, H, W], signal [B, C, h, w], output_size=None, **kw) -> [B, C, H', W']``;
``output_size`` defaults to the guide's size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..api import as_signal, check_lr_size
from ..core.checks import as_guide
from ..core.kernel import init_params, resample_guide
from ..core.ops import kernel_render

__all__ = ["bicubic", "bilinear", "jbu", "nearest"]


def _prep(guide, signal, output_size):
    g = as_guide(guide)
    s = as_signal(signal)
    if g.shape[0] != s.shape[0]:
        raise ValueError(f"batch size of signal {tuple(s.shape)} does not match guide {tuple(g.shape)}")
    size = tuple(g.shape[-2:]) if output_size is None else tuple(int(v) for v in output_size)
    return g, s, size


def bilinear(guide, signal, output_size=None) -> torch.Tensor:
    """Bilinear interpolation (``align_corners=False``); the guide only sets the output size."""
    _, s, size = _prep(guide, signal, output_size)
    return F.interpolate(s, size=size, mode="bilinear", align_corners=False)


def bicubic(guide, signal, output_size=None) -> torch.Tensor:
    """Bicubic interpolation (Keys a = -0.75, PyTorch's; ``align_corners=False``)."""
    _, s, size = _prep(guide, signal, output_size)
    return F.interpolate(s, size=size, mode="bicubic", align_corners=False)


def nearest(guide, signal, output_size=None) -> torch.Tensor:
    """Nearest neighbour (``nearest-exact``: the LR cell whose centre is closest)."""
    _, s, size = _prep(guide, signal, output_size)
    return F.interpolate(s, size=size, mode="nearest-exact")


def jbu(
    guide,
    signal,
    output_size=None,
    *,
    sigma_spatial: float | None = None,
    sigma_range: float = 0.12,
    radius: float | None = None,
    range_centre: str = "bilinear",
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Joint bilateral upsampling (Kopf et al. 2007): the isotropic, untrained limit of the kernel.

    ``w(p, q) = exp(-|p - c(q)|^2 / 2 sigma_s^2) exp(-|I(p) - I(q)|^2 / 2 sigma_r^2)``, normalised over
    the LR cells within ``radius`` of ``p``'s nearest cell.

    Parameters
    ----------
    sigma_spatial : HR pixels; default ``0.5 * max(scale_x, scale_y)`` (half an LR cell).
    sigma_range : guide units (0.12 for an RGB guide in [0, 1]).
    radius : window radius in LR cells; default ``ceil(3 sigma_s / scale)`` (at least 1).
    range_centre : ``"bilinear"`` (``I(q)`` = the HR guide sampled at the LR cell centre, Kopf's
        choice, and the TTO's default ``guide_downsample``) or ``"area"`` (the antialiased LR guide).
    mask : ``[B, 1, h, w]`` bool, False = invalid LR value (excluded, weights renormalised).
    """
    g, s, size = _prep(guide, signal, output_size)
    if size != tuple(g.shape[-2:]):
        g = F.interpolate(g, size=size, mode="bilinear", align_corners=False, antialias=True)
    h, w = check_lr_size(tuple(s.shape[-2:]), size)
    H, W = size
    scale = max(H / h, W / w)
    ss = 0.5 * scale if sigma_spatial is None else float(sigma_spatial)
    if radius is None:
        radius = max(1.0, math.ceil(3 * ss / min(H / h, W / w)))
    g_lr = resample_guide(g, (h, w), range_centre)
    params = init_params(g.shape[0], (h, w), size, sigma_spatial=ss, sigma_range=sigma_range,
                         device=g.device, dtype=g.dtype)
    out, _ = kernel_render(params, g, g_lr, s.to(g.dtype), radius, signal_mask=mask, backend=backend,
                           out_dtype=s.dtype)
    return out
