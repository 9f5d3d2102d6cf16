"""View a lifted feature volume as depth slices in 3D (Open3D).

Input: a ``.npz`` written by :func:`ua3d.io.rgbd.save_volume` (``volume [C, D, H, W]``,
``mass [D, H, W]``, ``bin_depths [D]`` metres, intrinsics of the volume grid, optional pose and
guide RGB-D frame). Slice ``d`` is the ``W x H`` grid back-projected with the volume camera at
depth ``bin_depths[d]`` (one flat square per voxel), coloured by one PCA of all voxel features
(shared by every slice) and faded by its weight mass (``alpha = alpha_max * min(mass / m99, 1)``,
``m99`` the 99th percentile of the positive mass; voxels below ``min_alpha`` are not drawn).

Usage::

    ua3d view volume volume.npz                  # interactive window
    ua3d view volume volume.npz --png out.png    # headless picture (slice depths labelled)
    ua3d view volume --demo --png out.png        # synthetic demo volume

(``python -m ua3d.viz.volume_slices`` and ``python viewers/volume_slices.py`` take the same options.)

Keys in the window: N / P next / previous slice, A all slices / one slice, R toggle the RGB-D
point cloud, Q quit. The window has no transparency, so there each slice is blended with the
background by its alpha; ``--png`` composites true semi-transparent slices (each slice rendered
opaque, colour then alpha, and alpha-composited far to near in numpy).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ua3d.io.rgbd import check_volume, load_volume
from ua3d.rgbd.camera import PinholeCamera, backproject, project, transform_points, unproject
from ua3d.viz import o3d_render as r3d
from ua3d.viz.pca import PCABasis

__all__ = [
    "SliceLayer",
    "add_arguments",
    "auto_stride",
    "downsample_volume",
    "main",
    "make_demo_volume",
    "render_png",
    "render_volume",
    "rgbd_cloud",
    "run",
    "slice_layers",
    "volume_features",
]

#: the ``render_png`` keywords taken from the options (``keyword=option`` where they differ), and its
#: ``wrote`` line
PNG_OPTIONS = ("slices=slice", "show_rgbd", "stride", "width", "height", "yaw", "pitch", "alpha_max")
PNG_OPTIONS += ("min_alpha", "background")
PNG_LINE = "{width}x{height}, {slices} slices, stride {stride}"


class SliceLayer:
    """One depth slice: ``colors [H, W, 3]``, ``alpha [H, W]``, ``depth`` (metres), ``index``."""

    def __init__(self, index: int, depth: float, colors: np.ndarray, alpha: np.ndarray) -> None:
        self.index, self.depth, self.colors, self.alpha = index, depth, colors, alpha

    def mesh(
        self, camera: PinholeCamera, min_alpha: float, alpha_pass: bool = False, background: Any = None
    ) -> Any:
        """Quads of the voxels with alpha >= ``min_alpha`` coloured by colour, alpha (grey) or the
        colour blended over ``background`` (for the interactive window)."""
        keep = self.alpha >= min_alpha
        if alpha_pass:
            cols = np.repeat(self.alpha[..., None], 3, axis=2)
        elif background is not None:
            a = self.alpha[..., None]
            cols = a * self.colors + (1 - a) * np.asarray(background, np.float64)
        else:
            cols = self.colors
        return r3d.pixel_quads(camera, self.depth, cols, keep)

    def alpha_vertex_colors(self, min_alpha: float) -> np.ndarray:
        """Vertex colours ``[4 N, 3]`` (grey = alpha) matching the vertices of :meth:`mesh`."""
        a = self.alpha[self.alpha >= min_alpha].astype(np.float64)
        return np.repeat(np.repeat(a, 4)[:, None], 3, axis=1)


def volume_features(volume: np.ndarray, mass: np.ndarray, normalized: bool = True) -> np.ndarray:
    """Per-voxel features ``[C, D, H, W]``: the volume itself, or ``volume / mass`` (0 where mass is 0)."""
    if normalized:
        return volume
    return np.where(mass[None] > 0, volume / np.where(mass[None] > 0, mass[None], 1.0), 0.0).astype(
        np.float32
    )


def auto_stride(height: int, width: int, max_voxels: int = 20_000) -> int:
    """Smallest integer stride that leaves at most ``max_voxels`` voxels per slice."""
    return max(1, math.ceil(math.sqrt(height * width / max_voxels)))


def downsample_volume(
    volume: np.ndarray,
    mass: np.ndarray,
    camera: PinholeCamera,
    stride: int,
    normalized: bool = True,
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray, PinholeCamera]:
    """Pool ``stride x stride`` voxel blocks (for display) and return the matching camera.

    The grid is cropped to a multiple of ``stride`` (bottom/right), ``mass`` is block-averaged and
    features are mass-weighted block means (block means of the weighted sums when not
    ``normalized``), so ``volume / mass`` is preserved. The camera follows the half-pixel rule.

    ``backend``: ``"fast"`` (one fused numba pass, :mod:`ua3d.viz.fast_pool`), ``"reference"`` (torch,
    channel by channel) or ``"auto"`` (fast for numpy float16/float32 input when numba imports).

    Returns
    -------
    volume ``[C, D, H // s, W // s]``, mass ``[D, H // s, W // s]``, camera
    """
    from ua3d.viz import fast_pool

    if backend not in ("auto", "fast", "reference"):
        raise ValueError(f"backend must be 'auto', 'fast' or 'reference', got {backend!r}")
    if stride < 1 or int(stride) != stride:
        raise ValueError(f"stride must be a positive integer, got {stride}")
    if stride == 1:
        return volume, mass, camera
    s = int(stride)
    C, D, H, W = volume.shape
    h, w = H // s, W // s
    if h == 0 or w == 0:
        raise ValueError(f"stride {s} is larger than the volume grid {H}x{W}")
    cropped = PinholeCamera(camera.fx, camera.fy, camera.cx, camera.cy, w * s, h * s, camera.pose)
    numpy_in = isinstance(volume, np.ndarray) and volume.dtype in (np.float16, np.float32)
    if backend == "fast" and not (fast_pool.AVAILABLE and numpy_in):
        raise ValueError("backend 'fast' needs numba and a numpy float16/float32 volume")
    if backend == "fast" or (backend == "auto" and fast_pool.AVAILABLE and numpy_in):
        v, m = fast_pool.pool_volume(volume, np.asarray(_tensor(mass).float()), s, normalized)
        return v, m, cropped.scaled(1.0 / s)
    pool = lambda x: torch.nn.functional.avg_pool2d(x, s, divisor_override=1)  # block sums (floor: crop)
    m = _tensor(mass).float()
    m_sum = pool(m)
    inv = 1.0 / torch.where(m_sum > 0, m_sum, 1.0) if normalized else torch.tensor(1.0 / (s * s))
    out = torch.empty((C, D, h, w), dtype=torch.float32)
    for c in range(C):  # one channel at a time: no float32 copy of a whole (float16) volume
        v = _tensor(volume[c]).float()
        out[c] = pool(v * m if normalized else v) * inv
    return out.numpy(), (m_sum / (s * s)).numpy(), cropped.scaled(1.0 / s)


def _tensor(a: Any) -> torch.Tensor:
    """A CPU tensor sharing ``a``'s memory (a copy only for read-only or non-contiguous arrays)."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu()
    a = np.asarray(a)
    return torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous else np.array(a))


