"""Feature point clouds from a lifted kernel.

Two ways to turn LR features into 3D points:

* ``mode="pixels"``: every HR pixel with valid depth is back-projected with its *observed* depth
  (:func:`ua3d.rgbd.camera.backproject`, Open3D's convention ``x = (u - cx) z / fx``, row-major
  pixel order, the same points as Open3D's ``PointCloud.create_from_depth_image``) and carries
  its depth-aware feature from :meth:`LiftedKernel.render_2d`. Holes give no point.
* ``mode="voxels"``: every voxel of :func:`ua3d.rgbd.volume.render_volume` whose mass is at least
  ``mass_threshold`` becomes a point at the bin depth along the pixel's ray, carrying the
  volume's feature (holes included: the volume is defined at every pixel).

Colours are the guide's RGB at the point's pixel, or a PCA of the features (the first three
principal components, each mapped to [0, 1] by its 1st-99th percentile range).

File formats (:meth:`FeaturePointCloud.save`)
    * ``.npz``: ``positions [N, 3]`` float32, ``colors [N, 3]`` float32 in [0, 1], ``features
      [N, C]`` (lossless, in their dtype), ``pixels [N, 2]`` int64 ``(row, column)``, and in voxel
      mode ``bins [N]`` int64 plus ``bin_depths [D]``, and ``world_frame`` (uint8 0/1). The first
      three keys are what :func:`ua3d.io.rgbd.load_feature_points` reads; Open3D's
      ``t.io.read_point_cloud`` reads the file too (every array becomes an attribute).
    * ``.ply`` (binary, through Open3D): positions, float colours, and the feature channels as
      float32 scalar properties ``features_0 .. features_{C-1}`` (pixel indices are not stored).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ua3d.core.memory import check_memory
from ua3d.rgbd.camera import backproject, transform_points, unproject
from ua3d.rgbd.lift import LiftedKernel
from ua3d.rgbd.volume import render_volume

__all__ = ["COLOR_MODES", "FRAMES", "POINT_MODES", "FeaturePointCloud", "pca_colors", "render_points"]

POINT_MODES = ("pixels", "voxels")
FRAMES = ("camera", "world")
COLOR_MODES = ("pca", "rgb")


@dataclass
class FeaturePointCloud:
    """Points with features.

    Attributes
    ----------
    positions : ``[N, 3]`` float32 metres (camera or world frame, see ``frame``).
    colors : ``[N, 3]`` float32 in [0, 1].
    features : ``[N, C]``.
    pixels : ``[N, 2]`` int64 ``(row, column)`` of each point's HR pixel.
    bins : ``[N]`` int64 depth-bin index (voxel mode) or None.
    bin_depths : ``[D]`` float64 metres (voxel mode) or None.
    frame : ``"camera"`` or ``"world"``.
    """

    positions: torch.Tensor
    colors: torch.Tensor
    features: torch.Tensor
    pixels: torch.Tensor
    bins: torch.Tensor | None = None
    bin_depths: torch.Tensor | None = None
    frame: str = "camera"

    def __post_init__(self) -> None:
        n = self.positions.shape[0]
        if self.positions.ndim != 2 or self.positions.shape[1] != 3:
            raise ValueError(f"positions must be [N, 3], got {tuple(self.positions.shape)}")
        for name, t, shape in (("colors", self.colors, (n, 3)), ("pixels", self.pixels, (n, 2))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must be {list(shape)}, got {tuple(t.shape)}")
        if self.features.ndim != 2 or self.features.shape[0] != n:
            raise ValueError(f"features must be [N, C] with N = {n}, got {tuple(self.features.shape)}")
        if self.bins is not None and tuple(self.bins.shape) != (n,):
            raise ValueError(f"bins must be [N] = [{n}], got {tuple(self.bins.shape)}")

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def __repr__(self) -> str:
        kind = "voxels" if self.bins is not None else "pixels"
        return (
            f"FeaturePointCloud(n={len(self)}, channels={self.features.shape[1]}, frame={self.frame!r}, "
            f"from={kind})"
        )

    # ------------------------------------------------------------------ Open3D
    def to_open3d(self) -> Any:
        """``open3d.t.geometry.PointCloud`` with ``positions``, ``colors`` and a custom ``features`` attribute."""
        import open3d as o3d

        pcd = o3d.t.geometry.PointCloud()
        pcd.point.positions = o3d.core.Tensor(_np(self.positions, np.float32))
        pcd.point.colors = o3d.core.Tensor(_np(self.colors, np.float32))
        pcd.point.features = o3d.core.Tensor(_np(self.features, np.float32))
        return pcd

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``.npz`` (lossless) or ``.ply`` (through Open3D); see the module docstring."""
        path = Path(path)
        if path.suffix not in (".npz", ".ply"):
            raise ValueError(f"path must end in .npz or .ply, got {str(path)!r}")
        if len(self) == 0:
            raise ValueError("cannot save an empty point cloud")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".npz":
            arrays = {
                "positions": _np(self.positions, np.float32),
                "colors": _np(self.colors, np.float32),
                "features": _np(self.features),
                "pixels": _np(self.pixels, np.int64),
                "world_frame": np.array(int(self.frame == "world"), dtype=np.uint8),
            }
            if self.bins is not None:
                arrays["bins"] = _np(self.bins, np.int64)
            if self.bin_depths is not None:
                arrays["bin_depths"] = _np(self.bin_depths, np.float64)
            np.savez(path, **arrays)
            return path
        import open3d as o3d

        if not o3d.t.io.write_point_cloud(str(path), self.to_open3d()):
            raise ValueError(f"Open3D could not write {str(path)!r}")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeaturePointCloud:
        """Read a file written by :meth:`save` (``.ply`` comes back without pixel indices: ``pixels = -1``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no point cloud file at {str(path)!r}")
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                missing = {"positions", "colors", "features"} - set(z.files)
                if missing:
                    raise ValueError(f"{str(path)!r} lacks the arrays {sorted(missing)} (has {z.files})")
                d = {k: torch.from_numpy(z[k]) for k in z.files if k != "world_frame"}
                frame = "world" if "world_frame" in z.files and int(z["world_frame"]) else "camera"
            n = d["positions"].shape[0]
            pixels = d.get("pixels", torch.full((n, 2), -1, dtype=torch.int64))
            return cls(d["positions"], d["colors"], d["features"], pixels, d.get("bins"), d.get("bin_depths"), frame)
        if path.suffix == ".ply":
            return cls._load_ply(path)
        raise ValueError(f"path must end in .npz or .ply, got {str(path)!r}")

    @classmethod
    def _load_ply(cls, path: Path) -> FeaturePointCloud:
        import open3d as o3d

        pcd = o3d.t.io.read_point_cloud(str(path))
        names = list(pcd.point)
        if "positions" not in names:
            raise ValueError(f"{str(path)!r} holds no points")
        pos = torch.from_numpy(pcd.point.positions.numpy().copy())
        n = pos.shape[0]
        cols = pcd.point.colors.numpy().copy() if "colors" in names else np.full((n, 3), 0.5, np.float32)
        feat_names = sorted((k for k in names if k.startswith("features_")), key=lambda k: int(k.split("_")[1]))
        if not feat_names:
            raise ValueError(f"{str(path)!r} has no features_0.. properties")
        feats = np.concatenate([pcd.point[k].numpy().reshape(n, 1) for k in feat_names], axis=1)
        pixels = torch.full((n, 2), -1, dtype=torch.int64)
        return cls(pos, torch.from_numpy(cols.astype(np.float32)), torch.from_numpy(feats), pixels)


def _np(t: Any, dtype=None) -> np.ndarray:
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return np.ascontiguousarray(a if dtype is None else a.astype(dtype))


# ---------------------------------------------------------------------- colours
def pca_colors(features: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] from the first three principal components of ``features [N, C]``.

    Each component is mapped linearly from its 1st-99th percentile range to [0, 1] and clipped;
    missing components (``C < 3`` or rank-deficient features) are 0.5. Returns ``[N, 3]`` float32.
    """
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be [N, C] with N > 0, got {tuple(features.shape)}")
    x = features.to(torch.float32)
    x = x - x.mean(0, keepdim=True)
    n = x.shape[0]
    sub = x[:: max(1, n // 200_000)]  # the basis from a subsample; projection of every point
    _, s, vt = torch.linalg.svd(sub, full_matrices=False)
    k = int(min(3, vt.shape[0], int((s > s[0] * 1e-6).sum()) if s.numel() else 0))
    out = torch.full((n, 3), 0.5, dtype=torch.float32)
    if k == 0:
        return out
    proj = x @ vt[:k].T  # [N, k]
    q = torch.quantile(proj[:: max(1, n // 200_000)], torch.tensor([0.01, 0.99]), dim=0)  # [2, k]
    span = (q[1] - q[0]).clamp_min(1e-12)
    out[:, :k] = ((proj - q[0]) / span).clamp(0.0, 1.0)
    return out


def _colors(lifted: LiftedKernel, mode: str, feats: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    if mode == "pca":
        return pca_colors(feats)
    rgb = lifted.rgb[0].to(torch.float32)  # [Cc, H, W]
    if rgb.shape[0] == 1:
        rgb = rgb.expand(3, -1, -1)
    return rgb[:3, pixels[:, 0], pixels[:, 1]].T.clamp(0.0, 1.0).contiguous().cpu()


# ---------------------------------------------------------------------- rendering
def render_points(
    lifted: LiftedKernel,
    features: Any,
    mode: str = "pixels",
    frame: str = "camera",
    colors: str = "pca",
    mass_threshold: float | None = None,
    **volume_kwargs: Any,
) -> FeaturePointCloud:
    """Lift LR features to a feature point cloud.

    Parameters
    ----------
    lifted : a fitted :class:`~ua3d.rgbd.lift.LiftedKernel`.
    features : ``[1, C, h, w]`` or ``[C, h, w]`` on the kernel's LR grid.
    mode : ``"pixels"`` (valid HR pixels at their observed depth) or ``"voxels"`` (volume voxels
        selected by their mass, see ``mass_threshold``).
    frame : ``"camera"`` or ``"world"`` (applies ``lifted.camera.pose``; identity when None).
    colors : ``"pca"`` (of the features) or ``"rgb"`` (the guide's colour at the point's pixel).
    mass_threshold : voxel mode only. None (default): one voxel per pixel, at the bin where its mass
        peaks (the volume's depth estimate). A number: every voxel whose mass (of :func:`render_volume`,
        by default normalised per pixel over the bins) is ``>= mass_threshold``.
    volume_kwargs : voxel mode only: passed to :func:`render_volume` (``bins``, ``near``, ``far``,
        ``spacing``, ``band``, ``depth_model``, ``mass_mode``...).

    Returns
    -------
    FeaturePointCloud with ``N`` points; features keep the input features' floating dtype (the
    volume's ``out_dtype`` in voxel mode); positions and colours are float32.
    """
    if mode not in POINT_MODES:
        raise ValueError(f"mode must be one of {POINT_MODES}, got {mode!r}")
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
    if colors not in COLOR_MODES:
        raise ValueError(f"colors must be one of {COLOR_MODES}, got {colors!r}")
    if mode == "pixels" and volume_kwargs:
        raise ValueError(f"volume options {sorted(volume_kwargs)} apply only to mode='voxels'")
    f = lifted.check_features(features)
    if mode == "pixels":
        pos, pixels, feats, bins, bin_depths = _pixel_points(lifted, f)
    else:
        pos, pixels, feats, bins, bin_depths = _voxel_points(lifted, f, mass_threshold, volume_kwargs)
    if frame == "world" and lifted.camera.pose is not None:
        pos = transform_points(pos.to(torch.float64), lifted.camera.pose)
    if len(pos) == 0:
        cols = torch.zeros(0, 3)
    else:
        cols = _colors(lifted, colors, feats, pixels)
    return FeaturePointCloud(
        pos.to(torch.float32).cpu(), cols, feats.cpu(), pixels.cpu(), bins, bin_depths, frame
    )


def _pixel_points(lifted: LiftedKernel, f: torch.Tensor):
    H, W = lifted.out_size
    n = int(lifted.depth_valid.sum())
    check_memory(  # the HR render, the gathered features and the positions / pixels / colours
        f.shape[1] * (H * W + n) * f.element_size() + n * (3 * 8 + 2 * 8 + 3 * 4 + 3 * 4),
        f"lifting {f.shape[1]} channels to {n} points", "lift fewer channels at a time", device=f.device,
    )
    z = lifted.depth[0, 0]
    pos, pixels = backproject(z, lifted.camera, mask=lifted.depth_valid[0, 0])
    hr = lifted.render_2d(f)[0]  # [C, H, W] in the features' dtype
    feats = hr[:, pixels[:, 0], pixels[:, 1]].T.contiguous()
    return pos, pixels, feats, None, None


def _voxel_points(lifted: LiftedKernel, f: torch.Tensor, mass_threshold: float | None, kw: dict):
    if mass_threshold is not None and (not (mass_threshold >= 0) or not np.isfinite(mass_threshold)):
        raise ValueError(f"mass_threshold must be None or a finite number >= 0, got {mass_threshold!r}")
    if "out" in kw:
        raise ValueError("render_points keeps the volume in memory; 'out' (memmap) is not supported here")
    volume, mass, bin_depths = render_volume(lifted, f, **kw)
    if mass_threshold is None:
        keep = torch.zeros_like(mass, dtype=torch.bool).scatter_(0, mass.argmax(0, keepdim=True), True)
    else:
        keep = mass >= mass_threshold
    if not bool(keep.any()):
        raise ValueError(
            f"no voxel has mass >= mass_threshold={mass_threshold} (max mass {float(mass.max()):.3g}); lower it"
        )
    n = int(keep.sum())
    check_memory(
        n * (volume.shape[0] * volume.element_size() + 3 * 8 + 3 * 8 + 2 * 8 + 3 * 4),
        f"extracting {n} voxel points of {volume.shape[0]} channels",
        "raise mass_threshold (or None: one point per pixel), or use fewer bins or channels",
        device=volume.device,
    )
    idx = torch.nonzero(keep)  # [N, 3] (d, v, u), bin-major
    d, v, u = idx[:, 0], idx[:, 1], idx[:, 2]
    pos = unproject(u, v, bin_depths[d], lifted.camera)
    feats = volume[:, d, v, u].T.contiguous()
    return pos, torch.stack([v, u], 1), feats, d.cpu(), bin_depths.cpu()
