r"""Multi-frame fusion: one global 3D feature map from a posed RGB-D sequence.

A :class:`FeatureMap` holds, per occupied voxel of a world-aligned grid of edge ``voxel_size``,

* ``features [N, C]`` -- the confidence-weighted running mean of the per-pixel features that fell
  into the voxel (stored in ``dtype``, float16 or float32; the update is computed in float32),
* ``weights [N]`` -- the sum of the per-pixel confidences (float32),
* ``positions [N, 3]`` -- the weighted mean of the back-projected points (float32 metres, world
  frame), so the map's points lie on the observed surface, not on the voxel centres,
* ``colors [N, 3]`` -- the weighted mean RGB in [0, 1] (float32),
* ``observations [N]`` -- how many frames saw the voxel (int32).

Pose convention (the one of :mod:`ua3d.rgbd.camera`, stated once for the sequence readers of
:mod:`ua3d.io.sequences` too): ``camera.pose`` is the 4x4 **camera-to-world** transform,
``p_world = R p_cam + t``; Open3D's ``extrinsic`` is its inverse. ``None`` means identity.

Integration of a frame (:meth:`FeatureMap.integrate`)
    1. Optionally (``work_width``; default off) the frame is reduced by an integer factor -- RGB
       area-averaged, depth by the lower median of the valid samples of each block, so a depth is
       always a real sample and never a blend across an edge; the camera by the half-pixel-correct
       :meth:`PinholeCamera.resized`.
    2. The lifted RGB-D kernel (:func:`ua3d.rgbd.lift.fit_rgbd`, ``fit_config``, ``depth_weight``)
       is fitted -- on the guide resampled to ``fit_width`` (320 px: a quarter of the pixels of a
       640x480 frame) -- or a fitted :class:`~ua3d.rgbd.lift.LiftedKernel` for the frame is used, and
       renders the LR features, plus the LR depth as one extra channel, to every pixel.
    3. Every pixel with valid depth is back-projected to the world and gets the confidence

       .. math::  w = \underbrace{\min\!\big(1, (z_0 / z)^2\big)}_{\text{depth reliability}}
                 \; \underbrace{\exp\!\Big(-\tfrac12 \big(\tfrac{|\hat z - z|}{\tau z}\big)^2\Big)}_{\text{kernel mass at the pixel's depth}}

       with ``z`` the pixel's observed depth, ``z0 = 1 m`` (a pixel's footprint, and a depth
       sensor's noise, grow with depth: nearer views carry more detail), ``\hat z`` the depth the
       kernel renders at the pixel from the LR depths of the cells it draws on, and
       ``tau = agreement_tau`` (0.05): when most of the kernel's mass comes from cells at another
       depth (the pixel's feature is a blend across a depth edge) ``\hat z`` departs from ``z`` and
       the pixel counts little (never less than 1e-3 of its depth weight, so every observed surface
       point still enters the geometry). Pixels without kernel support weigh 0.
    4. Per voxel, the frame's pixels are pooled (``sum w f / sum w``) and merged into the running
       mean: ``W' = W + w_f``, ``m' = m + (w_f / W') (f_f - m)``. The result is the weighted mean of
       every pixel ever integrated (exactly, up to the storage dtype).

    Features already upsampled by any other method can be fused the same way with
    :meth:`FeatureMap.integrate_hr` (per-pixel features and optional per-pixel weights; the depth
    reliability is applied); :meth:`FeatureMap.integrate_points` is the bare weighted update.

Transactions
    Every input is validated and every array of the update is computed before the map changes:
    a frame that raises leaves the map exactly as it was. A frame with no valid depth is not an
    error: it is skipped, listed in :attr:`FeatureMap.skipped` and reported in the returned
    :class:`FrameReport`.

Spatial structure (measured by ``scripts/eval_fusion.py``; figures in ``docs/fusion.md``)
    A hashed sparse voxel grid of our own: integer voxel coordinates packed into one int64 key,
    a sorted key array searched with ``torch.searchsorted``, and the voxel records in growable
    arrays (capacity doubles). Memory is ``bytes_per_voxel`` times the number of *observed* voxels
    (112 B at 32 float16 channels), allocated as the map grows, on any torch device, in float16.
    Open3D's tensor ``VoxelBlockGrid`` was the alternative: it reserves ``block_count`` blocks of
    ``block_resolution^3`` voxels up front, stores every voxel of a touched block (free space
    included), has no float16 attribute dtype, and only integrates its own TSDF/colour attributes,
    so a feature attribute needs the same index bookkeeping done by hand.

Files (:meth:`FeatureMap.save` / :meth:`FeatureMap.load`)
    * ``.npz`` (lossless): ``format`` = ``"ua3d-feature-map"``, ``format_version`` (1), the
      settings, ``keys [N]`` int64, ``features [N, C]`` in the map dtype, ``weights``, ``positions``,
      ``colors``, ``observations``, ``poses [F, 4, 4]`` (camera-to-world of the fused frames), and in
      ``meta`` (JSON) ``frames`` and ``skipped``. Loading checks all of it: a truncated
      file, another format or another version raises ``ValueError``.
    * ``.ply`` (binary, via Open3D): positions, the PCA colours of the features as ``uchar``
      ``red/green/blue``, ``weights``, and the features as float32 ``features_0 ..``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ua3d.core.memory import available_memory_bytes
from ua3d.core.tto import FitConfig
from ua3d.rgbd.camera import PinholeCamera, depth_validity, unproject
from ua3d.rgbd.lift import LiftedKernel, _as_rgb, as_depth, fit_rgbd

__all__ = [
    "DEPTH_WEIGHT",
    "FORMAT",
    "FORMAT_VERSION",
    "FeatureMap",
    "FrameReport",
    "reduce_frame",
]

FORMAT = "ua3d-feature-map"
FORMAT_VERSION = 1
_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_KEY_BITS = 21  # per axis: voxel coordinates in [-2^20, 2^20)
_KEY_OFF = 1 << (_KEY_BITS - 1)
_MEMORY_FRACTION = 0.8  # the same threshold as ua3d.api's render guard
_WARN_FRACTION = 0.5
DEPTH_WEIGHT = 0.3  # the fusion's loss weight of the depth channel (fit_rgbd's default is 10)
_AGREEMENT_FLOOR = 1e-3  # every observed surface point keeps a (tiny) weight: geometry has no holes


def default_fit_config() -> FitConfig:
    """The fusion's per-frame fit: 20 Adam steps, a window of radius 2 LR cells (cost and accuracy in ``docs/fusion.md``)."""
    return FitConfig(steps=20, radius=2.0)