def slice_layers(
    volume: Any,
    mass: Any,
    bin_depths: Any,
    camera: PinholeCamera,
    normalized: bool = True,
    pca: PCABasis | None = None,
    alpha_max: float = 0.85,
    seed: int = 0,
) -> tuple[list[SliceLayer], PCABasis]:
    """PCA colours and mass-based alpha of every slice; the basis is fitted on voxels with mass.

    Parameters
    ----------
    volume : ``[C, D, H, W]``; mass : ``[D, H, W]``; bin_depths : ``[D]`` metres
    camera : intrinsics (and pose) of the ``W x H`` volume grid
    normalized : whether ``volume`` already holds mass-normalised features
    pca : basis to reuse (e.g. the one of another method), default fitted here

    Returns
    -------
    layers : D :class:`SliceLayer`, near to far; basis : the :class:`PCABasis` used
    """
    if mass is None:
        raise ValueError("mass is required: a feature volume needs its weight mass [D, H, W]")
    vol = np.asarray(volume.detach().cpu() if isinstance(volume, torch.Tensor) else volume, np.float32)
    m = np.asarray(mass.detach().cpu() if isinstance(mass, torch.Tensor) else mass, np.float32)
    bins = np.asarray(bin_depths, np.float64)
    check_volume(vol, m, bins, camera)
    if not 0 < alpha_max <= 1:
        raise ValueError(f"alpha_max must be in (0, 1], got {alpha_max}")
    positive = m > 0
    if not positive.any():
        raise ValueError("mass is zero everywhere: nothing to show")
    feats = torch.from_numpy(volume_features(vol, m, normalized))
    basis = pca or PCABasis.fit(feats, seed=seed, mask=torch.from_numpy(positive))
    colors = basis.transform(feats).numpy()  # [D, H, W, 3]
    m_ref = float(np.percentile(m[positive], 99))
    alpha = alpha_max * np.clip(m / max(m_ref, 1e-30), 0.0, 1.0)
    return [SliceLayer(d, float(bins[d]), colors[d], alpha[d]) for d in range(len(bins))], basis


