"""AnyUp as a ua3d baseline: :func:`anyup` (features) and :func:`anyup_depth` (depth with holes)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ...core.checks import check_tensor, depth_valid_mask
from ...features.image import normalize_image
from .loading import load_anyup
from .model import AnyUp, _check_inputs

__all__ = ["anyup", "anyup_depth"]


def _normalised_guide(guide: torch.Tensor, normalize_guide: bool) -> torch.Tensor:
    """ImageNet-normalise a ``[0, 1]`` RGB guide (checked), or return it as is."""
    if not normalize_guide:
        return guide
    lo, hi = float(guide.min()), float(guide.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"guide must be RGB in [0, 1] when normalize_guide=True, got values in [{lo:.3g}, {hi:.3g}] "
            f"(shape {tuple(guide.shape)}); pass normalize_guide=False for an already normalised guide"
        )
    return normalize_image(guide)


def _resolve_model(model: AnyUp | None, checkpoint: str | Path | None, guide: object) -> AnyUp:
    if (model is None) == (checkpoint is None):
        raise ValueError("anyup needs exactly one of model= (an AnyUp) or checkpoint= (a local .pth path)")
    if model is None:
        check_tensor(guide, "guide", ndim=4)
        model = load_anyup(checkpoint).to(device=guide.device, dtype=guide.dtype)
    elif not isinstance(model, AnyUp):
        raise ValueError(f"model must be an AnyUp, got {type(model).__name__}")
    return model


def anyup(
    guide: torch.Tensor,
    features: torch.Tensor,
    output_size: tuple[int, int] | None = None,
    *,
    model: AnyUp | None = None,
    checkpoint: str | Path | None = None,
    normalize_guide: bool = True,
) -> torch.Tensor:
    """AnyUp baseline with ua3d's baseline call shape.

    Parameters
    ----------
    guide : ``[B, 3, H, W]`` RGB in ``[0, 1]``.  With ``normalize_guide=True`` (default) it is
        normalised inside with the ImageNet statistics ``(rgb - IMAGENET_MEAN) / IMAGENET_STD``,
        as the released checkpoints expect; pass ``normalize_guide=False`` for a guide that is
        already normalised.
    features : ``[B, C, h, w]`` raw backbone features (any C; not normalised by the caller).
    output_size : ``(H', W')``; default the guide's ``(H, W)``.
    model : a loaded :class:`AnyUp` (used as is: its device and dtype must match the inputs).
    checkpoint : path of a local checkpoint, loaded with :func:`load_anyup` onto the inputs'
        device and dtype when ``model`` is not given.  There are no built-in weights.
    normalize_guide : see ``guide``.

    Returns
    -------
    ``[B, C, H', W']`` upsampled features (computed under ``torch.no_grad``).

    Notes
    -----
    The output is positively homogeneous in the features: ``anyup(g, s * f) = s * anyup(g, f)``
    for any ``s > 0`` (up to float rounding), because the features reach the attention weights only
    through their L2 normalisation over channels, and the output is a convex combination of them.
    """
    model = _resolve_model(model, checkpoint, guide)
    size = _check_inputs(model, guide, features, output_size, "guide")
    with torch.no_grad():
        return model(_normalised_guide(guide, normalize_guide), features, size)


def anyup_depth(
    depth_lr: torch.Tensor,
    guide: torch.Tensor,
    *,
    model: AnyUp | None = None,
    checkpoint: str | Path | None = None,
    mask_lr: torch.Tensor | None = None,
    output_size: tuple[int, int] | None = None,
    min_weight: float = 1e-3,
    normalize_guide: bool = True,
) -> torch.Tensor:
    """Guided depth upsampling with AnyUp, holes excluded (the ``anyup`` method of ``ua3d eval``).

    Depth is treated as a one-channel feature.  An LR pixel is valid where it is finite, ``> 0``
    and ``mask_lr`` is True.  The attention weights come from the guide and the one-channel key
    feature ``valid`` (exactly what AnyUp's L2 normalisation over channels makes of the depth map
    with its holes set to 0: 1 at valid pixels, 0 at holes), so they do not depend on the depth
    values at all.  They are applied to the two value channels ``[depth * valid, valid]``
    (normalised convolution): the output is ``num / den``, a convex combination of valid LR depths
    only, and NaN where the attention mass ``den`` on valid pixels is ``<= min_weight``.

    Consequences: without holes the result equals ``anyup(guide, depth_lr)`` (up to float
    rounding; ``den = 1``), and it is scale- and shift-equivariant in the depth,
    ``f(s * d + t) = s * f(d) + t`` for ``s > 0`` and positive ``d, s * d + t``, so depth in metres
    or millimetres needs no per-image normalisation.

    Parameters
    ----------
    depth_lr : ``[B, 1, h, w]`` low-resolution depth (NaN / 0 / negative = hole), any units.
    guide : ``[B, 3, H, W]`` RGB in ``[0, 1]`` (see :func:`anyup` for ``normalize_guide``).
    model : a loaded :class:`AnyUp` on the inputs' device and dtype ...
    checkpoint : ... or a local checkpoint path (loaded on each call; pass ``model`` to reuse).
    mask_lr : optional ``[B, 1, h, w]`` bool, False = hole.
    output_size : ``(H', W')``; default the guide's ``(H, W)``.
    min_weight : smallest attention mass on valid pixels for an output value (else NaN).
    normalize_guide : see :func:`anyup`.

    Returns
    -------
    ``[B, 1, H', W']`` depth in the units of ``depth_lr``, NaN where there is no valid support.
    """
    model = _resolve_model(model, checkpoint, guide)
    check_tensor(depth_lr, "depth_lr", ndim=4)
    if depth_lr.shape[1] != 1 or not depth_lr.is_floating_point():
        raise ValueError(
            f"depth_lr must be a floating [B, 1, h, w] tensor, got {depth_lr.dtype} {tuple(depth_lr.shape)}"
        )
    if mask_lr is not None:
        if not isinstance(mask_lr, torch.Tensor) or mask_lr.shape != depth_lr.shape:
            got = tuple(mask_lr.shape) if isinstance(mask_lr, torch.Tensor) else type(mask_lr).__name__
            raise ValueError(f"mask_lr must have the shape of depth_lr {tuple(depth_lr.shape)}, got {got}")
    valid = depth_valid_mask(
        depth_lr, "depth_lr", mask=mask_lr
    )  # the one rule: 0/NaN/Inf holes, negative refused
    if not min_weight >= 0:
        raise ValueError(f"min_weight must be >= 0, got {min_weight}")
    key_feature = valid.to(depth_lr.dtype)
    size = _check_inputs(model, guide, key_feature, output_size, "guide")
    values = torch.cat([torch.where(valid, depth_lr, torch.zeros_like(depth_lr)), key_feature], dim=1)
    with torch.no_grad():
        qp, k = model._attention_inputs(_normalised_guide(guide, normalize_guide), key_feature, size)
        both = model._attend_projected(qp, k, values, None, None)
    num, den = both[:, :1], both[:, 1:]
    out = num / den.clamp_min(torch.finfo(den.dtype).tiny)
    return torch.where(den > min_weight, out, torch.full_like(out, math.nan))