# ---------------------------------------------------------------------- validation helpers
def _check_grid(lr_size: tuple[int, int], H: int, W: int, tol: float = 0.15) -> None:
    """Features must lie on a grid with the image's aspect ratio (within ``tol``) and no finer than it."""
    h, w = lr_size
    if h > H or w > W:
        raise ValueError(f"features grid {h}x{w} is finer than the image {H}x{W}")
    ratio = (h / w) / (H / W)
    if abs(ratio - 1) > tol:
        raise ValueError(
            f"features grid {h}x{w} (h x w) does not have the image's aspect ratio {H}x{W} "
            f"(ratio {ratio:.2f}); features of another image or a transposed [w, h] grid?"
        )


# ---------------------------------------------------------------------- work resolution
def reduce_frame(
    rgb: torch.Tensor, depth: torch.Tensor, camera: PinholeCamera, factor: int
) -> tuple[torch.Tensor, torch.Tensor, PinholeCamera]:
    """Reduce a frame by an integer ``factor`` (crop to a multiple of it first).

    RGB ``[1, 3, H, W]`` is area-averaged; depth ``[1, 1, H, W]`` (holes 0) takes the lower median of
    the valid samples of each block (a real sample, never a blend across an edge; 0 if none);
    the camera is :meth:`PinholeCamera.resized` to the new size (half-pixel-correct).
    """
    if factor == 1:
        return rgb, depth, camera
    H, W = depth.shape[-2:]
    h, w = H // factor, W // factor
    Hc, Wc = h * factor, w * factor
    cam = camera
    if (Hc, Wc) != (H, W):  # cropping the bottom/right keeps fx, fy, cx, cy
        cam = PinholeCamera(camera.fx, camera.fy, camera.cx, camera.cy, Wc, Hc, camera.pose)
    rgb_r = F.avg_pool2d(rgb[..., :Hc, :Wc], factor)
    d = depth[0, 0, :Hc, :Wc].reshape(h, factor, w, factor).permute(0, 2, 1, 3).reshape(h, w, -1)
    d = torch.where(d > 0, d, torch.full((), float("nan"), dtype=d.dtype, device=d.device))
    med = torch.nanmedian(d, dim=-1).values.nan_to_num(0.0)
    return rgb_r, med[None, None], cam.resized(w, h)


# ---------------------------------------------------------------------- report
@dataclass
class FrameReport:
    """What one :meth:`FeatureMap.integrate` call did."""

    frame: int
    status: str  # "integrated" or "skipped"
    reason: str = ""
    points: int = 0
    new_voxels: int = 0
    voxels: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        if self.status == "skipped":
            return f"frame {self.frame}: skipped ({self.reason})"
        t = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
        return f"frame {self.frame}: {self.points} points, +{self.new_voxels} voxels -> {self.voxels} ({t})"


