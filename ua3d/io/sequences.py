"""Readers for posed RGB-D sequences.

Pose convention: every pose here is the 4x4 **camera-to-world** transform of
:mod:`ua3d.rgbd.camera` (``p_world = R p_cam + t``, camera x right, y down, z forward);
Open3D's ``extrinsic`` is its inverse. Each layout's own convention is converted to it:

* **Redwood / Open3D** (``format="redwood"``): ``color/*.jpg|png`` and ``depth/*.png`` (uint16
  millimetres, ``depth_scale`` 1000), paired by sorted file name, and ``trajectory.log`` (one
  ``i j n`` line and a camera-to-world 4x4 per frame, read by
  :func:`ua3d.io.rgbd.read_trajectory_log`; the poses are what
  ``open3d.io.read_pinhole_camera_trajectory`` gives as the inverse of each ``extrinsic``).
* **TUM RGB-D** (``format="tum"``): ``rgb.txt`` and ``depth.txt`` (``timestamp path`` lines, ``#``
  comments), ``groundtruth.txt`` (``timestamp tx ty tz qx qy qz qw``: the camera's position and
  orientation in the world, i.e. camera-to-world). Each colour frame is associated with the depth
  frame and the ground-truth pose nearest in time, both within ``max_dt`` (0.02 s, the TUM tools'
  default); frames without both are dropped. Depth is ``value / 5000`` metres.
* **plain** (``format="plain"``): ``color/`` (or ``rgb/``) and ``depth/`` images paired by sorted
  name, and ``poses.npy`` ``[N, 4, 4]`` camera-to-world; depth units by ``depth_scale`` (1000).

Intrinsics: the ``intrinsics`` argument (a :class:`PinholeCamera` or an Open3D JSON path), else an
Open3D JSON in the folder (``intrinsics.json``, ``camera_intrinsic.json`` or
``camera_primesense.json``), else ``ValueError``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ua3d.io.rgbd import read_color, read_depth, read_intrinsics, read_trajectory_log
from ua3d.rgbd.camera import PinholeCamera

__all__ = [
    "FORMATS",
    "Frame",
    "RGBDSequence",
    "detect_format",
    "open_sequence",
    "quaternion_to_matrix",
    "read_plain",
    "read_redwood",
    "read_tum",
    "read_tum_list",
]

FORMATS = ("redwood", "tum", "plain")
_IMAGE_EXT = (".png", ".jpg", ".jpeg")
_INTRINSICS_NAMES = ("intrinsics.json", "camera_intrinsic.json", "camera_primesense.json")
PathLike = str | os.PathLike


@dataclass
class Frame:
    """One posed RGB-D frame: ``rgb [H, W, 3]`` uint8, ``depth [H, W]`` float32 metres (0 = hole),
    ``camera`` with its camera-to-world pose, the frame's ``index`` and ``timestamp`` (TUM) or None."""

    index: int
    rgb: np.ndarray
    depth: np.ndarray
    camera: PinholeCamera
    timestamp: float | None = None


@dataclass
class RGBDSequence:
    """Lazily read posed frames (``len``, indexing and iteration read the images on demand)."""

    color_paths: list[Path]
    depth_paths: list[Path]
    poses: np.ndarray  # [N, 4, 4] camera-to-world
    camera: PinholeCamera  # intrinsics (pose None)
    depth_scale: float
    format: str
    timestamps: list[float] | None = None

    def __post_init__(self) -> None:
        n = len(self.color_paths)
        if len(self.depth_paths) != n or self.poses.shape != (n, 4, 4):
            raise ValueError(
                f"{self.format} sequence: {n} colour, {len(self.depth_paths)} depth images and "
                f"{self.poses.shape[0] if self.poses.ndim == 3 else self.poses.shape} poses do not match"
            )
        if n == 0:
            raise ValueError(f"{self.format} sequence has no frames")

    def __len__(self) -> int:
        return len(self.color_paths)

    def __getitem__(self, i: int) -> Frame:
        if not -len(self) <= i < len(self):
            raise IndexError(f"frame {i} out of range for {len(self)} frames")
        i = i % len(self)
        rgb = read_color(self.color_paths[i])
        depth = read_depth(self.depth_paths[i], self.depth_scale)
        ts = None if self.timestamps is None else self.timestamps[i]
        return Frame(i, rgb, depth, self.camera.with_pose(self.poses[i]), ts)

    def __iter__(self) -> Iterator[Frame]:
        for i in range(len(self)):
            yield self[i]


