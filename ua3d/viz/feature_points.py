#!/usr/bin/env python
"""View a feature point cloud (Open3D): PCA colours, RGB, or cosine similarity to a picked point.

Input: a ``.npz`` written by :func:`ua3d.io.rgbd.save_feature_points` (``positions [N, 3]``,
``colors [N, 3]``, ``features [N, C]``).

Usage::

    python viewers/feature_points.py cloud.npz                           # pick points interactively
    python viewers/feature_points.py cloud.npz --png out.png             # PCA colours, headless
    python viewers/feature_points.py cloud.npz --png out.png --query-index 123   # similarity, headless
    python viewers/feature_points.py --demo --png out.png                # synthetic demo cloud

Interactive: the cloud opens in Open3D's editing window; Shift + left click picks a point, then
close the window (Q): every point is recoloured by the cosine similarity of its feature to the
picked one (``cmap`` over ``[vmin, vmax]``, default turbo over [0, 1]) and the window reopens for
the next pick. Close without picking to quit. ``--mode rgb`` starts with the stored colours.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ua3d.io.rgbd import load_feature_points
from ua3d.viz import o3d_render as r3d
from ua3d.viz.colormaps import apply_cmap
from ua3d.viz.pca import PCABasis

__all__ = [
    "cosine_similarity_to",
    "main",
    "make_demo_points",
    "pca_colors",
    "render_points",
    "similarity_colors",
]

MARKER_COLOR = (1.0, 0.0, 1.0)  # magenta: not in the turbo map


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
    return {"positions": pts.numpy(), "colors": rgb, "features": feats}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("cloud", nargs="?", help=".npz written by ua3d.io.rgbd.save_feature_points")
    p.add_argument("--demo", action="store_true", help="use a synthetic demo cloud instead of a file")
    p.add_argument("--png", help="render headless to this PNG instead of opening a window")
    p.add_argument("--query-index", type=int, help="colour by cosine similarity to this point")
    p.add_argument("--mode", choices=("pca", "rgb"), default="pca", help="colours without a query")
    p.add_argument("--vmin", type=float, default=0.0, help="similarity mapped to the low end of the map")
    p.add_argument("--vmax", type=float, default=1.0, help="similarity mapped to the high end of the map")
    p.add_argument("--width", type=int, default=800)
    p.add_argument("--height", type=int, default=600)
    p.add_argument("--yaw", type=float, default=0.0)
    p.add_argument("--pitch", type=float, default=0.0)
    p.add_argument("--point-size", type=float, default=3.0)
    p.add_argument("--background", type=float, nargs=3, default=(1.0, 1.0, 1.0))
    args = p.parse_args(argv)
    if not args.demo and not args.cloud:
        p.error("give a feature point cloud .npz or --demo")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    data = make_demo_points() if args.demo else load_feature_points(args.cloud)
    pos, feats = data["positions"], data["features"]
    if args.query_index is not None:
        colors = similarity_colors(feats, args.query_index, args.vmin, args.vmax)
    elif args.mode == "rgb":
        colors = data["colors"]
    else:
        colors, _ = pca_colors(feats)
    try:
        if args.png:
            t0 = time.perf_counter()
            img, _ = render_points(
                pos,
                colors,
                args.width,
                args.height,
                args.yaw,
                args.pitch,
                args.background,
                args.point_size,
                marker_index=args.query_index,
            )
            r3d.save_png(args.png, img)
            print(
                f"wrote {args.png} ({args.width}x{args.height}, {len(pos)} points, "
                f"{time.perf_counter() - t0:.2f} s)"
            )
        else:
            run_interactive(pos, colors, feats, args.point_size)
    except r3d.RenderingUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
