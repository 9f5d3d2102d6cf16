"""View a feature point cloud (Open3D): PCA colours, RGB, or cosine similarity to a picked point.

Input: a ``.ply``, ``.npz`` or ``.pcd`` written by ua3d (:mod:`ua3d.rgbd.formats`: ``positions [N, 3]``,
``colors [N, 3]``, ``features [N, C]``, and the pixel of each point when stored).

Usage::

    ua3d view points cloud.ply                                   # pick points interactively
    ua3d view points cloud.ply --png out.png                     # PCA colours, headless
    ua3d view points cloud.ply --png out.png --query-pixel 320 240   # similarity to the point at (u, v)
    ua3d view points cloud.ply --png out.png --query-index 123   # similarity to point 123
    ua3d view points --demo --png out.png                        # synthetic demo cloud

(``python -m ua3d.viz.feature_points`` and ``python viewers/feature_points.py`` take the same options.)

Interactive: the cloud opens in Open3D's editing window; Shift + left click picks a point, then
close the window (Q): every point is recoloured by the cosine similarity of its feature to the
picked one (``cmap`` over ``[vmin, vmax]``, default turbo over [0, 1]) and the window reopens for
the next pick. Close without picking to quit. ``--mode rgb`` starts with the stored colours.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ua3d.rgbd.formats import read_point_cloud
from ua3d.viz import o3d_render as r3d
from ua3d.viz.colormaps import apply_cmap
from ua3d.viz.pca import PCABasis

__all__ = [
    "add_arguments",
    "cloud_dict",
    "cosine_similarity_to",
    "main",
    "make_demo_points",
    "pca_colors",
    "pixel_to_index",
    "render_png",
    "render_points",
    "run",
    "similarity_colors",
]

MARKER_COLOR = (1.0, 0.0, 1.0)  # magenta: not in the turbo map

#: the ``render_png`` keywords taken from the options of the same names, and its ``wrote`` line
PNG_OPTIONS = ("query_index", "query_pixel", "mode", "vmin", "vmax", "width", "height", "yaw", "pitch")
PNG_OPTIONS += ("point_size", "background")
PNG_LINE = "{width}x{height} view, {points} points"


def _features(features: Any) -> torch.Tensor:
    f = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
    if f.ndim != 2 or f.shape[0] == 0:
        raise ValueError(f"features must have shape [N, C] with N > 0, got {tuple(f.shape)}")
    if f.shape[1] == 0:
        raise ValueError(f"features must have at least one channel, got shape {tuple(f.shape)}")
    return f.float()


def pca_colors(features: Any, basis: PCABasis | None = None, seed: int = 0) -> tuple[np.ndarray, PCABasis]:
    """PCA RGB ``[N, 3]`` of features ``[N, C]`` and the basis (fitted here unless given)."""
    f = _features(features)
    basis = basis or PCABasis.fit(f, seed=seed)
    return basis.transform(f).numpy(), basis


def cosine_similarity_to(features: Any, index: int) -> np.ndarray:
    """Cosine similarity ``[N]`` of every feature row to row ``index`` (0 for zero vectors)."""
    f = _features(features)
    if not -f.shape[0] <= index < f.shape[0]:
        raise ValueError(f"query index {index} out of range for {f.shape[0]} points")
    return torch.nn.functional.cosine_similarity(f, f[index][None], dim=1, eps=1e-12).numpy()


def similarity_colors(
    features: Any, index: int, vmin: float = 0.0, vmax: float = 1.0, cmap: str = "turbo"
) -> np.ndarray:
    """Colours ``[N, 3]``: ``cmap`` of the cosine similarity to point ``index`` over ``[vmin, vmax]``."""
    return apply_cmap(cosine_similarity_to(features, index), vmin, vmax, cmap)


def render_points(
    positions: np.ndarray,
    colors: np.ndarray,
    width: int = 800,
    height: int = 600,
    yaw: float = 0.0,
    pitch: float = 0.0,
    background: Sequence[float] = (1.0, 1.0, 1.0),
    point_size: float = 3.0,
    marker_index: int | None = None,
    view: Any | None = None,
) -> tuple[np.ndarray, Any]:
    """Headless picture of a coloured cloud; ``marker_index`` adds a magenta sphere at that point.

    The default view looks along +z with image-down = +y (the camera frame of an RGB-D sensor),
    orbited by ``yaw`` / ``pitch`` degrees and framed on the points.

    Returns
    -------
    image : float32 ``[height, width, 3]``; view : the :class:`~ua3d.rgbd.camera.PinholeCamera` used.
    """
    pos = np.asarray(positions, np.float64)
    if pos.ndim != 2 or pos.shape[1] != 3 or len(pos) == 0:
        raise ValueError(f"positions must have shape [N, 3] with N > 0, got {pos.shape}")
    if np.shape(colors) != pos.shape:
        raise ValueError(f"colors must have shape {pos.shape}, got {np.shape(colors)}")
    view = view or r3d.framed_orbit_camera(pos, width, height, yaw, pitch)
    geoms = [r3d.point_cloud(pos, colors)]
    if marker_index is not None:
        _, radius = r3d.fit_view(pos)
        geoms.append(r3d.sphere_marker(pos[marker_index], 0.02 * radius, MARKER_COLOR))
    with r3d.OffscreenRenderer(width, height, background, point_size=point_size) as ren:
        img, _ = ren.render(geoms, view)
    return img, view


def run_interactive(
    positions: np.ndarray, colors: np.ndarray, features: Any, point_size: float = 3.0
) -> None:
    """Pick-and-recolour loop with ``VisualizerWithEditing`` (see module docstring)."""
    r3d.require_display()
    o3d = r3d.import_open3d()
    current = colors
    while True:
        vis = o3d.visualization.VisualizerWithEditing()
        if not vis.create_window("ua3d feature points: Shift+click a point, then close", 1024, 768):
            raise r3d.RenderingUnavailable(
                "cannot open a window (no display?); use --png for a headless picture"
            )
        vis.get_render_option().point_size = point_size
        vis.add_geometry(r3d.point_cloud(positions, current))
        vis.run()
        picked = vis.get_picked_points()
        vis.destroy_window()
        if not picked:
            return
        q = int(picked[-1])
        sims = cosine_similarity_to(features, q)
        print(f"query point {q}: similarity min {sims.min():.3f}, median {np.median(sims):.3f}", flush=True)
        current = similarity_colors(features, q)


def make_demo_points(seed: int = 0, width: int = 160, height: int = 120) -> dict[str, np.ndarray]:
    """Feature cloud of a synthetic scene: features = ``[rgb, one-hot object id (8)]`` + noise."""
    from ua3d.rgbd.camera import backproject
    from ua3d.rgbd.synthetic import make_scene

    scene = make_scene(seed, width, height)
    pts, pix = backproject(scene["depth_gt"], scene["camera"])  # camera frame: +z forward, +y down
    v, u = pix[:, 0].numpy(), pix[:, 1].numpy()
    rgb = scene["rgb"][v, u]
    onehot = np.eye(8, dtype=np.float32)[np.clip(scene["ids"][v, u], 0, 7)]
    rng = np.random.default_rng(seed)
    feats = np.concatenate([rgb, onehot], 1) + 0.05 * rng.standard_normal((len(u), 11)).astype(np.float32)
    return {
        "positions": pts.numpy(),
        "colors": rgb,
        "features": feats,
        "pixels": pix.numpy(),
        "color_mode": "rgb",
    }


def pixel_to_index(pixels: Any, u: int, v: int) -> int:
    """Index of the point whose HR pixel is column ``u``, row ``v`` (``pixels [N, 2]`` = ``(row, column)``)."""
    if pixels is None:
        raise ValueError(
            "--query-pixel needs the pixel of each point, which this file does not store "
            "(ua3d writes it to .ply and .npz); use --query-index"
        )
    pix = np.asarray(pixels)
    hit = np.flatnonzero((pix[:, 0] == v) & (pix[:, 1] == u))
    if hit.size == 0:
        rows, cols = pix[:, 0], pix[:, 1]
        raise ValueError(
            f"no point at pixel (u={u}, v={v}) (a depth hole, or outside the image: the points cover "
            f"u {cols.min()}..{cols.max()}, v {rows.min()}..{rows.max()})"
        )
    return int(hit[0])


def cloud_dict(data: Any) -> dict[str, Any]:
    """The viewer's form of a cloud: the dict of :func:`read_point_cloud` from a path, the dict itself,
    or the fields of a :class:`~ua3d.rgbd.points.FeaturePointCloud` (numpy, no file)."""
    if isinstance(data, dict):
        return data
    if isinstance(data, (str, os.PathLike)):
        return read_point_cloud(data)
    if not all(hasattr(data, k) for k in ("positions", "colors", "features")):
        raise ValueError(
            f"data must be a point cloud file, a dict or a FeaturePointCloud, got {type(data).__name__}"
        )
    arr = lambda t: None if t is None else (t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t)
    return {
        "positions": arr(data.positions),
        "colors": arr(data.colors),
        "features": arr(data.features),
        "pixels": arr(getattr(data, "pixels", None)),
        "color_mode": getattr(data, "color_mode", "rgb"),
        "frame": getattr(data, "frame", "camera"),
    }


def render_png(
    data: Any,
    png: Any,
    *,
    query_index: int | None = None,
    query_pixel: tuple[int, int] | None = None,
    mode: str = "pca",
    vmin: float = 0.0,
    vmax: float = 1.0,
    width: int = 800,
    height: int = 600,
    yaw: float = 0.0,
    pitch: float = 0.0,
    point_size: float = 3.0,
    background: Sequence[float] = (1.0, 1.0, 1.0),
    title: str | None = None,
    annotate: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Write a headless picture of a feature point cloud to ``png``: a title, and for a similarity
    query a colour bar and the query marker (magenta). ``data``: a file path, the dict of
    :func:`read_point_cloud`, or a :class:`~ua3d.rgbd.points.FeaturePointCloud` (drawn from memory).
    ``annotate``: as in :func:`ua3d.viz.volume_slices.render_png` (default
    :func:`ua3d.viz.figures.annotated_render`).

    Returns ``{"path", "points", "query", "seconds", "width", "height", "annotation"}``.
    """
    from ua3d.viz.figures import annotated_render

    annotate = annotate or annotated_render
    t0 = time.perf_counter()
    d = cloud_dict(data)
    pos, feats = d["positions"], d["features"]
    if query_pixel is not None:
        query_index = pixel_to_index(d.get("pixels"), *query_pixel)
    bar, note = None, ""
    if query_index is not None:
        colors = similarity_colors(feats, query_index, vmin, vmax)
        bar = ("turbo", vmin, vmax, "cosine similarity to the query")
        where = f"pixel (u={query_pixel[0]}, v={query_pixel[1]}), " if query_pixel is not None else ""
        what = f"similarity to point {query_index} ({where}magenta marker)"
    elif mode == "rgb":
        colors, what = d["colors"], f"stored colours ({d.get('color_mode', 'rgb')})"
    else:
        colors, _ = pca_colors(feats)
        what = "PCA of the features (top 3 components as RGB)"
        note = "PCA colours have no units: similar colours = similar features"
    img, _ = render_points(
        pos, colors, width, height, yaw, pitch, background, point_size, marker_index=query_index
    )
    c = np.asarray(feats).shape[1]
    annotation = annotate(
        img,
        png,
        title or f"ua3d feature point cloud: {len(pos)} points, {c} channels; colour = {what}",
        colorbar=bar,
        note=note or f"{d.get('frame', 'camera')} frame; view yaw {yaw:g}, pitch {pitch:g} deg",
    )
    return {
        "path": str(png),
        "points": len(pos),
        "query": query_index,
        "seconds": time.perf_counter() - t0,
        "width": width,
        "height": height,
        "annotation": annotation,
    }


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The viewer's options (shared by ``ua3d view points`` and ``python -m ua3d.viz.feature_points``)."""
    r3d.add_input_options(p, "cloud", "feature point cloud .ply/.npz/.pcd written by ua3d", "cloud")
    q = p.add_mutually_exclusive_group()
    q.add_argument(
        "--query-pixel",
        type=int,
        nargs=2,
        metavar=("U", "V"),
        help="colour by cosine similarity to the point seen at image pixel (u = column, v = row)",
    )
    q.add_argument("--query-index", type=int, metavar="I", help="colour by cosine similarity to point I")
    p.add_argument(
        "--mode", choices=("pca", "rgb"), default="pca", help="colours without a query (default pca)"
    )
    p.add_argument(
        "--vmin", type=float, default=0.0, help="similarity mapped to the low end of the map (default 0)"
    )
    p.add_argument(
        "--vmax", type=float, default=1.0, help="similarity mapped to the high end of the map (default 1)"
    )
    p.add_argument("--yaw", type=float, default=0.0, help="degrees, orbit right of the camera (default 0)")
    p.add_argument("--pitch", type=float, default=0.0, help="degrees, orbit above the camera (default 0)")
    p.add_argument("--point-size", type=float, default=3.0, help="point size in pixels (default 3)")
    return r3d.add_picture_options(p)


