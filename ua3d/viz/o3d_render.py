"""Open3D rendering helpers shared by the viewers (headless pictures and interactive windows).

Headless pictures use the legacy ``open3d.visualization.Visualizer`` with
``create_window(visible=False)``: with no display Open3D falls back to an EGL offscreen context
(Mesa llvmpipe on CPU), no X server needed. It has no transparency, so semi-transparent layers
are rendered one by one, opaque (colour, then alpha as grey), with the depth buffer, and
composited in numpy (:func:`composite_layers`).

On Debian/Ubuntu, ``import open3d`` and the offscreen context need the packages
``libegl1 libgl1 libx11-6 libusb-1.0-0`` (:data:`DEBIAN_PACKAGES`); without them the helpers
raise :class:`RenderingUnavailable` with the install command instead of crashing.

The legacy view control always centres the principal point and only accepts intrinsics of the
window size, so view cameras here have ``cx = (W - 1) / 2``, ``cy = (H - 1) / 2``
(:func:`orbit_camera` makes them).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, final

import numpy as np

from ua3d.rgbd.camera import PinholeCamera, look_at

__all__ = [
    "DEBIAN_PACKAGES",
    "OffscreenRenderer",
    "RenderingUnavailable",
    "composite_layers",
    "fit_view",
    "framed_orbit_camera",
    "import_open3d",
    "orbit_camera",
    "pixel_quads",
    "point_cloud",
    "require_display",
    "save_png",
    "sphere_marker",
]

DEBIAN_PACKAGES = ("libegl1", "libgl1", "libx11-6", "libusb-1.0-0")
_INSTALL_HINT = (
    "Open3D rendering needs the system libraries of the Debian packages "
    + " ".join(DEBIAN_PACKAGES)
    + "; install them with: sudo apt-get install "
    + " ".join(DEBIAN_PACKAGES)
    + " (and the Python package: pip install 'ua3d[cpu]' for open3d-cpu, or 'ua3d[o3d]' for open3d)."
)


class RenderingUnavailable(RuntimeError):
    """Open3D (or its system libraries / offscreen context) is not available."""


def import_open3d() -> Any:
    """Import open3d, turning a missing package or system library into :class:`RenderingUnavailable`."""
    try:
        import open3d as o3d
    except (ImportError, OSError) as e:
        raise RenderingUnavailable(f"cannot import open3d ({e}). {_INSTALL_HINT}") from e
    return o3d


def _quiet_headless(o3d: Any) -> None:
    """Headless runs: give Mesa a private ``XDG_RUNTIME_DIR`` when none is set (it otherwise prints
    ``error: XDG_RUNTIME_DIR is invalid``, which is harmless) and keep Open3D's GLFW/EGL chatter
    (warnings about the missing display) out of the output; errors still print."""
    if not os.environ.get("XDG_RUNTIME_DIR"):
        import tempfile

        os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="ua3d-xdg-")  # created with mode 0700
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)


def require_display() -> None:
    """Raise :class:`RenderingUnavailable` when no display is available for an interactive window.

    Without one, Open3D's interactive visualizers silently fall back to an invisible EGL context
    and ``run()`` never returns, so the viewers check first (Linux: ``DISPLAY`` / ``WAYLAND_DISPLAY``).
    """
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        raise RenderingUnavailable(
            "no display found (DISPLAY / WAYLAND_DISPLAY unset): an interactive window cannot open; "
            "use --png out.png for a headless picture"
        )


# ---------------------------------------------------------------------- geometry builders
def point_cloud(positions: np.ndarray, colors: np.ndarray) -> Any:
    """Legacy ``PointCloud`` from positions ``[N, 3]`` and colours ``[N, 3]`` in [0, 1]."""
    o3d = import_open3d()
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(positions, np.float64)))
    pc.colors = o3d.utility.Vector3dVector(np.clip(np.asarray(colors, np.float64), 0.0, 1.0))
    return pc


def pixel_quads(camera: PinholeCamera, z: Any, colors: np.ndarray, keep: np.ndarray | None = None) -> Any:
    """Mesh of one flat-coloured square per pixel, back-projected at z-depth ``z``.

    Pixel ``(u, v)`` becomes the quad with corners ``(u +- 0.5, v +- 0.5)`` at depth ``z``
    (scalar or ``[H, W]``), in the world frame of ``camera.pose``; ``colors`` is ``[H, W, 3]``.
    Only pixels in ``keep`` (bool ``[H, W]``; default all) are made. Returns None if none is kept.
    """
    import torch

    from ua3d.rgbd.camera import transform_points, unproject

    o3d = import_open3d()
    H, W = camera.height, camera.width
    cols = np.asarray(colors, np.float64)
    if cols.shape != (H, W, 3):
        raise ValueError(f"colors must have shape [H, W, 3] = ({H}, {W}, 3), got {cols.shape}")
    keep = np.ones((H, W), bool) if keep is None else np.asarray(keep, bool)
    if keep.shape != (H, W):
        raise ValueError(f"keep must have shape [H, W] = ({H}, {W}), got {keep.shape}")
    v, u = np.nonzero(keep)
    if len(u) == 0:
        return None
    zz = np.broadcast_to(np.asarray(z, np.float64), (H, W))[v, u]
    du = np.array([-0.5, 0.5, 0.5, -0.5])
    dv = np.array([-0.5, -0.5, 0.5, 0.5])
    corners = unproject(
        torch.from_numpy(u[:, None] + du),
        torch.from_numpy(v[:, None] + dv),
        torch.from_numpy(zz[:, None]),
        camera,
    )  # [N, 4, 3]
    if camera.pose is not None:
        corners = transform_points(corners, camera.pose)
    base = 4 * np.arange(len(u))[:, None]
    tris = np.concatenate([base + [0, 1, 2], base + [0, 2, 3]])
    mesh = o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(corners.reshape(-1, 3).numpy()),
        o3d.utility.Vector3iVector(tris.astype(np.int32)),
    )
    mesh.vertex_colors = o3d.utility.Vector3dVector(np.repeat(np.clip(cols[v, u], 0, 1), 4, axis=0))
    return mesh


def sphere_marker(center: Sequence[float], radius: float, color: Sequence[float] = (1.0, 0.0, 1.0)) -> Any:
    """Small uniformly coloured sphere mesh (e.g. to mark a picked point)."""
    o3d = import_open3d()
    s = o3d.geometry.TriangleMesh.create_sphere(radius=radius, resolution=12)
    s.translate(np.asarray(center, np.float64))
    s.paint_uniform_color(np.asarray(color, np.float64))
    return s


# ---------------------------------------------------------------------- cameras
def orbit_camera(
    center: Sequence[float],
    radius: float,
    width: int,
    height: int,
    yaw_deg: float = 0.0,
    pitch_deg: float = 0.0,
    base_pose: np.ndarray | None = None,
    fov_deg: float = 50.0,
    margin: float = 1.1,
) -> PinholeCamera:
    """View camera orbiting ``center`` so that a sphere of ``radius`` fills the view.

    At yaw = pitch = 0 it looks along the z axis of ``base_pose`` (camera-to-world; identity by
    default, i.e. the camera frame). Positive yaw moves the eye to the right (about the base
    image's down axis), positive pitch moves it up. ``fov_deg`` is the smaller field of view.
    """
    if not (radius > 0 and width > 0 and height > 0 and 0 < fov_deg < 180):
        raise ValueError(
            f"need radius > 0, positive size and 0 < fov < 180; got {radius}, {width}x{height}, {fov_deg}"
        )
    base = np.eye(4) if base_pose is None else np.asarray(base_pose, np.float64)
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    # eye direction in the base camera frame (x right, y down, z forward): start behind the centre
    back = np.array([math.sin(yaw) * math.cos(pitch), -math.sin(pitch), -math.cos(yaw) * math.cos(pitch)])
    half = math.radians(fov_deg) / 2
    dist = margin * radius / math.sin(half)
    c = np.asarray(center, np.float64)
    eye = c + base[:3, :3] @ back * dist
    up = -base[:3, 1]
    pose = look_at(eye, c, up)
    f = (min(width, height) / 2) / math.tan(half)
    return PinholeCamera(f, f, (width - 1) / 2, (height - 1) / 2, width, height, pose)


def fit_view(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre (bounding-box middle) and radius (largest distance to it) of points ``[N, 3]``."""
    p = np.asarray(points, np.float64).reshape(-1, 3)
    if len(p) == 0:
        raise ValueError("fit_view needs at least one point")
    center = (p.min(0) + p.max(0)) / 2
    return center, max(float(np.linalg.norm(p - center, axis=1).max()), 1e-6)


def framed_orbit_camera(
    points: np.ndarray,
    width: int,
    height: int,
    yaw_deg: float = 0.0,
    pitch_deg: float = 0.0,
    base_pose: np.ndarray | None = None,
    fov_deg: float = 50.0,
    fill: float = 0.9,
) -> PinholeCamera:
    """:func:`orbit_camera` around ``points`` ``[N, 3]``, re-aimed and moved so that their
    projection is centred and spans ``fill`` of the image (two refinement passes)."""
    import torch

    from ua3d.rgbd.camera import project, unproject

    p = np.asarray(points, np.float64).reshape(-1, 3)
    center, radius = fit_view(p)
    p = p[:: max(1, len(p) // 20000)]  # framing needs no more points
    cam = orbit_camera(center, radius, width, height, yaw_deg, pitch_deg, base_pose, fov_deg)
    for _ in range(2):
        uv, z = project(torch.from_numpy(p), cam, frame="world")
        uv, z = uv.numpy(), z.numpy()
        ok = z > 1e-9
        if not ok.any():
            break
        lo, hi = uv[ok].min(0), uv[ok].max(0)
        scale = max((hi[0] - lo[0]) / (fill * width), (hi[1] - lo[1]) / (fill * height), 1e-3)
        eye = cam.camera_to_world[:3, 3]
        dist = float(np.linalg.norm(center - eye))
        mid = unproject(
            torch.tensor((lo[0] + hi[0]) / 2),
            torch.tensor((lo[1] + hi[1]) / 2),
            torch.tensor(float(np.median(z[ok]))),
            cam,
        ).numpy()
        center = cam.camera_to_world[:3, :3] @ mid + eye
        depth_c = float(np.median(z[ok]))
        # moving the eye by (scale - 1) * depth along the view axis rescales the median depth
        new_dist = max(dist + (scale - 1.0) * depth_c, 1e-3)
        view_dir = (center - eye) / np.linalg.norm(center - eye)
        cam = PinholeCamera(
            cam.fx,
            cam.fy,
            cam.cx,
            cam.cy,
            width,
            height,
            look_at(center - view_dir * new_dist, center, -cam.camera_to_world[:3, 1]),
        )
    return cam


# ---------------------------------------------------------------------- rendering
@final
class OffscreenRenderer:
    """Hidden legacy Open3D window that renders geometries from a :class:`PinholeCamera`.

    Use as a context manager; :meth:`render` returns colour ``[H, W, 3]`` float32 in [0, 1] and
    depth ``[H, W]`` float32 (view-camera z-depth, 0 where nothing was drawn).
    Lighting is off by default so vertex colours come out unchanged.
    """

    def __init__(
        self,
        width: int = 800,
        height: int = 600,
        background: Sequence[float] = (1.0, 1.0, 1.0),
        point_size: float = 3.0,
        light_on: bool = False,
    ) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive, got {width}x{height}")
        o3d = import_open3d()
        _quiet_headless(o3d)
        self.width, self.height = int(width), int(height)
        self.background = np.asarray(background, np.float64)
        self._vis = o3d.visualization.Visualizer()
        try:
            ok = self._vis.create_window(visible=False, width=self.width, height=self.height)
        except Exception as e:
            raise RenderingUnavailable(
                f"cannot create an offscreen Open3D window ({e}). {_INSTALL_HINT}"
            ) from e
        if not ok:
            raise RenderingUnavailable(f"cannot create an offscreen Open3D window. {_INSTALL_HINT}")
        opt = self._vis.get_render_option()
        opt.background_color = self.background
        opt.point_size = float(point_size)
        opt.light_on = bool(light_on)
        opt.mesh_show_back_face = True

    def __enter__(self) -> OffscreenRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._vis is not None:
            self._vis.destroy_window()
            self._vis = None

    def render(
        self, geometries: Sequence[Any], camera: PinholeCamera, with_depth: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Render ``geometries`` (legacy Open3D geometries) from ``camera`` (pose = camera-to-world).

        Returns colour and depth (None when ``with_depth`` is False).
        """
        if self._vis is None:
            raise RuntimeError("renderer is closed")
        camera.check_image(self.height, self.width, "render window")
        if abs(camera.cx - (self.width - 1) / 2) > 1e-6 or abs(camera.cy - (self.height - 1) / 2) > 1e-6:
            raise ValueError(
                f"view camera principal point ({camera.cx}, {camera.cy}) must be the image centre "
                f"({(self.width - 1) / 2}, {(self.height - 1) / 2}); the legacy view control ignores offsets"
            )
        vis = self._vis
        vis.clear_geometries()
        for g in geometries:
            vis.add_geometry(g, reset_bounding_box=True)
        if not vis.get_view_control().convert_from_pinhole_camera_parameters(
            camera.to_open3d_parameters(), allow_arbitrary=True
        ):
            raise RuntimeError("Open3D rejected the view camera parameters")
        vis.poll_events()
        vis.update_renderer()
        rgb = np.asarray(vis.capture_screen_float_buffer(do_render=True), dtype=np.float32)
        if not with_depth:
            return rgb.copy(), None
        depth = np.asarray(vis.capture_depth_float_buffer(do_render=False), dtype=np.float32)
        return rgb.copy(), depth.copy()


def composite_layers(
    colors: Sequence[np.ndarray], alphas: Sequence[np.ndarray], depths: Sequence[np.ndarray], background: Any
) -> np.ndarray:
    """Depth-sorted "over" compositing of opaque-rendered layers.

    Parameters
    ----------
    colors : L arrays ``[H, W, 3]`` in [0, 1]
    alphas : L arrays ``[H, W]`` in [0, 1] (0 where the layer drew nothing)
    depths : L arrays ``[H, W]`` view z-depth (0 = nothing drawn)
    background : RGB triple or ``[H, W, 3]``

    Returns
    -------
    float32 ``[H, W, 3]``: per pixel, layers painted far to near with ``c = a c_l + (1 - a) c``.
    """
    if not (len(colors) == len(alphas) == len(depths)):
        raise ValueError(
            f"need as many colours, alphas and depths, got {len(colors)}, {len(alphas)}, {len(depths)}"
        )
    if len(colors) == 0:
        raise ValueError("composite_layers needs at least one layer")
    C = np.stack(colors).astype(np.float32, copy=False)  # [L, H, W, 3]
    D = np.stack(depths)  # stacked once (each stack of the demo's 17 layers is ~33 MB)
    drawn = D > 0
    A = np.clip(np.stack(alphas).astype(np.float32, copy=False), 0, 1) * drawn
    Z = np.where(drawn, D, np.inf)
    del D
    if C.shape[:3] != A.shape or C.shape[-1] != 3:
        raise ValueError(f"layer shapes differ: colours {C.shape}, alphas {A.shape}")
    L, H, W = A.shape
    out = np.broadcast_to(np.asarray(background, np.float32), (H, W, 3)).reshape(-1, 3).copy()
    count = (A > 0).reshape(L, -1).sum(0)
    pix = np.flatnonzero(count)  # only pixels some layer covers
    if len(pix) == 0:
        return out.reshape(H, W, 3)
    # far first; uncovered layers (inf) sort first and only the last max(count) ranks can be covered
    order = np.argsort(-Z.reshape(L, -1)[:, pix], axis=0, kind="stable")[L - int(count.max()) :]
    flat = order * (H * W) + pix  # index into the [L * H * W] layer stack
    C, A = C.reshape(-1, 3), A.reshape(-1)
    acc = out[pix]
    for idx in flat:
        acc += A[idx][:, None] * (C[idx] - acc)
    out[pix] = acc
    return out.reshape(H, W, 3)


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write float RGB ``[H, W, 3]`` in [0, 1] as an 8-bit PNG."""
    from ua3d.io.rgbd import write_color

    return write_color(path, np.clip(rgb, 0.0, 1.0))


def add_input_options(p: argparse.ArgumentParser, name: str, help: str, kind: str) -> None:
    """A viewer's input: the positional file ``name`` (``help``), ``--demo`` (a synthetic ``kind``) and ``--png``."""
    p.add_argument(name, nargs="?", help=help)
    p.add_argument("--demo", action="store_true", help=f"use a synthetic demo {kind} instead of a file")
    p.add_argument("--png", help="render headless to this PNG instead of opening a window")


def add_picture_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every viewer shares: ``--width``, ``--height``, ``--background`` and ``--quiet``
    (unless the parser has it already); checked by :func:`check_picture_options`."""
    p.add_argument("--width", type=int, default=800, help="picture width in pixels (default 800)")
    p.add_argument("--height", type=int, default=600, help="picture height in pixels (default 600)")
    p.add_argument("--background", type=float, nargs=3, default=(1.0, 1.0, 1.0), help="RGB in [0, 1]")
    if not any("--quiet" in a.option_strings for a in p._actions):
        p.add_argument("--quiet", action="store_true", help="no 'wrote ...' line")
    return p


def check_picture_options(args: argparse.Namespace) -> None:
    """``--width``/``--height`` of at least 16 pixels and a ``--png`` that names a ``.png`` file."""
    if args.width < 16 or args.height < 16:
        raise ValueError(f"--width/--height must be >= 16, got {args.width}x{args.height}")
    if args.png and Path(args.png).suffix.lower() != ".png":
        raise ValueError(f"--png must name a .png file, got {args.png!r}")


def run_viewer(
    args: argparse.Namespace,
    check: Callable[[argparse.Namespace], None],
    load: Callable[[argparse.Namespace], Any],
    render_png: Callable[..., dict[str, Any]],
    png_options: Sequence[str],
    png_line: str,
    interactive: Callable[[argparse.Namespace, Any], None],
) -> int:
    """A viewer's ``run``: ``check(args)``, ``data = load(args)``, then either the headless picture
    (``--png``: ``render_png(data, args.png, **options)`` with each of ``png_options``, ``"name"`` or
    ``"keyword=name"``, taken from ``args``, and one ``wrote PNG (png_line, seconds)`` line unless
    ``--quiet``; ``png_line`` is formatted with the returned info) or ``interactive(args, data)``."""
    check(args)
    data = load(args)
    if not args.png:
        interactive(args, data)
        return 0
    kw = {}
    for opt in png_options:
        key, _, name = opt.partition("=")
        kw[key] = getattr(args, name or key)
    info = render_png(data, args.png, **kw)
    if not getattr(args, "quiet", False):
        print(f"wrote {args.png} ({png_line.format(**info)}, {info['seconds']:.2f} s)")
    return 0


def viewer_main(
    prog: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
) -> int:
    """Stand-alone entry point of a viewer module (``python -m ua3d.viz.<viewer>``): parse, run, and
    print a bad input or a missing renderer as one ``ua3d: error: ...`` line with exit code 2."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    args = add_arguments(p).parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, RenderingUnavailable) as e:
        print(f"ua3d: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
