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
from ua3d.viz.colormaps import colorize_depth, colorize_error, colorize_signed, depth_range
from ua3d.viz.pca import PCABasis

__all__ = ["annotated_render", "comparison_figure", "depth_sr_figure", "image_grid", "to_display_image"]

METHOD = "ua3d"  # the one name of the method in every figure


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
    colorbars: Sequence[tuple[str, float, float, str] | None] | None = None,
) -> np.ndarray:
    """Lay out images in a grid (nearest-neighbour display, so low-res inputs stay blocky).

    Parameters
    ----------
    images : sequence of ``[H, W, 3]`` RGB (uint8 or float [0, 1]), ``[3, H, W]``, or ``[H, W]``
        (grey, auto-scaled); sizes may differ.
    titles : one per image, optional
    path : output file, optional
    ncols : columns (default: all in one row up to 4, then ``ceil(sqrt(n))``)
    colorbars : per image ``(cmap, vmin, vmax, label)`` or None: a colour bar (label with units) beside it

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
    size = (panel_size * ncols, panel_size * aspect * nrows + (0.4 if suptitle else 0.0))
    fig = Figure(figsize=size, dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    if colorbars is not None and len(colorbars) != len(imgs):
        raise ValueError(f"colorbars has {len(colorbars)} entries for {len(imgs)} images")
    bars = colorbars is not None and any(b is not None for b in colorbars)
    layout = _grid_layout(size, nrows, ncols, titles is not None, bool(suptitle), bars)
    fig.subplots_adjust(**layout)
    slot_in = size[0] * (layout["right"] - layout["left"]) / (ncols + layout["wspace"] * (ncols - 1))
    for i, im in enumerate(imgs):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(im, interpolation="nearest", cmap="gray" if im.ndim == 2 else None)
        ax.set_axis_off()
        if titles is not None:
            has_bar = colorbars is not None and colorbars[i] is not None
            ax.set_title(titles[i], fontsize=_title_size(titles[i], slot_in * (0.93 if has_bar else 1.0)))
        if colorbars is not None and colorbars[i] is not None:
            import matplotlib

            cmap, vmin, vmax, label = colorbars[i]
            sm = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(vmin, vmax), cmap=cmap)
            cb = fig.colorbar(sm, ax=ax, fraction=0.046, pad=0.02)
            cb.set_label(label, fontsize=8)
            cb.ax.tick_params(labelsize=7)
    if suptitle:
        fig.suptitle(suptitle)
    return _draw(fig, canvas, path, dpi)


#: fixed grid margins in inches (what ``tight_layout`` chose for the demo's figures, without its cost:
#: it drew every figure once more to measure the text): outer margin, a title line (9 pt + pad), the
#: suptitle line, the gap between panels, and the room a colour bar's ticks and label need on its right
_MARGIN_IN, _TITLE_IN, _SUPTITLE_IN, _GAP_IN, _BAR_LABELS_IN = 0.15, 0.24, 0.26, 0.15, 0.7


def _grid_layout(
    size: tuple[float, float], nrows: int, ncols: int, titles: bool, suptitle: bool, colorbars: bool
) -> dict[str, float]:
    """``subplots_adjust`` keywords for an ``nrows x ncols`` grid of a ``size`` (inches) figure: fixed
    margins in inches, so the layout costs no text measurement."""
    fw, fh = size
    title = _TITLE_IN if titles else 0.0
    right = _MARGIN_IN + (_BAR_LABELS_IN if colorbars else 0.0)
    gap_w = _GAP_IN + (_BAR_LABELS_IN if colorbars else 0.0)
    top = _MARGIN_IN / 2 + title + (_SUPTITLE_IN if suptitle else 0.0)
    bottom = _MARGIN_IN
    ax_w = max((fw - _MARGIN_IN - right - (ncols - 1) * gap_w) / ncols, 0.1)
    ax_h = max((fh - top - bottom - (nrows - 1) * (title + _GAP_IN / 2)) / nrows, 0.1)
    return {
        "left": _MARGIN_IN / fw,
        "right": 1 - right / fw,
        "bottom": bottom / fh,
        "top": 1 - top / fh,
        "wspace": gap_w / ax_w,
        "hspace": (title + _GAP_IN / 2) / ax_h,
    }


def _title_size(title: str, width_in: float, largest: float = 9.0, smallest: float = 6.0) -> float:
    """Font size (points) at which ``title`` fits ``width_in`` inches (about 0.52 em a character)."""
    return max(smallest, min(largest, width_in * 72 / (0.52 * max(len(title), 1))))


def _draw(fig: Figure, canvas: FigureCanvasAgg, path: str | Path | None, dpi: int) -> np.ndarray:
    """Render ``fig`` once: the RGB array, and ``path`` written from the same pixels (a ``.png`` is
    encoded from the canvas buffer; other formats go through ``savefig``, which draws again)."""
    canvas.draw()
    out = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix.lower() == ".png":
            from ua3d.io.rgbd import write_color

            write_color(p, out)
        else:
            fig.savefig(str(p), dpi=dpi)
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
    names: tuple[str, str] = ("bilinear", METHOD),
) -> np.ndarray:
    """Feature-upsampling comparison: guide, LR, bilinear, ua3d (and GT), coloured by one PCA.

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
    titles = ["guide"] + [f"{k} {v.shape[2]}x{v.shape[1]}" for k, v in feats.items()]
    bars: list = [None] * len(images)
    if errors and gt is not None:
        errs = {k: 1 - torch.nn.functional.cosine_similarity(feats[k], feats["GT"], dim=0) for k in names}
        vmax = max(float(torch.quantile(e.flatten(), 0.99)) for e in errs.values()) or 1.0
        for k, e in errs.items():
            images.append(colorize_error(e, vmax=vmax))
            titles.append(f"1-cos {k} (mean {float(e.mean()):.3f})")
            bars.append(("inferno", 0.0, vmax, "1 - cosine similarity"))
    c = feats["LR"].shape[0]
    return image_grid(
        images,
        titles,
        path,
        ncols=len(feats) + 1,
        colorbars=bars,
        suptitle=f"{c}-channel features coloured by one PCA (top 3 components, fitted on LR); size WxH",
    )


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
    names: tuple[str, str] = ("bicubic", METHOD),
    unit: str = "m",
) -> np.ndarray:
    """Guided depth super-resolution comparison with one depth colour scale (holes black) and colour bars.

    Parameters
    ----------
    guide : RGB ``[H, W, 3]`` or ``[3, H, W]``
    lr : ``[h, w]`` low-resolution depth
    bicubic, ours : ``[H, W]`` upsampled depth
    gt : ``[H, W]`` reference; with ``errors`` adds ``|pred - gt|`` maps (shared scale), the map of
        ``|ours - gt| - |bicubic - gt|`` (blue: ours is closer) and the RMSE over valid GT pixels in the
        titles
    unit : the depth's unit, for the colour bars and the RMSE (default metres)

    Layout: one row (guide, LR, bicubic, ours) without ``gt``; two full rows of four with it.
    """
    maps = {"LR": _hw(lr, "lr"), names[0]: _hw(bicubic, "bicubic"), names[1]: _hw(ours, "ours")}
    if gt is not None:
        maps["GT"] = _hw(gt, "gt")
    shape = maps[names[0]].shape
    for k in list(maps)[1:]:
        if maps[k].shape != shape:
            raise ValueError(f"{k} has shape {maps[k].shape}, expected {shape} like {names[0]}")
    vmin, vmax = depth_range(maps.get("GT", maps["LR"]))
    u = f" ({unit})" if unit else ""
    depth_bar = ("turbo", vmin, vmax, f"depth{u}")
    images = [to_display_image(guide, "guide")] + [colorize_depth(m, vmin, vmax) for m in maps.values()]
    titles = ["guide"] + [f"{k} {m.shape[1]}x{m.shape[0]}" for k, m in maps.items()]
    bars: list = [None] + [depth_bar] * len(maps)
    if gt is not None:
        valid = depth_validity(maps["GT"])
        errs = {k: np.where(valid, np.abs(maps[k] - maps["GT"]), np.nan) for k in names}
        for k in names:
            rmse = float(np.sqrt(np.nanmean(errs[k] ** 2)))
            titles[titles.index(next(t for t in titles if t.startswith(k + " ")))] = (
                f"{k} (RMSE {rmse:.4g} {unit})"
            )
        if errors:
            emax = max(float(np.nanpercentile(e, 99)) for e in errs.values()) or 1.0
            for k, e in errs.items():
                images.append(colorize_error(e, vmax=emax, valid=valid))
                titles.append(f"|{k} - GT|")
                bars.append(("inferno", 0.0, emax, f"abs. error{u}"))
            diff = errs[names[1]] - errs[names[0]]
            dmax = float(np.nanpercentile(np.abs(diff), 99)) or 1.0
            sig = colorize_signed(np.nan_to_num(diff, nan=0.0), vmax=dmax)
            sig[~valid] = 0.5
            images.append(sig)
            titles.append(f"error {names[1]} - {names[0]} (blue: {names[1]} closer)")
            bars.append(("RdBu_r", -dmax, dmax, f"error difference{u}"))
    ncols = 4 if len(images) != 5 else 5
    return image_grid(
        images,
        titles,
        path,
        ncols=ncols,
        colorbars=bars,
        panel_size=3.2,
        suptitle="guided depth super-resolution (holes black; size WxH)",
    )