# ---------------------------------------------------------------------- helpers
def _dir(path: PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"sequence folder not found: {p}")
    return p


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in _IMAGE_EXT)
    if not files:
        raise ValueError(f"no .png/.jpg images in {folder}")
    return files


def _camera(root: Path, intrinsics: PinholeCamera | PathLike | None) -> PinholeCamera:
    if isinstance(intrinsics, PinholeCamera):
        return intrinsics.with_pose(None)
    if intrinsics is not None:
        return read_intrinsics(intrinsics)
    for name in _INTRINSICS_NAMES:
        if (root / name).is_file():
            return read_intrinsics(root / name)
    raise ValueError(
        f"no intrinsics given and none of {_INTRINSICS_NAMES} in {root}; pass --intrinsics K.json"
    )


def quaternion_to_matrix(q: Any) -> np.ndarray:
    """Rotation ``[3, 3]`` of a quaternion ``(qx, qy, qz, qw)`` (TUM order; normalised first)."""
    x, y, z, w = np.asarray(q, dtype=np.float64).reshape(4)
    n = np.sqrt(x * x + y * y + z * z + w * w)
    if not n > 0:
        raise ValueError(f"quaternion must be non-zero, got {q!r}")
    x, y, z, w = x / n, y / n, z / n, w / n
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


# ---------------------------------------------------------------------- Redwood
def read_redwood(
    path: PathLike,
    intrinsics: PinholeCamera | PathLike | None = None,
    trajectory: str = "trajectory.log",
    depth_scale: float = 1000.0,
) -> RGBDSequence:
    """Redwood / Open3D layout (see the module docstring)."""
    root = _dir(path)
    color, depth = _images(root / "color"), _images(root / "depth")
    poses = read_trajectory_log(root / trajectory)
    if not (len(color) == len(depth) == len(poses)):
        raise ValueError(
            f"{root}: {len(color)} colour images, {len(depth)} depth images and {len(poses)} trajectory poses"
        )
    return RGBDSequence(color, depth, poses, _camera(root, intrinsics), depth_scale, "redwood")


# ---------------------------------------------------------------------- TUM
def read_tum_list(path: PathLike) -> tuple[np.ndarray, list[list[str]]]:
    """A TUM list file: timestamps ``[N]`` float64 and the rest of each line (``#`` lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"TUM list file not found: {p}")
    ts, rest = [], []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.replace(",", " ").split()
        try:
            ts.append(float(parts[0]))
        except ValueError:
            raise ValueError(f"{p}:{n}: expected 'timestamp ...', got {line!r}") from None
        rest.append(parts[1:])
    if not ts:
        raise ValueError(f"{p} has no entries")
    return np.asarray(ts), rest


def _nearest(t: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index into sorted-or-not ``ref`` of the nearest time to each ``t`` and the gap."""
    order = np.argsort(ref, kind="stable")
    r = ref[order]
    i = np.clip(np.searchsorted(r, t), 1, len(r) - 1) if len(r) > 1 else np.zeros(len(t), int)
    if len(r) > 1:
        left = np.abs(t - r[i - 1]) <= np.abs(r[i] - t)
        i = np.where(left, i - 1, i)
    return order[i], np.abs(r[i] - t)