def rgbd_cloud(rgb: np.ndarray, depth: np.ndarray, camera: PinholeCamera, stride: int = 1) -> Any:
    """Coloured world-frame point cloud of the guide frame (camera = volume camera resized)."""
    cam = camera.resized(depth.shape[1], depth.shape[0])
    d = np.array(depth, np.float32)
    if stride > 1:
        sub = np.zeros_like(d, bool)
        sub[::stride, ::stride] = True
        d[~sub] = 0
    pts, pix = backproject(torch.from_numpy(d), cam, frame="world")
    cols = np.asarray(rgb)[pix[:, 0].numpy(), pix[:, 1].numpy()].astype(np.float64) / 255.0
    return r3d.point_cloud(pts.numpy(), cols)


def _layer_points(layers: Sequence[SliceLayer], camera: PinholeCamera, min_alpha: float) -> np.ndarray:
    pts = []
    for L in layers:
        v, u = np.nonzero(L.alpha >= min_alpha)
        if len(u):
            p = unproject(torch.from_numpy(u), torch.from_numpy(v), torch.full((len(u),), L.depth), camera)
            pts.append(transform_points(p, camera.pose).numpy() if camera.pose is not None else p.numpy())
    if not pts:
        raise ValueError(f"no voxel has alpha >= min_alpha={min_alpha}")
    return np.concatenate(pts)


def render_volume(
    layers: Sequence[SliceLayer],
    camera: PinholeCamera,
    cloud: Any | None = None,
    width: int = 800,
    height: int = 600,
    yaw: float = 35.0,
    pitch: float = 20.0,
    background: Sequence[float] = (1.0, 1.0, 1.0),
    min_alpha: float = 0.02,
    point_size: float = 2.0,
    view: PinholeCamera | None = None,
) -> tuple[np.ndarray, PinholeCamera]:
    """Headless picture of semi-transparent slices (and an opaque RGB-D cloud).

    The view orbits the slices' bounding box, starting from the volume camera's direction
    (``yaw`` / ``pitch`` in degrees), unless ``view`` is given.

    Returns
    -------
    image : float32 ``[height, width, 3]`` in [0, 1]; view : the view camera (project with it to
    find where things landed).
    """
    if not layers:
        raise ValueError("layers is empty")
    if view is None:
        view = r3d.framed_orbit_camera(
            _layer_points(layers, camera, min_alpha), width, height, yaw, pitch, base_pose=camera.pose
        )
    o3d = r3d.import_open3d()
    colors, alphas, depths = [], [], []
    with r3d.OffscreenRenderer(width, height, background, point_size=point_size) as ren:
        if cloud is not None:
            c, z = ren.render([cloud], view)
            colors.append(c), alphas.append((z > 0).astype(np.float32)), depths.append(z)
        for L in layers:
            mesh = L.mesh(camera, min_alpha)
            if mesh is None:
                continue
            c, z = ren.render([mesh], view)
            mesh.vertex_colors = o3d.utility.Vector3dVector(L.alpha_vertex_colors(min_alpha))
            a, _ = ren.render([mesh], view, with_depth=False)  # same quads, alpha as grey
            colors.append(c), alphas.append(a[..., 0]), depths.append(z)
    if not colors:
        return np.broadcast_to(np.asarray(background, np.float32), (height, width, 3)).copy(), view
    return r3d.composite_layers(colors, alphas, depths, background), view