def check_args(args: argparse.Namespace) -> None:
    """Validate the options before any work (ValueError naming the option)."""
    if not args.demo and not args.cloud:
        raise ValueError("give a feature point cloud file (.ply/.npz/.pcd) or --demo")
    r3d.check_picture_options(args)
    if not args.vmax > args.vmin:
        raise ValueError(f"--vmax must be larger than --vmin, got {args.vmin} and {args.vmax}")


def run(args: argparse.Namespace) -> int:
    """Run the viewer on parsed options; errors raise (``ValueError``, ``RenderingUnavailable``)."""
    load = lambda a: make_demo_points() if a.demo else read_point_cloud(a.cloud)
    return r3d.run_viewer(args, check_args, load, render_png, PNG_OPTIONS, PNG_LINE, _interactive)


def _interactive(args: argparse.Namespace, data: dict[str, Any]) -> None:
    q = args.query_index
    if args.query_pixel is not None:
        q = pixel_to_index(data.get("pixels"), *args.query_pixel)
    feats = data["features"]
    if q is not None:
        colors = similarity_colors(feats, q, args.vmin, args.vmax)
    elif args.mode == "rgb":
        colors = data["colors"]
    else:
        colors, _ = pca_colors(feats)
    run_interactive(data["positions"], colors, feats, args.point_size)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m ua3d.viz.feature_points``; errors are ``ua3d: error: ...``, exit 2."""
    return r3d.viewer_main("ua3d view points", (__doc__ or "").split("\n\n")[0], add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