def read_tum(
    path: PathLike,
    intrinsics: PinholeCamera | PathLike | None = None,
    max_dt: float = 0.02,
    depth_scale: float = 5000.0,
) -> RGBDSequence:
    """TUM RGB-D layout (see the module docstring)."""
    root = _dir(path)
    t_rgb, rgb_rest = read_tum_list(root / "rgb.txt")
    t_d, d_rest = read_tum_list(root / "depth.txt")
    t_gt, gt_rest = read_tum_list(root / "groundtruth.txt")
    try:
        gt = np.array([[float(x) for x in r[:7]] for r in gt_rest])
    except ValueError as e:
        raise ValueError(f"{root / 'groundtruth.txt'}: {e}") from None
    if gt.ndim != 2 or gt.shape[1] != 7:
        raise ValueError(f"{root / 'groundtruth.txt'} lines must be 'timestamp tx ty tz qx qy qz qw'")
    di, ddt = _nearest(t_rgb, t_d)
    gi, gdt = _nearest(t_rgb, t_gt)
    keep = np.flatnonzero((ddt <= max_dt) & (gdt <= max_dt))
    if len(keep) == 0:
        raise ValueError(f"{root}: no colour frame has depth and ground truth within max_dt={max_dt} s")
    poses = np.zeros((len(keep), 4, 4))
    for k, i in enumerate(keep):
        g = gt[gi[i]]
        poses[k, :3, :3] = quaternion_to_matrix(g[3:7])
        poses[k, :3, 3] = g[:3]
        poses[k, 3, 3] = 1.0
    color = [root / rgb_rest[i][0] for i in keep]
    depth = [root / d_rest[di[i]][0] for i in keep]
    return RGBDSequence(
        color, depth, poses, _camera(root, intrinsics), depth_scale, "tum", [float(t_rgb[i]) for i in keep]
    )


# ---------------------------------------------------------------------- plain
def read_plain(
    path: PathLike,
    intrinsics: PinholeCamera | PathLike | None = None,
    poses: str = "poses.npy",
    depth_scale: float = 1000.0,
) -> RGBDSequence:
    """A folder with ``color/`` (or ``rgb/``), ``depth/`` and ``poses.npy`` (camera-to-world ``[N, 4, 4]``)."""
    root = _dir(path)
    cdir = root / "color" if (root / "color").is_dir() else root / "rgb"
    color, depth = _images(cdir), _images(root / "depth")
    pf = root / poses
    if not pf.is_file():
        raise FileNotFoundError(f"poses file not found: {pf}")
    try:
        P = np.load(pf, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"could not read {pf}: {e}") from None
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 3 or P.shape[1:] != (4, 4):
        raise ValueError(f"{pf} must hold [N, 4, 4] camera-to-world poses, got shape {P.shape}")
    if not (len(color) == len(depth) == len(P)):
        raise ValueError(f"{root}: {len(color)} colour images, {len(depth)} depth images and {len(P)} poses")
    return RGBDSequence(color, depth, P, _camera(root, intrinsics), depth_scale, "plain")


# ---------------------------------------------------------------------- dispatch
def detect_format(path: PathLike) -> str:
    """``"tum"`` if ``rgb.txt`` exists, ``"redwood"`` if ``trajectory.log`` does, ``"plain"`` if ``poses.npy`` does."""
    root = _dir(path)
    if (root / "rgb.txt").is_file():
        return "tum"
    if (root / "trajectory.log").is_file():
        return "redwood"
    if (root / "poses.npy").is_file():
        return "plain"
    raise ValueError(
        f"cannot tell the layout of {root} (no rgb.txt, trajectory.log or poses.npy); pass --format"
    )


def open_sequence(
    path: PathLike,
    format: str | None = None,
    intrinsics: PinholeCamera | PathLike | None = None,
    depth_scale: float | None = None,
) -> RGBDSequence:
    """Open a sequence folder in one of :data:`FORMATS` (detected when ``format`` is None)."""
    fmt = detect_format(path) if format is None else format
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    kw = {} if depth_scale is None else {"depth_scale": depth_scale}
    reader: Any = {"redwood": read_redwood, "tum": read_tum, "plain": read_plain}[fmt]
    return reader(path, intrinsics, **kw)