def run_interactive(
    layers: Sequence[SliceLayer],
    camera: PinholeCamera,
    cloud: Any | None,
    width: int = 1024,
    height: int = 768,
    background: Sequence[float] = (1.0, 1.0, 1.0),
    min_alpha: float = 0.02,
) -> None:
    """Open a window; N/P step through slices, A toggles all slices, R the RGB-D cloud, Q quits."""
    r3d.require_display()
    o3d = r3d.import_open3d()
    meshes = [L.mesh(camera, min_alpha, background=background) for L in layers]
    state = {"k": 0, "all": True, "rgbd": cloud is not None, "first": True}

    def refresh(vis: Any) -> bool:
        vis.clear_geometries()
        shown = range(len(layers)) if state["all"] else [state["k"]]
        geoms = [meshes[i] for i in shown if meshes[i] is not None]
        if state["rgbd"] and cloud is not None:
            geoms.append(cloud)
        for g in geoms:
            vis.add_geometry(g, reset_bounding_box=state["first"])
        state["first"] = False
        what = "all slices" if state["all"] else f"slice {state['k']} at {layers[state['k']].depth:.3f} m"
        print(f"showing {what}; RGB-D cloud {'on' if state['rgbd'] else 'off'}", flush=True)
        return True

    def step(delta: int) -> Any:
        def cb(vis: Any) -> bool:
            state["all"] = False
            state["k"] = (state["k"] + delta) % len(layers)
            return refresh(vis)

        return cb

    def toggle(key: str) -> Any:
        def cb(vis: Any) -> bool:
            state[key] = not state[key]
            return refresh(vis)

        return cb

    vis = o3d.visualization.VisualizerWithKeyCallback()
    if not vis.create_window("ua3d volume slices", width, height):
        raise r3d.RenderingUnavailable("cannot open a window (no display?); use --png for a headless picture")
    opt = vis.get_render_option()
    opt.background_color, opt.light_on, opt.mesh_show_back_face = np.asarray(background, float), False, True
    for key, cb in (
        (ord("N"), step(1)),
        (ord("P"), step(-1)),
        (ord("A"), toggle("all")),
        (ord("R"), toggle("rgbd")),
    ):
        vis.register_key_callback(key, cb)
    print(__doc__.split("Keys in the window:")[1].split(".")[0].strip(), flush=True)
    refresh(vis)
    vis.run()
    vis.destroy_window()


def make_demo_volume(
    seed: int = 0, width: int = 160, height: int = 120, bins: int = 12, noise: float = 0.05
) -> dict[str, Any]:
    """A small feature volume from a synthetic scene (for trying the viewer without a model).

    Features are per-pixel ``[rgb, one-hot object id (8)]`` on a ``width x height`` grid; each pixel's
    feature goes to the two depth bins around its depth (linear weights), so ``mass`` is the
    splatting weight and the volume holds mass-normalised features.
    """
    from ua3d.rgbd.synthetic import make_scene

    scene = make_scene(seed, width, height, n_objects=4)
    cam, depth = scene["camera"], scene["depth_gt"]
    rng = np.random.default_rng(seed)
    onehot = np.eye(8, dtype=np.float32)[np.clip(scene["ids"], 0, 7)]
    feats = np.concatenate([scene["rgb"], onehot], axis=2).transpose(2, 0, 1)  # [C, H, W]
    feats = feats + noise * rng.standard_normal(feats.shape).astype(np.float32)
    valid = depth > 0
    edges = np.quantile(depth[valid], [0.01, 0.99])
    bin_depths = np.linspace(edges[0], edges[1], bins)
    pos = np.clip(np.interp(depth, bin_depths, np.arange(bins)), 0, bins - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, bins - 1)
    w_hi = (pos - lo) * valid
    w_lo = (1 - (pos - lo)) * valid
    mass = np.zeros((bins, height, width), np.float32)
    vol = np.zeros((feats.shape[0], bins, height, width), np.float32)
    v, u = np.mgrid[0:height, 0:width]
    for idx, w in ((lo, w_lo), (hi, w_hi)):
        np.add.at(mass, (idx, v, u), w)
        for c in range(feats.shape[0]):
            np.add.at(vol[c], (idx, v, u), w * feats[c])
    vol = np.where(mass[None] > 0, vol / np.where(mass[None] > 0, mass[None], 1), 0).astype(np.float32)
    rgb8 = np.round(scene["rgb"] * 255).astype(np.uint8)
    return {
        "volume": vol,
        "mass": mass,
        "bin_depths": bin_depths,
        "camera": cam,
        "normalized": True,
        "rgb": rgb8,
        "depth": depth,
    }


