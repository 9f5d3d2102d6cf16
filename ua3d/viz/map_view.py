"""Pictures and an interactive window of a fused :class:`~ua3d.rgbd.fusion.FeatureMap`.

Two colourings: the PCA of the features (first three components to RGB) and, given a query (a
voxel index, or the voxel nearest to a world point), the cosine similarity of every voxel to the
query's feature as a heat map (``turbo``, -1..1 fixed scale or the data's range) with a colour
scale drawn beside the picture.

Headless pictures go through :class:`ua3d.viz.o3d_render.OffscreenRenderer` (the legacy Open3D
visualizer with ``create_window(visible=False)``; no X server needed). The interactive window
needs a display (:func:`ua3d.viz.o3d_render.require_display`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ua3d.rgbd.fusion import FeatureMap
from ua3d.viz.colormaps import apply_cmap
from ua3d.viz.o3d_render import (
    OffscreenRenderer,
    framed_orbit_camera,
    import_open3d,
    point_cloud,
    require_display,
    save_png,
    sphere_marker,
)

__all__ = ["add_arguments", "color_scale", "map_colors", "render_map", "resolve_query", "run", "show_map"]


def resolve_query(m: FeatureMap, query_index: int | None = None, query_point: Any = None) -> int | None:
    """Voxel index of the query (``query_index``, or the voxel nearest to ``query_point``), or None."""
    if query_index is not None and query_point is not None:
        raise ValueError("give --query-index or --query-point, not both")
    if query_index is not None:
        if not 0 <= int(query_index) < len(m):
            raise ValueError(f"query index {query_index} out of range for a map of {len(m)} voxels")
        return int(query_index)
    if query_point is not None:
        return m.nearest(query_point)
    return None


def map_colors(m: FeatureMap, query: int | None = None, vrange: tuple[float, float] | None = (-1.0, 1.0)):
    """Per-voxel colours ``[N, 3]``: PCA colours, or the similarity heat map to voxel ``query``.

    Returns ``(colors, similarity or None, (vmin, vmax) or None)``.
    """
    if len(m) == 0:
        raise ValueError("the map is empty: nothing to show")
    if query is None:
        return m.pca_colors(), None, None
    sim = m.query(m.features[query]).cpu().numpy()
    lo, hi = vrange if vrange is not None else (float(sim.min()), float(sim.max()))
    return apply_cmap(sim, lo, hi, "turbo"), sim, (lo, hi)


def color_scale(height: int, vmin: float, vmax: float, width: int = 90, label: str = "cosine") -> np.ndarray:
    """A vertical colour bar ``[height, width, 3]`` in [0, 1] (white background, ticks and labels)."""
    import cv2

    img = np.ones((height, width, 3), np.float32)
    top, bottom, x0, x1 = 30, height - 20, 8, 28
    t = np.linspace(1.0, 0.0, bottom - top)
    img[top:bottom, x0:x1] = apply_cmap(vmin + t * (vmax - vmin), vmin, vmax, "turbo")[:, None, :]
    u8 = (img * 255).astype(np.uint8)
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = round(bottom - 1 - frac * (bottom - top - 1))
        cv2.line(u8, (x1, y), (x1 + 4, y), (0, 0, 0), 1)
        cv2.putText(
            u8,
            f"{vmin + frac * (vmax - vmin):+.2f}",
            (x1 + 6, y + 4),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.38,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
    cv2.putText(u8, label, (4, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return u8.astype(np.float32) / 255


def _geometries(m: FeatureMap, colors: np.ndarray, query: int | None) -> list:
    pos = m.positions.cpu().numpy()
    geoms = [point_cloud(pos, colors)]
    if query is not None:
        geoms.append(sphere_marker(pos[query], radius=2.5 * m.voxel_size))
    return geoms


def render_map(
    m: FeatureMap | str | Path,
    png: str | Path,
    query_index: int | None = None,
    query_point: Any = None,
    width: int = 800,
    height: int = 600,
    yaw_deg: float = 0.0,
    pitch_deg: float = 20.0,
    point_size: float = 3.0,
) -> Path:
    """Headless picture of the map (PCA colours, or the similarity heat map plus its colour scale)."""
    fm = FeatureMap.load(m) if isinstance(m, (str, Path)) else m
    q = resolve_query(fm, query_index, query_point)
    colors, _, vr = map_colors(fm, q)
    pos = fm.positions.cpu().numpy()
    # look from the first fused camera (the map's world frame has no known "up")
    base = fm.poses[0] if fm.poses else _base_pose(pos)
    cam = framed_orbit_camera(pos, width, height, yaw_deg, pitch_deg, base_pose=base)
    with OffscreenRenderer(width, height, point_size=point_size) as r:
        img, _ = r.render(_geometries(fm, colors, q), cam, with_depth=False)
    if vr is not None:
        img = np.concatenate([img, color_scale(height, *vr)], axis=1)
    return save_png(png, img)


def _base_pose(pos: np.ndarray) -> np.ndarray:
    """A base view along the points' direction of least spread (for maps without poses)."""
    c = pos[:: max(1, len(pos) // 20000)] - pos.mean(0)
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    z = vt[2] if len(vt) == 3 else np.array([0.0, 0.0, 1.0])
    y = vt[1] if len(vt) >= 2 else np.array([0.0, 1.0, 0.0])
    x = np.cross(y, z)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2] = x, y, z
    return pose


def show_map(m: FeatureMap | str | Path, query_index: int | None = None, query_point: Any = None) -> None:
    """Open an interactive Open3D window (needs a display)."""
    require_display()
    o3d = import_open3d()
    fm = FeatureMap.load(m) if isinstance(m, (str, Path)) else m
    q = resolve_query(fm, query_index, query_point)
    colors, _, vr = map_colors(fm, q)
    title = (
        "ua3d map: PCA colours"
        if q is None
        else f"ua3d map: cosine similarity to voxel {q} ({vr[0]:g}..{vr[1]:g})"
    )
    o3d.visualization.draw_geometries(_geometries(fm, colors, q), window_name=title)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``ua3d view map``."""
    p.add_argument("map", help="fused feature map .npz written by `ua3d fuse`")
    p.add_argument("--png", help="render headless to this PNG instead of opening a window")
    q = p.add_mutually_exclusive_group()
    q.add_argument(
        "--query-index", type=int, default=None, metavar="I", help="colour by cosine similarity to voxel I"
    )
    q.add_argument(
        "--query-point",
        type=float,
        nargs=3,
        default=None,
        metavar=("X", "Y", "Z"),
        help="colour by cosine similarity to the voxel nearest to this world point (metres)",
    )
    p.add_argument("--width", type=int, default=800, help="picture width in pixels (default 800)")
    p.add_argument("--height", type=int, default=600, help="picture height in pixels (default 600)")
    p.add_argument(
        "--yaw", type=float, default=0.0, help="view yaw from the first camera, degrees (default 0)"
    )
    p.add_argument("--pitch", type=float, default=10.0, help="view pitch, degrees (default 10)")
    p.add_argument("--point-size", type=float, default=3.0, help="point size in pixels (default 3)")
    return p


def run(args: argparse.Namespace) -> int:
    """``ua3d view map``: a headless picture with ``--png``, else an interactive window."""
    if args.width < 16 or args.height < 16:
        raise ValueError(f"--width/--height must be >= 16, got {args.width}x{args.height}")
    if args.png and Path(args.png).suffix.lower() != ".png":
        raise ValueError(f"--png must name a .png file, got {args.png!r}")
    if args.png:
        path = render_map(
            args.map,
            args.png,
            args.query_index,
            args.query_point,
            args.width,
            args.height,
            args.yaw,
            args.pitch,
            args.point_size,
        )
        if not getattr(args, "quiet", False):
            print(f"wrote {path}")
        return 0
    show_map(args.map, args.query_index, args.query_point)
    return 0