def annotated_render(
    image: Any,
    path: str | Path | None = None,
    title: str = "",
    colorbar: tuple[str, float, float, str] | None = None,
    labels: Sequence[tuple[float, float, str]] = (),
    note: str = "",
    dpi: int = 100,
) -> np.ndarray:
    """A rendered picture (e.g. an Open3D view) with a title, text labels and an optional colour bar.

    Parameters
    ----------
    image : ``[H, W, 3]`` RGB (uint8 or float in [0, 1]).
    title : figure title.
    colorbar : ``(cmap, vmin, vmax, label)`` for a colour bar on the right (label with units).
    labels : ``(x, y, text)`` in image pixels, drawn on the picture (e.g. slice depths).
    note : a small line under the picture (e.g. what the colours mean).
    """
    import matplotlib

    img = to_display_image(image, "image")
    h, w = img.shape[:2]
    extra = 1.4 if colorbar else 0.0
    fig = Figure(figsize=(w / dpi + extra, h / dpi + 0.8), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.35 / (h / dpi + 0.8), w / dpi / (w / dpi + extra), h / (h + 0.8 * dpi)))
    ax.imshow(img, interpolation="nearest")
    ax.set_axis_off()
    for x, y, text in labels:
        ax.annotate(
            text,
            (x, y),
            fontsize=8,
            color="black",
            ha="left",
            va="center",
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "0.5", "alpha": 0.8},
        )
    if title:
        fig.suptitle(title, fontsize=10, y=0.99)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="0.25")
    if colorbar:
        cmap, vmin, vmax, label = colorbar
        cax = fig.add_axes((1 - 0.9 / (w / dpi + extra), 0.15, 0.15 / (w / dpi + extra), 0.7))
        sm = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(vmin, vmax), cmap=cmap)
        fig.colorbar(sm, cax=cax, label=label)
    return _draw(fig, canvas, path, dpi)
