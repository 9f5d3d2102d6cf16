"""Matplotlib (Agg, no display) figures: image grids and upsampling comparisons.

Every function returns the rendered figure as uint8 RGB ``[H, W, 3]`` and, when ``path`` is
given, also writes it there (format from the extension, e.g. ``.png``, ``.pdf``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ua3d.rgbd.camera import depth_validity
from ua3d.viz.colormaps import colorize_depth, colorize_error, depth_range
from ua3d.viz.pca import PCABasis

__all__ = ["comparison_figure", "depth_sr_figure", "image_grid", "to_display_image"]


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def to_display_image(img: Any, name: str = "image") -> np.ndarray:
    """``[H, W, 3]`` / ``[H, W]`` (uint8 or float in [0, 1]) or ``[3, H, W]`` -> float ``[H, W(, 3)]``."""
    a = _np(img)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[2] != 3:
        a = np.moveaxis(a, 0, -1)
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)) or a.size == 0:
        raise ValueError(f"{name} must have shape [H, W], [H, W, 3] or [3, H, W], got {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    return np.clip(np.nan_to_num(a.astype(np.float32)), 0.0, 1.0) if a.ndim == 3 else a.astype(np.float32)


def image_grid(
    images: Sequence[Any],
    titles: Sequence[str] | None = None,
    path: str | Path | None = None,
    ncols: int | None = None,
    panel_size: float = 3.0,
    dpi: int = 100,
    suptitle: str | None = None,
) -> np.ndarray:
    """Lay out images in a grid (nearest-neighbour display, so low-res inputs stay blocky).

    Parameters
    ----------
    images : sequence of ``[H, W, 3]`` RGB (uint8 or float [0, 1]), ``[3, H, W]``, or ``[H, W]``
        (grey, auto-scaled); sizes may differ.
    titles : one per image, optional
    path : output file, optional
    ncols : columns (default: all in one row up to 4, then ``ceil(sqrt(n))``)

    Returns
    -------
    uint8 ``[Hf, Wf, 3]`` rendering of the figure.
    """
    imgs = [to_display_image(im, f"images[{i}]") for i, im in enumerate(images)]
    if not imgs:
        raise ValueError("images is empty")
    if titles is not None and len(titles) != len(imgs):
        raise ValueError(f"titles has {len(titles)} entries for {len(imgs)} images")
    n = len(imgs)
    ncols = ncols or (n if n <= 4 else math.ceil(math.sqrt(n)))
    if ncols <= 0:
        raise ValueError(f"ncols must be positive, got {ncols}")
    nrows = math.ceil(n / ncols)
    aspect = max(im.shape[0] / im.shape[1] for im in imgs)
    fig = Figure(
        figsize=(panel_size * ncols, panel_size * aspect * nrows + (0.4 if suptitle else 0.0)), dpi=dpi
    )
    canvas = FigureCanvasAgg(fig)
    for i, im in enumerate(imgs):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(im, interpolation="nearest", cmap="gray" if im.ndim == 2 else None)
        ax.set_axis_off()
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    canvas.draw()
    out = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(str(path), dpi=dpi)
    return out


def _chw(x: Any, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 3 or 0 in t.shape:
        raise ValueError(f"{name} must be a feature map [C, H, W], got {tuple(t.shape)}")
    return t.detach().float().cpu()


def comparison_figure(
    guide: Any,
    lr: Any,
    bilinear: Any,
    ours: Any,
    gt: Any | None = None,
    errors: bool = True,
    path: str | Path | None = None,
    pca: PCABasis | None = None,
    names: tuple[str, str] = ("bilinear", "ours"),
) -> np.ndarray:
    """Feature-upsampling comparison: guide, LR, bilinear, ours (and GT), coloured by one PCA.

    Parameters
    ----------
    guide : RGB ``[H, W, 3]`` or ``[3, H, W]``
    lr : ``[C, h, w]`` low-resolution features
    bilinear, ours : ``[C, H, W]`` upsampled features
    gt : ``[C, H, W]``, optional reference features
    errors : add ``1 - cosine(pred, gt)`` maps (shared colour scale) when ``gt`` is given
    pca : shared basis; default fitted on ``lr`` (the input all methods share)
    names : titles of the two methods
    """
    feats = {"LR": _chw(lr, "lr"), names[0]: _chw(bilinear, "bilinear"), names[1]: _chw(ours, "ours")}
    if gt is not None:
        feats["GT"] = _chw(gt, "gt")
    c = feats["LR"].shape[0]
    hr = [k for k in feats if k != "LR"]
    for k in hr:
        if feats[k].shape[0] != c or feats[k].shape[1:] != feats[hr[0]].shape[1:]:
            raise ValueError(
                f"{k} has shape {tuple(feats[k].shape)}; expected [C={c}, H, W] like {tuple(feats[hr[0]].shape)}"
            )
    basis = pca or PCABasis.fit(feats["LR"])
    images = [to_display_image(guide, "guide")] + [basis.transform(f).numpy() for f in feats.values()]
    titles = ["guide"] + list(feats)
    if errors and gt is not None:
        errs = {k: 1 - torch.nn.functional.cosine_similarity(feats[k], feats["GT"], dim=0) for k in names}
        vmax = max(float(torch.quantile(e.flatten(), 0.99)) for e in errs.values()) or 1.0
        for k, e in errs.items():
            images.append(colorize_error(e, vmax=vmax))
            titles.append(f"1-cos {k} (mean {float(e.mean()):.3f})")
    return image_grid(images, titles, path, ncols=len(feats) + 1)


def _hw(x: Any, name: str) -> np.ndarray:
    a = _np(x).astype(np.float64)
    if a.ndim == 3 and 1 in (a.shape[0], a.shape[-1]):
        a = a.squeeze(0) if a.shape[0] == 1 else a[..., 0]
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{name} must be a depth map [H, W], got {a.shape}")
    return a


def depth_sr_figure(
    guide: Any,
    lr: Any,
    bicubic: Any,
    ours: Any,
    gt: Any | None = None,
    errors: bool = True,
    path: str | Path | None = None,
    names: tuple[str, str] = ("bicubic", "ours"),
    unit: str = "",
) -> np.ndarray:
    """Guided depth super-resolution comparison with one depth colour scale (holes black).

    Parameters
    ----------
    guide : RGB ``[H, W, 3]`` or ``[3, H, W]``
    lr : ``[h, w]`` low-resolution depth
    bicubic, ours : ``[H, W]`` upsampled depth
    gt : ``[H, W]`` reference; with ``errors`` adds ``|pred - gt|`` maps (shared scale) and the
        RMSE over valid GT pixels in the titles (in the depth's own unit, labelled ``unit``)
    """
    maps = {"LR": _hw(lr, "lr"), names[0]: _hw(bicubic, "bicubic"), names[1]: _hw(ours, "ours")}
    if gt is not None:
        maps["GT"] = _hw(gt, "gt")
    shape = maps[names[0]].shape
    for k in list(maps)[1:]:
        if maps[k].shape != shape:
            raise ValueError(f"{k} has shape {maps[k].shape}, expected {shape} like {names[0]}")
    vmin, vmax = depth_range(maps.get("GT", maps["LR"]))
    images = [to_display_image(guide, "guide")] + [colorize_depth(m, vmin, vmax) for m in maps.values()]
    titles = ["guide"] + list(maps)
    if gt is not None:
        valid = depth_validity(maps["GT"])
        errs = {k: np.where(valid, np.abs(maps[k] - maps["GT"]), np.nan) for k in names}
        for k in names:
            rmse = float(np.sqrt(np.nanmean(errs[k] ** 2)))
            titles[titles.index(k)] = f"{k} (RMSE {rmse:.4g}{unit})"
        if errors:
            emax = max(float(np.nanpercentile(e, 99)) for e in errs.values()) or 1.0
            for k, e in errs.items():
                images.append(colorize_error(e, vmax=emax, valid=valid))
                titles.append(f"|{k} - GT|")
    return image_grid(images, titles, path, ncols=len(maps) + 1)