# ---------------------------------------------------------------------- the map
class FeatureMap:
    """A sparse voxel map of fused features (see the module docstring for the update rule).

    Parameters
    ----------
    voxel_size : voxel edge in metres (> 0).
    channels : feature channels C.
    dtype : ``torch.float16`` (default; halves the memory) or ``torch.float32``; also "float16"/"float32".
    device : torch device of the map's arrays (default CPU).
    depth_max : metres; farther depth is a hole (None = no limit).
    work_width : frames wider than this are reduced by the integer factor ``round(W / work_width)``
        before everything (None, the default: full resolution).
    fit_width : the kernel's parameters are fitted on the guide resampled to about this width
        (``FitConfig.coarse_to_fine = fit_width / W``, ``fine_steps = 0``; the sigmas are rescaled to
        the full size), then the features are rendered and fused at the full (work) resolution.
        Default 320; None fits at full resolution. Ignored when ``fit_config`` sets its own
        ``coarse_to_fine``.
    fit_config : :class:`FitConfig` of the per-frame lift (default :func:`default_fit_config`).
    agreement_tau : ``tau`` of the kernel-agreement confidence (relative depth; None = off).
    depth_weight : loss weight of the depth channel in the per-frame fit (:func:`fit_rgbd`). The
        fusion's default 0.3 (not the single-frame 10): in 3D, object boundaries are mostly contacts
        (a box on the floor) where depth is continuous and only colour separates the surfaces; a
        heavy depth term widens the colour scale and blurs them (``docs/fusion.md``).
    max_bytes : refuse (``MemoryError``) to grow the map beyond this; default 80% of the memory
        available when growing. A warning is issued when the map passes half of it.
    """

    def __init__(
        self,
        voxel_size: float = 0.02,
        channels: int = 32,
        dtype: Any = torch.float16,
        device: Any = "cpu",
        *,
        depth_max: float | None = None,
        work_width: int | None = None,
        fit_width: int | None = 320,
        fit_config: FitConfig | None = None,
        agreement_tau: float | None = 0.05,
        depth_weight: float = DEPTH_WEIGHT,
        max_bytes: int | None = None,
    ) -> None:
        if not (isinstance(voxel_size, (int, float)) and voxel_size > 0 and math.isfinite(voxel_size)):
            raise ValueError(f"voxel_size must be a positive number of metres, got {voxel_size!r}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be torch.float16 or torch.float32, got {dtype!r}")
        if depth_max is not None and not depth_max > 0:
            raise ValueError(f"depth_max must be positive or None, got {depth_max!r}")
        for name, v in (("work_width", work_width), ("fit_width", fit_width)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if fit_config is not None and not isinstance(fit_config, FitConfig):
            raise ValueError(f"fit_config must be a FitConfig or None, got {type(fit_config).__name__}")
        if agreement_tau is not None and not (agreement_tau > 0 and math.isfinite(agreement_tau)):
            raise ValueError(f"agreement_tau must be positive or None, got {agreement_tau!r}")
        if not (depth_weight >= 0 and math.isfinite(depth_weight)):
            raise ValueError(f"depth_weight must be a finite number >= 0, got {depth_weight!r}")
        self.voxel_size = float(voxel_size)
        self.channels = channels
        self.dtype = dtype
        self.device = torch.device(device)
        self.depth_max = depth_max
        self.work_width = work_width
        self.fit_width = fit_width
        self.fit_config = fit_config if fit_config is not None else default_fit_config()
        self.agreement_tau = agreement_tau
        self.depth_weight = float(depth_weight)
        self.max_bytes = max_bytes
        self.lr_size: tuple[int, int] | None = None
        self.frames = 0
        self.skipped: list[tuple[int, str]] = []
        self.poses: list[np.ndarray] = []  # camera-to-world pose of every integrated frame
        self._n = 0
        self._cap = 0
        self._keys = torch.empty(0, dtype=torch.int64, device=self.device)  # in slot order
        self._sorted = torch.empty(0, dtype=torch.int64, device=self.device)  # keys sorted
        self._order = torch.empty(0, dtype=torch.int64, device=self.device)  # slot of each sorted key
        self._feat = torch.empty(0, channels, dtype=dtype, device=self.device)
        self._w = torch.empty(0, dtype=torch.float32, device=self.device)
        self._pos = torch.empty(0, 3, dtype=torch.float32, device=self.device)
        self._rgb = torch.empty(0, 3, dtype=torch.float32, device=self.device)
        self._obs = torch.empty(0, dtype=torch.int32, device=self.device)
        self._warned = False

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return (
            f"FeatureMap(voxels={self._n}, voxel_size={self.voxel_size:g}, channels={self.channels}, "
            f"dtype={str(self.dtype).removeprefix('torch.')}, frames={self.frames}, skipped={len(self.skipped)}, "
            f"{self.nbytes / 2**20:.1f} MiB)"
        )

    @staticmethod
    def bytes_per_voxel(channels: int, dtype: Any = torch.float16) -> int:
        """Bytes of one voxel record: features, weight, position, colour, observations, key, sort index."""
        dt = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        return channels * torch.empty((), dtype=dt).element_size() + 4 + 12 + 12 + 4 + 8 + 8

    @classmethod
    def estimate_bytes(cls, voxels: int, channels: int, dtype: Any = torch.float16) -> int:
        """Bytes a map of ``voxels`` voxels holds (capacity doubling can reserve up to twice this)."""
        return int(voxels) * cls.bytes_per_voxel(channels, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes reserved now (the capacity, not only the occupied voxels)."""
        return self.estimate_bytes(self._cap, self.channels, self.dtype)

    # ------------------------------------------------------------------ read access
    @property
    def keys(self) -> torch.Tensor:
        return self._keys[: self._n]

    @property
    def features(self) -> torch.Tensor:
        """``[N, C]`` fused features in the map dtype (a view)."""
        return self._feat[: self._n]

    @property
    def weights(self) -> torch.Tensor:
        return self._w[: self._n]

    @property
    def positions(self) -> torch.Tensor:
        return self._pos[: self._n]

    @property
    def colors(self) -> torch.Tensor:
        return self._rgb[: self._n]

    @property
    def observations(self) -> torch.Tensor:
        return self._obs[: self._n]

    def voxel_coords(self) -> torch.Tensor:
        """Integer voxel coordinates ``[N, 3]`` (voxel ``i`` spans ``[c, c + 1) * voxel_size``)."""
        return _unpack(self.keys)

    # ------------------------------------------------------------------ keys
    def points_to_keys(self, points: torch.Tensor) -> torch.Tensor:
        """Packed int64 voxel keys of world points ``[N, 3]`` (ValueError beyond the key range)."""
        c = torch.floor(points.to(torch.float64) / self.voxel_size).to(torch.int64)
        if c.numel() and (int(c.min()) < -_KEY_OFF or int(c.max()) >= _KEY_OFF):
            raise ValueError(
                f"points lie beyond the map's range of +-{_KEY_OFF * self.voxel_size:g} m at voxel size "
                f"{self.voxel_size:g} m (bad pose or depth units?)"
            )
        return _pack(c)

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Slot of each key, -1 where the voxel is not in the map."""
        keys = keys.to(self.device)
        if self._n == 0:
            return torch.full_like(keys, -1)
        i = torch.searchsorted(self._sorted, keys).clamp(max=self._n - 1)
        hit = self._sorted[i] == keys
        return torch.where(hit, self._order[i], torch.full_like(keys, -1))

    def lookup_points(self, points: torch.Tensor) -> torch.Tensor:
        """Voxel slot of each world point ``[N, 3]`` (-1 where not mapped)."""
        return self.lookup(self.points_to_keys(points.to(self.device)))

    # ------------------------------------------------------------------ memory
    def _limit(self) -> int:
        if self.max_bytes is not None:
            return int(self.max_bytes)
        avail = available_memory_bytes() if self.device.type == "cpu" else _device_free(self.device)
        return int(_MEMORY_FRACTION * (avail + self.nbytes))

    def _check_growth(self, new_voxels: int) -> int:
        """New capacity for ``new_voxels`` more voxels, or MemoryError (before anything changes)."""
        need = self._n + new_voxels
        if need <= self._cap:
            return self._cap
        cap = max(need, 2 * self._cap, 1024)
        limit = self._limit()
        if self.estimate_bytes(cap, self.channels, self.dtype) > limit:
            cap = need  # no headroom: grow exactly
        est = self.estimate_bytes(cap, self.channels, self.dtype)
        if est > limit:
            raise MemoryError(
                f"the feature map would need {est / 2**30:.2f} GiB for {need} voxels "
                f"({self.bytes_per_voxel(self.channels, self.dtype)} B each) but the limit is "
                f"{limit / 2**30:.2f} GiB; use a larger voxel_size, fewer channels, float16 or a "
                f"smaller depth_max (the map keeps its {self._n} voxels)"
            )
        if not self._warned and est > _WARN_FRACTION * limit:
            self._warned = True
            warnings.warn(
                f"the feature map holds {est / 2**30:.2f} GiB, over half of its limit {limit / 2**30:.2f} GiB",
                ResourceWarning,
                stacklevel=3,
            )
        return cap

    def _grow(self, cap: int) -> None:
        if cap == self._cap:
            return

        def grow(t: torch.Tensor) -> torch.Tensor:
            out = torch.zeros((cap, *t.shape[1:]), dtype=t.dtype, device=t.device)
            out[: self._n] = t[: self._n]
            return out

        self._keys, self._feat, self._w = grow(self._keys), grow(self._feat), grow(self._w)
        self._pos, self._rgb, self._obs = grow(self._pos), grow(self._rgb), grow(self._obs)
        self._cap = cap

    # ------------------------------------------------------------------ the update
    def integrate_points(
        self,
        points: Any,
        features: Any,
        weights: Any | None = None,
        colors: Any | None = None,
    ) -> tuple[int, int]:
        """Weighted running-mean update with world points ``[N, 3]`` and their features ``[N, C]``.

        ``weights [N]`` (default 1; must be finite and >= 0; zero-weight points are dropped),
        ``colors [N, 3]`` in [0, 1] (default 0.5 grey). All points count as one observation per
        voxel. Returns ``(points used, new voxels)``. The map is unchanged if this raises.
        """
        p = torch.as_tensor(points).to(device=self.device, dtype=torch.float32)
        f = torch.as_tensor(features).to(device=self.device, dtype=torch.float32)
        if p.ndim != 2 or p.shape[1] != 3:
            raise ValueError(f"points must be [N, 3], got {tuple(p.shape)}")
        if f.shape != (p.shape[0], self.channels):
            raise ValueError(
                f"features must be [N, C] = [{p.shape[0]}, {self.channels}], got {tuple(f.shape)}"
            )
        w = (
            torch.ones(p.shape[0], dtype=torch.float32, device=self.device)
            if weights is None
            else torch.as_tensor(weights).to(device=self.device, dtype=torch.float32).reshape(-1)
        )
        if w.shape != (p.shape[0],):
            raise ValueError(f"weights must be [N] = [{p.shape[0]}], got {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("weights must be finite and >= 0")
        c = (
            torch.full((p.shape[0], 3), 0.5, device=self.device)
            if colors is None
            else torch.as_tensor(colors).to(device=self.device, dtype=torch.float32)
        )
        if c.shape != (p.shape[0], 3):
            raise ValueError(f"colors must be [N, 3] = [{p.shape[0]}, 3], got {tuple(c.shape)}")
        keep = w > 0
        finite = torch.isfinite(p).all(1) & torch.isfinite(f).all(1)
        if not bool((finite | ~keep).all()):
            raise ValueError("points and features must be finite where the weight is > 0")
        if not bool(keep.all()):
            p, f, w, c = p[keep], f[keep], w[keep], c[keep]
        if p.shape[0] == 0:
            return 0, 0
        keys = self.points_to_keys(p)
        # pool the frame's points per voxel (float32 sums)
        ukeys, inv = torch.unique(keys, return_inverse=True)
        m = ukeys.shape[0]
        sw = torch.zeros(m, device=self.device).index_add_(0, inv, w)
        wf = torch.zeros(m, self.channels, device=self.device).index_add_(0, inv, f * w[:, None])
        wp = torch.zeros(m, 3, device=self.device).index_add_(0, inv, p * w[:, None])
        wc = torch.zeros(m, 3, device=self.device).index_add_(0, inv, c * w[:, None])
        slot = self.lookup(ukeys)
        new = slot < 0
        n_new = int(new.sum())
        cap = self._check_growth(n_new)  # may raise: nothing has changed yet
        # ---- commit (no more checks from here)
        self._grow(cap)
        new_slots = torch.arange(self._n, self._n + n_new, device=self.device)
        slot = slot.clone()
        slot[new] = new_slots
        self._keys[new_slots] = ukeys[new]
        W0 = self._w[slot]
        W1 = W0 + sw
        a = (sw / W1)[:, None]
        m0 = self._feat[slot].to(torch.float32)
        self._feat[slot] = (m0 + a * (wf / sw[:, None] - m0)).to(self.dtype)
        self._pos[slot] = self._pos[slot] + a * (wp / sw[:, None] - self._pos[slot])
        self._rgb[slot] = self._rgb[slot] + a * (wc / sw[:, None] - self._rgb[slot])
        self._w[slot] = W1
        self._obs[slot] += 1
        self._n += n_new
        if n_new:
            self._sorted, self._order = torch.sort(self._keys[: self._n])
        return int(p.shape[0]), n_new

    def _frame_inputs(self, rgb: Any, depth: Any, camera: PinholeCamera, depth_scale: float):
        if not isinstance(camera, PinholeCamera):
            raise ValueError(
                f"camera must be a PinholeCamera with a camera-to-world pose, got {type(camera).__name__}"
            )
        pose = np.eye(4) if camera.pose is None else camera.pose  # PinholeCamera checked it is rigid
        g = _as_rgb(rgb)
        if g.shape[1] != 3:
            raise ValueError(f"rgb must have 3 channels, got shape {tuple(g.shape)}")
        z = as_depth(depth, depth_scale).to(dtype=torch.float32)
        H, W = g.shape[-2:]
        if tuple(z.shape[-2:]) != (H, W):
            raise ValueError(
                f"depth has size {tuple(z.shape[-2:])} (HxW) but rgb has size {(H, W)}; they must match pixel for pixel"
            )
        camera.check_image(H, W, "rgb/depth")
        valid = torch.as_tensor(depth_validity(z, self.depth_max))
        z = torch.where(valid, z, torch.zeros((), dtype=z.dtype))
        return g.to(torch.float32), z, pose

    def frame_config(self, width: int) -> FitConfig:
        """The :class:`FitConfig` :meth:`integrate` fits a frame of ``width`` (work) pixels with."""
        cfg = self.fit_config
        if self.fit_width is not None and width > self.fit_width and cfg.coarse_to_fine >= 1:
            cfg = cfg.replace(coarse_to_fine=self.fit_width / width, fine_steps=0)
        return cfg

    def _depth_reliability(self, z: torch.Tensor) -> torch.Tensor:
        return (1.0 / z.clamp_min(1e-6) ** 2).clamp(max=1.0)

    def integrate(
        self,
        rgb: Any,
        depth: Any,
        camera: PinholeCamera,
        lr_features: Any,
        *,
        lifted: LiftedKernel | None = None,
        depth_scale: float = 1.0,
    ) -> FrameReport:
        """Fuse one posed RGB-D frame with its LR features (see the module docstring).

        Parameters
        ----------
        rgb : numpy ``[H, W, 3]`` uint8 / float in [0, 1], or tensor ``[3, H, W]`` / ``[1, 3, H, W]``.
        depth : ``[H, W]``; ``depth / depth_scale`` is metres; 0/NaN/Inf (and > ``depth_max``) are holes.
        camera : :class:`PinholeCamera` for ``W x H`` with its camera-to-world ``pose``.
        lr_features : ``[C, h, w]`` or ``[1, C, h, w]``; every frame of a map uses the same grid.
        lifted : a kernel already fitted to this frame at the work resolution (skips the fit).
        depth_scale : raw depth units per metre.

        Returns
        -------
        FrameReport (``status`` "skipped" with the reason for a frame without valid depth).

        Raises
        ------
        ValueError
            rgb/depth size mismatch, intrinsics of another size, a non-rigid pose, features with
            the wrong channel count or grid. The map is unchanged.
        """
        t0 = time.perf_counter()
        index = self.frames + len(self.skipped)
        g, z, pose = self._frame_inputs(rgb, depth, camera, depth_scale)
        H, W = g.shape[-2:]
        f = torch.as_tensor(lr_features) if isinstance(lr_features, np.ndarray) else lr_features
        if not isinstance(f, torch.Tensor):
            raise ValueError(f"lr_features must be a tensor or numpy array, got {type(lr_features).__name__}")
        if f.ndim == 3:
            f = f[None]
        if f.ndim != 4 or f.shape[0] != 1:
            raise ValueError(f"lr_features must be [C, h, w] or [1, C, h, w], got {tuple(f.shape)}")
        if f.shape[1] != self.channels:
            raise ValueError(f"lr_features has {f.shape[1]} channels but the map has {self.channels}")
        hw = (int(f.shape[-2]), int(f.shape[-1]))
        if self.lr_size is not None and hw != self.lr_size:
            raise ValueError(
                f"lr_features grid {hw[0]}x{hw[1]} differs from the grid of the frames fused so far "
                f"{self.lr_size[0]}x{self.lr_size[1]}"
            )
        _check_grid(hw, H, W)
        if not bool(torch.isfinite(f).all()):
            raise ValueError("lr_features has NaN/Inf values")
        factor = 1 if self.work_width is None else max(1, round(W / self.work_width))
        gr, zr, cam = reduce_frame(g, z, camera.with_pose(pose), factor)
        if min(zr.shape[-2:]) < 2 or hw[0] > zr.shape[-2] or hw[1] > zr.shape[-1]:
            raise ValueError(
                f"work resolution {tuple(zr.shape[-2:])} is too small for the {hw} grid; raise work_width"
            )
        if lifted is not None:
            if not isinstance(lifted, LiftedKernel):
                raise ValueError(f"lifted must be a LiftedKernel, got {type(lifted).__name__}")
            if lifted.lr_size != hw or lifted.out_size != tuple(zr.shape[-2:]):
                raise ValueError(
                    f"lifted kernel is for grid {lifted.lr_size} and size {lifted.out_size}, but this frame needs "
                    f"grid {hw} at the work resolution {tuple(zr.shape[-2:])}"
                )
        if not bool((zr > 0).any()):
            return self._skip(index, "no valid depth", t0)
        t1 = time.perf_counter()
        if lifted is None:
            lifted = fit_rgbd(
                gr,
                zr,
                cam,
                hw,
                self.frame_config(zr.shape[-1]),
                depth_max=self.depth_max,
                depth_weight=self.depth_weight,
            )
        t2 = time.perf_counter()
        dev, dt = lifted.params.device, lifted.params.dtype
        sig = torch.cat([f.to(device=dev, dtype=dt), lifted.depth_lr.to(device=dev, dtype=dt)], 1)
        out, support = lifted.render_2d(sig, return_support=True)
        feats, zhat = out[0, :-1], out[0, -1]
        zo = lifted.depth[0, 0].to(torch.float32)
        w = self._depth_reliability(zo) * lifted.depth_valid[0, 0] * support[0, 0]
        if self.agreement_tau is not None:
            rel = (zhat.to(torch.float32) - zo).abs() / zo.clamp_min(1e-6)
            agree = torch.exp(-0.5 * (rel.nan_to_num(1e3) / self.agreement_tau) ** 2)
            w = w * agree.clamp_min(_AGREEMENT_FLOOR)
        t3 = time.perf_counter()
        rep = self._integrate_pixels(index, zo, cam, feats, w, gr[0], hw)
        rep.seconds = {
            "prepare": t1 - t0,
            "fit": t2 - t1,
            "render": t3 - t2,
            "fuse": time.perf_counter() - t3,
        }
        return rep

    def integrate_hr(
        self,
        depth: Any,
        camera: PinholeCamera,
        hr_features: Any,
        *,
        weights: Any | None = None,
        rgb: Any | None = None,
        depth_scale: float = 1.0,
        lr_size: tuple[int, int] | None = None,
    ) -> FrameReport:
        """Fuse per-pixel features ``[C, H, W]`` (already upsampled by any method) of a posed depth frame.

        The confidence is the depth reliability times ``weights [H, W]`` (default 1); NaN features
        weigh 0. ``rgb`` (default grey) gives the colours. ``lr_size`` is recorded/checked like
        :meth:`integrate`'s grid when given. No work-resolution reduction is applied.
        """
        t0 = time.perf_counter()
        index = self.frames + len(self.skipped)
        z = as_depth(depth, depth_scale).to(torch.float32)
        H, W = z.shape[-2:]
        g = torch.full((1, 3, H, W), 0.5) if rgb is None else _as_rgb(rgb).to(torch.float32)
        g, z, pose = self._frame_inputs(g, z, camera, 1.0)
        f = torch.as_tensor(hr_features).to(torch.float32)
        if f.ndim == 4 and f.shape[0] == 1:
            f = f[0]
        if f.shape != (self.channels, H, W):
            raise ValueError(f"hr_features must be [C, H, W] = {(self.channels, H, W)}, got {tuple(f.shape)}")
        if lr_size is not None and self.lr_size is not None and tuple(lr_size) != self.lr_size:
            raise ValueError(f"lr_size {tuple(lr_size)} differs from the map's grid {self.lr_size}")
        wt = torch.ones(H, W) if weights is None else torch.as_tensor(weights).to(torch.float32).reshape(H, W)
        ok = torch.isfinite(f).all(0) & (z[0, 0] > 0)
        if not bool(ok.any()):
            return self._skip(index, "no valid depth", t0)
        w = self._depth_reliability(z[0, 0]) * wt * ok
        rep = self._integrate_pixels(
            index,
            z[0, 0],
            camera.with_pose(pose),
            f.nan_to_num(0.0),
            w,
            g[0],
            None if lr_size is None else tuple(lr_size),
        )
        rep.seconds = {"fuse": time.perf_counter() - t0}
        return rep

    def _integrate_pixels(self, index, z, cam, feats, w, rgb, hw) -> FrameReport:
        """Back-project pixels with weight > 0 and run the update (commit point)."""
        sel = (w > 0) & (z > 0)
        if not bool(sel.any()):
            return self._skip(index, "no pixel with positive confidence", time.perf_counter())
        v, u = torch.nonzero(sel, as_tuple=True)
        pc = unproject(u, v, z[v, u], cam).to(torch.float32)
        pose = torch.as_tensor(cam.camera_to_world, dtype=torch.float32)
        pw = pc @ pose[:3, :3].T + pose[:3, 3]
        fs = feats[:, v, u].T
        n, n_new = self.integrate_points(pw, fs, w[v, u], rgb[:, v, u].T.clamp(0, 1))
        if hw is not None and self.lr_size is None:
            self.lr_size = tuple(hw)
        self.frames += 1
        self.poses.append(np.asarray(cam.camera_to_world, np.float64))
        return FrameReport(index, "integrated", points=n, new_voxels=n_new, voxels=self._n)

    def _skip(self, index: int, reason: str, t0: float) -> FrameReport:
        self.skipped.append((index, reason))
        warnings.warn(f"frame {index} skipped: {reason}", RuntimeWarning, stacklevel=3)
        return FrameReport(
            index, "skipped", reason, voxels=self._n, seconds={"total": time.perf_counter() - t0}
        )

    # ------------------------------------------------------------------ queries
    def query(self, feature: Any) -> torch.Tensor:
        """Cosine similarity ``[N]`` (float32) of every voxel's feature to ``feature [C]``."""
        q = torch.as_tensor(feature).to(device=self.device, dtype=torch.float32).reshape(-1)
        if q.shape != (self.channels,):
            raise ValueError(
                f"feature must have {self.channels} values, got shape {tuple(torch.as_tensor(feature).shape)}"
            )
        if not bool(torch.isfinite(q).all()) or float(q.norm()) == 0:
            raise ValueError("feature must be finite and non-zero")
        return F.cosine_similarity(self.features.to(torch.float32), q[None], dim=1, eps=1e-12)

    def nearest(self, point: Any) -> int:
        """Index of the voxel whose (mean) position is nearest to a world point ``[3]``."""
        if self._n == 0:
            raise ValueError("the map is empty")
        p = torch.as_tensor(point, dtype=torch.float32, device=self.device).reshape(-1)
        if p.shape != (3,):
            raise ValueError(f"point must have 3 coordinates, got {tuple(p.shape)}")
        return int(((self.positions - p) ** 2).sum(1).argmin())

    # ------------------------------------------------------------------ export
    def to_point_cloud(self, min_weight: float = 0.0) -> Any:
        """Open3D tensor ``PointCloud`` (CPU) with ``positions``, ``colors``, ``features`` (float32; Open3D
        has no float16) and ``weights [N, 1]`` of the voxels with weight above ``min_weight``."""
        import open3d as o3d

        keep = (self.weights > min_weight).cpu()
        pc = o3d.t.geometry.PointCloud(_o3d_tensor(o3d, self.positions.cpu()[keep].numpy()))
        pc.point.colors = _o3d_tensor(o3d, self.colors.cpu()[keep].numpy())
        pc.point.features = _o3d_tensor(o3d, self.features.cpu()[keep].to(torch.float32).numpy())
        pc.point.weights = _o3d_tensor(o3d, self.weights.cpu()[keep].numpy()[:, None])
        return pc

    def pca_colors(self) -> np.ndarray:
        """``[N, 3]`` float32 in [0, 1]: the features' first three principal components."""
        from ua3d.rgbd.points import pca_colors

        if self._n == 0:
            return np.zeros((0, 3), np.float32)
        return pca_colors(self.features.cpu().to(torch.float32)).numpy()

    def state(self) -> dict[str, np.ndarray]:
        """Everything :meth:`save` writes to ``.npz`` (numpy arrays)."""
        meta = {
            "voxel_size": self.voxel_size,
            "channels": self.channels,
            "dtype": str(self.dtype).removeprefix("torch."),
            "depth_max": self.depth_max,
            "work_width": self.work_width,
            "fit_width": self.fit_width,
            "agreement_tau": self.agreement_tau,
            "depth_weight": self.depth_weight,
            "fit_config": self.fit_config.to_dict(),
            "lr_size": self.lr_size,
            "frames": self.frames,
            "skipped": self.skipped,
        }
        return {
            "format": np.array(FORMAT),
            "format_version": np.array(FORMAT_VERSION, np.int64),
            "meta": np.array(json.dumps(meta)),
            "keys": self.keys.cpu().numpy(),
            "features": self.features.cpu().numpy(),
            "weights": self.weights.cpu().numpy(),
            "positions": self.positions.cpu().numpy(),
            "colors": self.colors.cpu().numpy(),
            "observations": self.observations.cpu().numpy(),
            "poses": np.asarray(self.poses, np.float64).reshape(-1, 4, 4),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``.npz`` (lossless) or ``.ply`` (PCA colours as uchar); see the module docstring."""
        p = Path(path)
        suffix = p.suffix.lower()
        if suffix not in (".npz", ".ply"):
            raise ValueError(f"map file must end in .npz or .ply, got {p}")
        p.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".npz":
            tmp = p.with_name(p.name + ".tmp.npz")
            np.savez(tmp, **self.state())  # type: ignore[arg-type]
            os.replace(tmp, p)
            return p
        import open3d as o3d

        pc = o3d.t.geometry.PointCloud(_o3d_tensor(o3d, self.positions.cpu().numpy()))
        pc.point.colors = _o3d_tensor(o3d, np.round(self.pca_colors() * 255).astype(np.uint8))
        pc.point.weights = _o3d_tensor(o3d, self.weights.cpu().numpy()[:, None])
        pc.point.features = _o3d_tensor(o3d, self.features.cpu().to(torch.float32).numpy())
        if not o3d.t.io.write_point_cloud(p, pc, write_ascii=False):
            raise ValueError(f"Open3D could not write {p}")
        return p

    @classmethod
    def load(cls, path: str | os.PathLike, device: Any = "cpu") -> FeatureMap:
        """Read a map written by :meth:`save` (``.npz``). ``ValueError`` for a truncated or foreign file."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"map file not found: {p}")
        if p.suffix.lower() != ".npz":
            raise ValueError(f"only .npz maps can be loaded (the .ply export is lossy), got {p}")
        names = (
            "format",
            "format_version",
            "meta",
            "keys",
            "features",
            "weights",
            "positions",
            "colors",
            "observations",
            "poses",
        )
        try:
            with np.load(p, allow_pickle=False) as z:
                missing = [k for k in names if k not in z.files]
                if "format" in z.files and str(z["format"]) != FORMAT:
                    raise ValueError(f"{p} is not a ua3d feature map (format {str(z['format'])!r})")
                if missing:
                    raise ValueError(f"{p} is not a ua3d feature map: missing {missing}")
                version = int(z["format_version"])
                if version != FORMAT_VERSION:
                    raise ValueError(
                        f"{p} is a feature map of format version {version}; this ua3d reads version {FORMAT_VERSION}"
                    )
                d = {k: z[k] for k in names}
        except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
            raise ValueError(
                f"{p} is truncated or not an .npz feature map ({type(e).__name__}: {e})"
            ) from None
        except ValueError as e:
            if str(e).startswith(str(p)):
                raise
            raise ValueError(f"{p} is truncated or corrupt ({e})") from None
        try:
            meta = json.loads(str(d["meta"]))
            fit_kw: dict[str, Any] = {
                k: tuple(v) if isinstance(v, list) else v for k, v in meta["fit_config"].items()
            }
            m = cls(
                meta["voxel_size"],
                int(meta["channels"]),
                meta["dtype"],
                device,
                depth_max=meta["depth_max"],
                work_width=meta["work_width"],
                fit_width=meta["fit_width"],
                fit_config=FitConfig(**fit_kw),
                agreement_tau=meta["agreement_tau"],
                depth_weight=meta["depth_weight"],
            )
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{p} has bad map metadata: {e!r}") from None
        n = d["keys"].shape[0]
        shapes = {
            "keys": (n,),
            "features": (n, m.channels),
            "weights": (n,),
            "positions": (n, 3),
            "colors": (n, 3),
            "observations": (n,),
        }
        for k, s in shapes.items():
            if d[k].shape != s:
                raise ValueError(f"{p}: {k} has shape {d[k].shape}, expected {s}")
        if d["features"].dtype != np.dtype(meta["dtype"]):
            raise ValueError(f"{p}: features are {d['features'].dtype} but the map says {meta['dtype']}")
        if n and np.unique(d["keys"]).shape[0] != n:
            raise ValueError(f"{p}: duplicate voxel keys")
        m._grow(n)
        dev = m.device
        m._keys[:n] = torch.from_numpy(d["keys"]).to(dev)
        m._feat[:n] = torch.from_numpy(d["features"]).to(dev)
        m._w[:n] = torch.from_numpy(d["weights"]).to(dev)
        m._pos[:n] = torch.from_numpy(d["positions"]).to(dev)
        m._rgb[:n] = torch.from_numpy(d["colors"]).to(dev)
        m._obs[:n] = torch.from_numpy(d["observations"]).to(dev)
        m._n = n
        m._sorted, m._order = torch.sort(m._keys[:n])
        m.lr_size = None if meta["lr_size"] is None else tuple(meta["lr_size"])
        m.frames = int(meta["frames"])
        if d["poses"].shape != (m.frames, 4, 4):
            raise ValueError(f"{p}: poses has shape {d['poses'].shape}, expected {(m.frames, 4, 4)}")
        m.poses = list(d["poses"])
        m.skipped = [(int(i), str(r)) for i, r in meta["skipped"]]
        return m


# ---------------------------------------------------------------------- key packing
def _pack(c: torch.Tensor) -> torch.Tensor:
    c = c + _KEY_OFF
    return (c[:, 0] << (2 * _KEY_BITS)) | (c[:, 1] << _KEY_BITS) | c[:, 2]


def _unpack(k: torch.Tensor) -> torch.Tensor:
    mask = (1 << _KEY_BITS) - 1
    return torch.stack([(k >> (2 * _KEY_BITS)) & mask, (k >> _KEY_BITS) & mask, k & mask], 1) - _KEY_OFF


def _o3d_tensor(o3d: Any, a: np.ndarray) -> Any:
    """An Open3D tensor holding a copy of ``a``."""
    return o3d.core.Tensor.from_numpy(np.ascontiguousarray(a).copy())


def _device_free(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return available_memory_bytes()
