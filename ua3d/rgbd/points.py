"""Feature point clouds from a lifted kernel.

Two ways to turn LR features into 3D points:

* ``mode="pixels"``: every HR pixel with valid depth is back-projected with its *observed* depth
  (:func:`ua3d.rgbd.camera.backproject`, Open3D's convention ``x = (u - cx) z / fx``, row-major
  pixel order, the same points as Open3D's ``PointCloud.create_from_depth_image``) and carries
  its depth-aware feature from :meth:`LiftedKernel.render_2d`. Holes give no point.
* ``mode="voxels"``: every voxel of :func:`ua3d.rgbd.volume.render_volume` whose mass is at least
  ``mass_threshold`` becomes a point at the bin depth along the pixel's ray, carrying the
  volume's feature (holes included: the volume is defined at every pixel).

Colours are the guide's RGB at the point's pixel (default), or a PCA of the features (the first three
principal components, :class:`ua3d.core.pca.PCABasis`, the same PCA as every ua3d figure).

File formats (:meth:`FeaturePointCloud.save`, :meth:`FeaturePointCloud.load`): ``.ply`` (uchar RGB plus
``features_i`` properties, what other tools open), ``.npz`` (lossless) and ``.pcd``; the one
reader/writer and its format description live in :mod:`ua3d.rgbd.formats`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ua3d.core.memory import check_memory
from ua3d.core.pca import PCABasis
from ua3d.rgbd.camera import backproject, transform_points, unproject
from ua3d.rgbd.formats import read_point_cloud, write_point_cloud
from ua3d.rgbd.lift import LiftedKernel
from ua3d.rgbd.volume import render_volume

__all__ = ["COLOR_MODES", "FRAMES", "POINT_MODES", "FeaturePointCloud", "pca_colors", "render_points"]

POINT_MODES = ("pixels", "voxels")
FRAMES = ("camera", "world")
COLOR_MODES = ("rgb", "pca")


@dataclass
class FeaturePointCloud:
    """Points with features.

    Attributes
    ----------
    positions : ``[N, 3]`` float32 metres (camera or world frame, see ``frame``).
    colors : ``[N, 3]`` float32 in [0, 1].
    color_mode : what ``colors`` are: ``"rgb"`` (the guide image) or ``"pca"`` (of the features).
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
    color_mode: str = "rgb"

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
    def save(self, path: str | os.PathLike, format: str | None = None, compressed: bool = False) -> Path:
        """Write ``.ply`` (uchar colours + features), ``.npz`` (lossless) or ``.pcd`` (see :mod:`ua3d.rgbd.formats`).

        ``format`` (``"ply"``, ``"npz"``, ``"pcd"``) defaults to the suffix and must match it.
        """
        if len(self) == 0:
            raise ValueError("cannot save an empty point cloud")
        return write_point_cloud(
            path,
            _np(self.positions, np.float32),
            _np(self.colors, np.float32),
            _np(self.features),
            format=format,
            color_mode=self.color_mode,
            pixels=_np(self.pixels, np.int64),
            bins=None if self.bins is None else _np(self.bins, np.int64),
            bin_depths=None if self.bin_depths is None else _np(self.bin_depths, np.float64),
            frame=self.frame,
            compressed=compressed,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeaturePointCloud:
        """Read a file written by :meth:`save` (``.ply``/``.pcd`` come back without pixel indices: ``pixels = -1``)."""
        d = read_point_cloud(path)
        n = d["positions"].shape[0]
        t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))
        pixels = t(d["pixels"]) if d["pixels"] is not None else torch.full((n, 2), -1, dtype=torch.int64)
        return cls(
            t(d["positions"]),
            t(d["colors"]),
            t(d["features"]),
            pixels,
            t(d["bins"]),
            t(d["bin_depths"]),
            d["frame"],
            d["color_mode"],
        )


def _np(t: Any, dtype=None) -> np.ndarray:
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return np.ascontiguousarray(a if dtype is None else a.astype(dtype))


# ---------------------------------------------------------------------- colours
def pca_colors(features: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """RGB ``[N, 3]`` float32 in [0, 1] from the first three principal components of ``features [N, C]``
    (:class:`ua3d.core.pca.PCABasis`: 1st-99th percentile range per component; missing ones are 0.5)."""
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be [N, C] with N > 0, got {tuple(features.shape)}")
    x = features.detach().to(torch.float32).cpu()
    return PCABasis.fit(x, seed=seed).transform(x).to(torch.float32)


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
    colors: str = "rgb",
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
    colors : ``"rgb"`` (the guide's colour at the point's pixel, default) or ``"pca"`` (of the features).
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
        pos.to(torch.float32).cpu(), cols, feats.cpu(), pixels.cpu(), bins, bin_depths, frame, colors
    )


def _pixel_points(lifted: LiftedKernel, f: torch.Tensor):
    H, W = lifted.out_size
    n = int(lifted.depth_valid.sum())
    check_memory(  # the HR render, the gathered features and the positions / pixels / colours
        f.shape[1] * (H * W + n) * f.element_size() + n * (3 * 8 + 2 * 8 + 3 * 4 + 3 * 4),
        f"lifting {f.shape[1]} channels to {n} points",
        "lift fewer channels at a time",
        device=f.device,
    )
    z = lifted.depth[0, 0]
    pos, pixels = backproject(z, lifted.camera, mask=lifted.depth_valid[0, 0])
    hr = lifted.render_2d(f)[0]  # [C, H, W] in the features' dtype
    # rows of the pixel-major view: one contiguous [N, C] result, 3x less CPU than hr[:, v, u].T
    feats = hr.reshape(hr.shape[0], -1).T.index_select(0, pixels[:, 0] * W + pixels[:, 1])
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