def _slice_label_points(layers: Sequence[SliceLayer], camera: PinholeCamera, min_alpha: float) -> list:
    """A 3D anchor per slice (its top-left drawn voxel), world frame, for the depth labels."""
    out = []
    for L in layers:
        v, u = np.nonzero(L.alpha >= min_alpha)
        if len(u) == 0:
            out.append(None)
            continue
        k = int(np.argmin(v * 10_000 + u))
        p = unproject(torch.tensor([int(u[k])]), torch.tensor([int(v[k])]), torch.tensor([L.depth]), camera)
        out.append(transform_points(p, camera.pose) if camera.pose is not None else p)
    return out


def render_png(
    data: Any,
    png: Any,
    *,
    slices: Sequence[int] | None = None,
    show_rgbd: bool = False,
    stride: int = 0,
    width: int = 800,
    height: int = 600,
    yaw: float = 35.0,
    pitch: float = 20.0,
    alpha_max: float = 0.85,
    min_alpha: float = 0.02,
    background: Sequence[float] = (1.0, 1.0, 1.0),
    max_labels: int = 8,
    annotate: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Write a headless picture of a feature volume to ``png``, with a title and the depth of (up to
    ``max_labels``) slices written beside them. ``data``: a ``.npz`` path, or the dict of
    :func:`load_volume` / :func:`ua3d.io.rgbd.volume_record` (arrays in memory, e.g. a float16 volume
    just rendered: drawn without a file).

    ``annotate`` draws the title and labels and writes the file (default
    :func:`ua3d.viz.figures.annotated_render`, same arguments); the demo passes one that queues the
    drawing on its figures thread.

    Returns ``{"path", "slices", "stride", "seconds", "rgbd", "width", "height", "annotation"}``
    (``annotation``: what ``annotate`` returned).
    """
    from ua3d.viz.figures import annotated_render

    annotate = annotate or annotated_render
    t0 = time.perf_counter()
    d = load_volume(data) if not isinstance(data, dict) else data
    full_cam = d["camera"]
    s = stride or auto_stride(full_cam.height, full_cam.width)
    volume, mass, cam = downsample_volume(d["volume"], d["mass"], full_cam, s, d["normalized"])
    layers, _ = slice_layers(volume, mass, d["bin_depths"], cam, d["normalized"], alpha_max=alpha_max)
    if slices:
        bad = [k for k in slices if not 0 <= k < len(layers)]
        if bad:
            raise ValueError(f"--slice indices {bad} out of range 0..{len(layers) - 1}")
        layers = [layers[k] for k in slices]
    cloud = None
    if show_rgbd:
        if d.get("rgb") is None or d.get("depth") is None:
            raise ValueError(
                "--show-rgbd: the volume file stores no rgb/depth (write it with ua3d lift or ua3d demo)"
            )
        cloud = rgbd_cloud(d["rgb"], d["depth"], full_cam)
    img, view = render_volume(layers, cam, cloud, width, height, yaw, pitch, background, min_alpha)
    labels = []
    anchors = _slice_label_points(layers, cam, min_alpha)
    step = max(1, math.ceil(len(layers) / max_labels))
    for i in list(range(0, len(layers), step)) + ([len(layers) - 1] if (len(layers) - 1) % step else []):
        if anchors[i] is None:
            continue
        uv, z = project(anchors[i].to(torch.float64), view, frame="world")
        x, y = (float(t) for t in uv[0])
        if float(z[0]) > 0 and 0 <= x < width and 0 <= y < height:
            labels.append((x, y, f"z = {layers[i].depth:.2f} m"))
    D, C = len(layers), d["volume"].shape[0]
    H, W = full_cam.height, full_cam.width
    annotation = annotate(
        img,
        png,
        title=f"ua3d feature volume: {D} depth slices {layers[0].depth:.2f}-{layers[-1].depth:.2f} m, "
        f"{C} channels, {W}x{H} (shown at stride {s})",
        labels=labels,
        note="colour = PCA of the voxel features (no units); opacity = weight mass at that depth; "
        f"view {yaw:g} deg right, {pitch:g} deg above the camera",
    )
    return {
        "path": str(png),
        "slices": D,
        "stride": s,
        "seconds": time.perf_counter() - t0,
        "rgbd": cloud is not None,
        "width": width,
        "height": height,
        "annotation": annotation,
    }


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The viewer's options (shared by ``ua3d view volume`` and ``python -m ua3d.viz.volume_slices``)."""
    r3d.add_input_options(p, "volume", "feature volume .npz written by ua3d lift / ua3d demo", "volume")
    p.add_argument("--slice", type=int, nargs="+", help="only these slice indices (default: all)")
    p.add_argument(
        "--show-rgbd", action="store_true", help="add the guide RGB-D point cloud (stored by lift and demo)"
    )
    p.add_argument(
        "--stride",
        type=int,
        default=0,
        help="pool s x s voxel blocks for display (default 0: auto, <= 20k per slice)",
    )
    p.add_argument(
        "--yaw", type=float, default=35.0, help="degrees, orbit right of the volume camera (default 35)"
    )
    p.add_argument(
        "--pitch", type=float, default=20.0, help="degrees, orbit above the volume camera (default 20)"
    )
    p.add_argument(
        "--alpha-max", type=float, default=0.85, help="opacity of the heaviest voxels (default 0.85)"
    )
    p.add_argument("--min-alpha", type=float, default=0.02, help="voxels below this opacity are not drawn")
    return r3d.add_picture_options(p)


def check_args(args: argparse.Namespace) -> None:
    """Validate the options before any work (ValueError naming the option)."""
    if not args.demo and not args.volume:
        raise ValueError("give a feature volume .npz or --demo")
    r3d.check_picture_options(args)
    if args.stride < 0:
        raise ValueError(f"--stride must be >= 0, got {args.stride}")
    if not 0 < args.alpha_max <= 1:
        raise ValueError(f"--alpha-max must be in (0, 1], got {args.alpha_max}")


def run(args: argparse.Namespace) -> int:
    """Run the viewer on parsed options; errors raise (``ValueError``, ``RenderingUnavailable``)."""
    load = lambda a: make_demo_volume() if a.demo else load_volume(a.volume)
    return r3d.run_viewer(args, check_args, load, render_png, PNG_OPTIONS, PNG_LINE, _interactive)


def _interactive(args: argparse.Namespace, data: dict[str, Any]) -> None:
    full_cam = data["camera"]
    stride = args.stride or auto_stride(full_cam.height, full_cam.width)
    volume, mass, cam = downsample_volume(data["volume"], data["mass"], full_cam, stride, data["normalized"])
    layers, _ = slice_layers(
        volume, mass, data["bin_depths"], cam, data["normalized"], alpha_max=args.alpha_max
    )
    if args.slice:
        bad = [k for k in args.slice if not 0 <= k < len(layers)]
        if bad:
            raise ValueError(f"--slice indices {bad} out of range 0..{len(layers) - 1}")
        layers = [layers[k] for k in args.slice]
    cloud = None
    if data.get("rgb") is not None and data.get("depth") is not None:
        cloud = rgbd_cloud(data["rgb"], data["depth"], full_cam)
    elif args.show_rgbd:
        raise ValueError(
            "--show-rgbd: the volume file stores no rgb/depth (write it with ua3d lift or ua3d demo)"
        )
    run_interactive(layers, cam, cloud, background=args.background, min_alpha=args.min_alpha)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m ua3d.viz.volume_slices``; errors are ``ua3d: error: ...``, exit 2."""
    return r3d.viewer_main("ua3d view volume", (__doc__ or "").split("\n\n")[0], add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
