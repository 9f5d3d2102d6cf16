"""Classic upsamplers with the same call shape as :func:`ua3d.upsample`.

``method(guide [B, Cg, H, W], signal [B, C, h, w], output_size=None, **kw) -> [B, C, H', W']``;
``output_size`` defaults to the guide's size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core.checks import as_guide, as_signal, check_finite, check_lr_size, check_number, check_size
from ..core.kernel import init_params, resample_guide
from ..core.memory import check_memory
from ..core.ops import kernel_render

__all__ = ["bicubic", "bilinear", "jbu", "nearest"]


def _prep(guide, signal, output_size, mask=None):
    g = as_guide(guide)
    s = as_signal(signal)
    if g.shape[0] != s.shape[0]:
        raise ValueError(f"batch size of signal {tuple(s.shape)} does not match guide {tuple(g.shape)}")
    if mask is None:
        check_finite(s, "signal")
    size = tuple(g.shape[-2:]) if output_size is None else check_size(output_size, "output_size")
    B, C = s.shape[:2]
    item = s.element_size()
    check_memory(
        B * (C + g.shape[1]) * size[0] * size[1] * item,
        f"upsampling {C} channels to {size[0]}x{size[1]}",
        "use a smaller output_size or upsample fewer channels at a time",
        device=s.device,
    )
    return g, s, size


def _interp(s: torch.Tensor, size, **kw) -> torch.Tensor:
    """``F.interpolate``, computed in float32 for float16/bfloat16 input and returned in its dtype."""
    if s.dtype in (torch.float16, torch.bfloat16):
        return F.interpolate(s.float(), size=size, **kw).to(s.dtype)
    return F.interpolate(s, size=size, **kw)


def bilinear(guide, signal, output_size=None) -> torch.Tensor:
    """Bilinear interpolation (``align_corners=False``); the guide only sets the output size."""
    _, s, size = _prep(guide, signal, output_size)
    return _interp(s, size, mode="bilinear", align_corners=False)


def bicubic(guide, signal, output_size=None) -> torch.Tensor:
    """Bicubic interpolation (Keys a = -0.75, PyTorch's; ``align_corners=False``)."""
    _, s, size = _prep(guide, signal, output_size)
    return _interp(s, size, mode="bicubic", align_corners=False)


def nearest(guide, signal, output_size=None) -> torch.Tensor:
    """Nearest neighbour (``nearest-exact``: the LR cell whose centre is closest)."""
    _, s, size = _prep(guide, signal, output_size)
    return _interp(s, size, mode="nearest-exact")


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
    g, s, size = _prep(guide, signal, output_size, mask)
    sigma_range = check_number(sigma_range, "sigma_range", low=0, low_open=True)
    if sigma_spatial is not None:
        sigma_spatial = check_number(sigma_spatial, "sigma_spatial", low=0, low_open=True)
    if radius is not None:
        radius = check_number(radius, "radius", low=0)
    if mask is not None:
        mask = torch.as_tensor(mask, device=s.device)
        if mask.ndim == 2:
            mask = mask[None, None]
        if tuple(mask.shape) != (s.shape[0], 1, *s.shape[-2:]):
            raise ValueError(
                f"mask must be [B, 1, h, w] = {(s.shape[0], 1, *s.shape[-2:])}, got {tuple(mask.shape)}"
            )
        mask = mask.bool()
        check_finite(s, "signal", mask=mask.expand_as(s))
        s = torch.where(mask, s, torch.zeros((), dtype=s.dtype, device=s.device))
    if size != tuple(g.shape[-2:]):
        g = F.interpolate(g, size=size, mode="bilinear", align_corners=False, antialias=True)
    h, w = check_lr_size(tuple(s.shape[-2:]), size)
    H, W = size
    scale = max(H / h, W / w)
    ss = 0.5 * scale if sigma_spatial is None else float(sigma_spatial)
    if radius is None:
        radius = max(1.0, math.ceil(3 * ss / min(H / h, W / w)))
    g_lr = resample_guide(g, (h, w), range_centre)
    params = init_params(
        g.shape[0], (h, w), size, sigma_spatial=ss, sigma_range=sigma_range, device=g.device, dtype=g.dtype
    )
    out, _ = kernel_render(
        params, g, g_lr, s.to(g.dtype), radius, signal_mask=mask, backend=backend, out_dtype=s.dtype
    )
    return out
