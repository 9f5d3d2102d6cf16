"""Pinhole camera model and depth back-projection / projection.

Convention (the same as Open3D's ``PointCloud.create_from_depth_image``)
-----------------------------------------------------------------------
A pixel ``(u, v)`` is (column, row); integer coordinates are pixel *centres*, so the top-left
pixel centre is ``(0, 0)`` and a ``W x H`` image spans ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``.
Camera coordinates are x right, y down, z forward (metres), and a pixel with z-depth ``z`` maps to

    x = (u - cx) * z / fx,    y = (v - cy) * z / fy,    z = z.

Depth maps hold z-depth (distance along the optical axis, not along the ray). ``pose`` is the
4x4 camera-to-world transform (``p_world = R @ p_cam + t``), the matrix of a Redwood ``.log``
trajectory; Open3D's ``extrinsic`` is its inverse (world-to-camera).

Note: Open3D's ``RaycastingScene.create_rays_pinhole`` places pixel centres at ``u + 0.5``
(half a pixel off this convention); :func:`pixel_rays` makes rays with the convention above.

Arrays may be ``torch.Tensor`` or ``numpy.ndarray``; :func:`backproject`, :func:`project` and
:func:`pixel_rays` return torch tensors on the input's device, in the input's floating dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ua3d.core.checks import check_number, depth_valid_mask

ArrayLike = torch.Tensor | np.ndarray

__all__ = [
    "PinholeCamera",
    "backproject",
    "check_rigid",
    "depth_to_metres",
    "depth_validity",
    "look_at",
    "pixel_rays",
    "project",
    "transform_points",
    "unproject",
]


def check_pose(pose: Any) -> np.ndarray | None:
    """The one pose rule: ``None`` (identity) or a finite rigid camera-to-world ``[4, 4]`` (float64 out)."""
    if pose is None:
        return None
    p = np.asarray(pose.detach().cpu() if isinstance(pose, torch.Tensor) else pose, dtype=np.float64)
    if p.shape != (4, 4):
        raise ValueError(f"pose must be a 4x4 camera-to-world matrix, got shape {tuple(p.shape)}")
    if not np.all(np.isfinite(p)):
        raise ValueError("pose must be finite, got NaN/Inf entries")
    if not np.allclose(p[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"pose last row must be [0, 0, 0, 1], got {p[3].tolist()}")
    check_rigid(p[:3, :3], "pose")
    return p


def check_rigid(R: np.ndarray, name: str = "pose", atol: float = 1e-4) -> None:
    """Raise unless ``R [3, 3]`` is a rotation (``R^T R = I`` within ``atol``, ``det R = +1``)."""
    err = float(np.abs(R.T @ R - np.eye(3)).max())
    det = float(np.linalg.det(R))
    if err > atol or det <= 0:
        raise ValueError(
            f"{name} must be a rigid camera-to-world transform: its 3x3 block is not a rotation "
            f"(max |R^T R - I| = {err:.3g}, det = {det:.3g}); scale, shear or reflection are not supported"
        )


@dataclass(frozen=True, eq=False)
class PinholeCamera:
    """Pinhole intrinsics for a ``width x height`` image plus an optional camera-to-world pose.

    Parameters
    ----------
    fx, fy : float
        Focal lengths in pixels (> 0).
    cx, cy : float
        Principal point in pixels (integer-pixel-centre convention, see module docstring).
    width, height : int
        Image size in pixels (> 0).
    pose : array [4, 4] or None
        Camera-to-world transform (float64 numpy after construction); ``None`` means identity.
    """

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    pose: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        vals = {}
        for k in ("fx", "fy", "cx", "cy"):
            v = check_number(getattr(self, k), k, finite=False)
            if not np.isfinite(v):
                raise ValueError(f"{k} must be finite, got {v}")
            vals[k] = v
            object.__setattr__(self, k, v)
        if vals["fx"] <= 0 or vals["fy"] <= 0:
            raise ValueError(f"fx and fy must be positive, got fx={vals['fx']}, fy={vals['fy']}")
        for k in ("width", "height"):
            v = getattr(self, k)
            if (
                isinstance(v, (bool, str, bytes))
                or not isinstance(v, (int, float, np.integer, np.floating))
                or (not np.isfinite(v))
            ):
                raise ValueError(f"{k} must be a positive integer, got {type(v).__name__} {v!r}")
            if int(v) != v or int(v) <= 0:
                raise ValueError(f"{k} must be a positive integer, got {v}")
            object.__setattr__(self, k, int(v))
        object.__setattr__(self, "pose", check_pose(self.pose))

    # ------------------------------------------------------------------ constructors / export
    @classmethod
    def from_K(cls, K: ArrayLike, width: int, height: int, pose: ArrayLike | None = None) -> PinholeCamera:
        """Build from a 3x3 intrinsic matrix ``K`` (row-major ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]``)."""
        k = np.asarray(K.detach().cpu() if isinstance(K, torch.Tensor) else K, dtype=np.float64)
        if k.shape != (3, 3):
            raise ValueError(f"K must have shape (3, 3), got {tuple(k.shape)}")
        if not np.all(np.isfinite(k)):
            raise ValueError(f"K must be finite, got {k.tolist()}")
        if k[2, 0] != 0 or k[2, 1] != 0 or k[2, 2] != 1:
            hint = (
                (
                    " (it looks transposed: the principal point is in the last row; an Open3D JSON stores "
                    "intrinsic_matrix column-major)"
                )
                if (k[2, 0] or k[2, 1]) and not (k[0, 2] or k[1, 2])
                else ""
            )
            raise ValueError(f"K must have last row [0, 0, 1], got {k[2].tolist()}{hint}")
        if k[1, 0] != 0:
            raise ValueError(f"K must be upper triangular (K[1, 0] = 0), got {k.tolist()}")
        if abs(k[0, 1]) > 1e-9 * max(abs(k[0, 0]), 1.0):
            raise ValueError(
                f"K has skew K[0, 1] = {k[0, 1]:g}; PinholeCamera models zero skew only (an Open3D pinhole): "
                f"rectify the images or set the skew to 0 if it is negligible"
            )
        return cls(k[0, 0], k[1, 1], k[0, 2], k[1, 2], width, height, pose)

    @classmethod
    def from_open3d(cls, intrinsic: Any, pose: ArrayLike | None = None) -> PinholeCamera:
        """Build from ``open3d.camera.PinholeCameraIntrinsic`` or ``PinholeCameraParameters``.

        For ``PinholeCameraParameters`` the pose is the inverse of its (world-to-camera)
        ``extrinsic`` unless ``pose`` is given.
        """
        if hasattr(intrinsic, "extrinsic") and hasattr(intrinsic, "intrinsic"):
            if pose is None:
                pose = np.linalg.inv(np.asarray(intrinsic.extrinsic, dtype=np.float64))
            intrinsic = intrinsic.intrinsic
        return cls.from_K(np.asarray(intrinsic.intrinsic_matrix), intrinsic.width, intrinsic.height, pose)

    def to_open3d(self) -> Any:
        """Return an ``open3d.camera.PinholeCameraIntrinsic`` (imports open3d lazily)."""
        import open3d as o3d

        return o3d.camera.PinholeCameraIntrinsic(self.width, self.height, self.fx, self.fy, self.cx, self.cy)

    def to_open3d_parameters(self) -> Any:
        """Return ``open3d.camera.PinholeCameraParameters`` with extrinsic = inverse pose."""
        import open3d as o3d

        params = o3d.camera.PinholeCameraParameters()
        params.intrinsic = self.to_open3d()
        params.extrinsic = self.world_to_camera
        return params

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (JSON-friendly); inverse of :meth:`from_dict`."""
        d: dict[str, Any] = {k: getattr(self, k) for k in ("fx", "fy", "cx", "cy", "width", "height")}
        d["pose"] = None if self.pose is None else self.pose.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PinholeCamera:
        return cls(d["fx"], d["fy"], d["cx"], d["cy"], d["width"], d["height"], d.get("pose"))

    # ------------------------------------------------------------------ derived quantities
    @property
    def K(self) -> np.ndarray:
        """3x3 intrinsic matrix, float64."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    @property
    def camera_to_world(self) -> np.ndarray:
        """4x4 camera-to-world pose (identity when ``pose`` is None), float64."""
        return np.eye(4) if self.pose is None else self.pose.copy()

    @property
    def world_to_camera(self) -> np.ndarray:
        """4x4 world-to-camera transform (Open3D's ``extrinsic``), float64."""
        return np.linalg.inv(self.camera_to_world)

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``."""
        return self.height, self.width

    def with_pose(self, pose: ArrayLike | None) -> PinholeCamera:
        """Copy with another camera-to-world pose."""
        return PinholeCamera(self.fx, self.fy, self.cx, self.cy, self.width, self.height, pose)

    def scaled(self, sx: float, sy: float | None = None) -> PinholeCamera:
        """Camera for the image resized by ``(sx, sy)`` (new size ``round(width * sx)`` etc.).

        Half-pixel-correct rule: pixel edges scale, centres do not, so a point at ``u`` maps to
        ``(u + 0.5) * sx - 0.5``: ``fx' = sx fx``, ``cx' = sx (cx + 0.5) - 0.5`` (same for y).
        """
        sy = sx if sy is None else sy
        if not (sx > 0 and sy > 0 and np.isfinite(sx) and np.isfinite(sy)):
            raise ValueError(f"scale factors must be positive and finite, got sx={sx}, sy={sy}")
        w, h = round(self.width * sx), round(self.height * sy)
        if w < 1 or h < 1:
            raise ValueError(f"scaled size must be >= 1 pixel, got {w}x{h} from sx={sx}, sy={sy}")
        return PinholeCamera(
            self.fx * sx,
            self.fy * sy,
            sx * (self.cx + 0.5) - 0.5,
            sy * (self.cy + 0.5) - 0.5,
            w,
            h,
            self.pose,
        )

    def resized(self, width: int, height: int) -> PinholeCamera:
        """Camera for the image resized to exactly ``width x height`` (see :meth:`scaled`)."""
        if width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive, got {width}x{height}")
        cam = self.scaled(width / self.width, height / self.height)
        return PinholeCamera(cam.fx, cam.fy, cam.cx, cam.cy, width, height, self.pose)

    def check_image(self, height: int, width: int, name: str = "depth") -> None:
        """Raise ``ValueError`` when an image of ``height x width`` does not match the intrinsics."""
        if (height, width) != (self.height, self.width):
            raise ValueError(
                f"{name} has size {height}x{width} (HxW) but the camera intrinsics are for "
                f"{self.height}x{self.width}; use camera.resized(...) for resized images"
            )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PinholeCamera):
            return NotImplemented
        same = all(getattr(self, k) == getattr(other, k) for k in ("fx", "fy", "cx", "cy", "width", "height"))
        if self.pose is None or other.pose is None:
            return same and self.pose is None and other.pose is None
        return same and bool(np.array_equal(self.pose, other.pose))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        pose = "None" if self.pose is None else "4x4"
        return (
            f"PinholeCamera(fx={self.fx:g}, fy={self.fy:g}, cx={self.cx:g}, cy={self.cy:g}, "
            f"width={self.width}, height={self.height}, pose={pose})"
        )


# ---------------------------------------------------------------------- depth helpers
def depth_validity(depth: ArrayLike, depth_max: float | None = None) -> ArrayLike:
    """Mask of valid depth pixels: the one rule of :func:`ua3d.core.checks.depth_valid_mask`.

    0, NaN, Inf and values above ``depth_max`` are holes; a negative finite value raises ``ValueError``.

    Parameters
    ----------
    depth : tensor or ndarray, any shape
    depth_max : float or None
        Optional upper limit (same unit as ``depth``).

    Returns
    -------
    bool mask of the same shape and kind (torch in -> torch out, numpy in -> numpy out).
    """
    return depth_valid_mask(depth, "depth", depth_max=depth_max)


def depth_to_metres(raw: ArrayLike, depth_scale: float = 1000.0, dtype: Any = None) -> ArrayLike:
    """Convert raw sensor depth to metres: ``raw / depth_scale`` (1000 for mm, 5000 for TUM).

    Parameters
    ----------
    raw : tensor or ndarray, any shape (typically uint16)
    depth_scale : float
        Raw units per metre (> 0).
    dtype : torch/numpy dtype, optional
        Output dtype; default float32 for integer input, else the input's dtype.

    Returns
    -------
    metres of the same shape and kind as ``raw``; holes (0) stay 0.
    """
    check_number(depth_scale, "depth_scale", low=0, low_open=True)
    if isinstance(raw, torch.Tensor):
        out_dtype = dtype or (raw.dtype if raw.is_floating_point() else torch.float32)
        return raw.to(out_dtype) / depth_scale
    a = np.asarray(raw)
    out_dtype = np.dtype(dtype or (a.dtype if a.dtype.kind == "f" else np.float32))
    return a.astype(out_dtype) / np.asarray(depth_scale, dtype=out_dtype)


def _as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a tensor or numeric array: {e}") from None


def _float_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()


def transform_points(points: ArrayLike, T: ArrayLike) -> torch.Tensor:
    """Apply a 4x4 rigid transform: ``points [..., 3] -> R @ p + t`` in the points' dtype/device."""
    p = _as_tensor(points, "points")
    if p.ndim < 1 or p.shape[-1] != 3:
        raise ValueError(f"points must have shape [..., 3], got {tuple(p.shape)}")
    p = p.to(_float_dtype(p))
    M = _as_tensor(T, "T").to(device=p.device, dtype=p.dtype)
    if M.shape != (4, 4):
        raise ValueError(f"T must be 4x4, got {tuple(M.shape)}")
    return p @ M[:3, :3].T + M[:3, 3]


def unproject(u: ArrayLike, v: ArrayLike, z: ArrayLike, camera: PinholeCamera) -> torch.Tensor:
    """Camera-frame points for pixel coordinates ``u`` (column), ``v`` (row) and z-depth ``z``.

    Parameters
    ----------
    u, v, z : tensors broadcastable to a common shape ``S``

    Returns
    -------
    points : tensor [*S, 3] in the floating dtype of ``z``.
    """
    z = _as_tensor(z, "z")
    z = z.to(_float_dtype(z))
    u = _as_tensor(u, "u").to(device=z.device, dtype=z.dtype)
    v = _as_tensor(v, "v").to(device=z.device, dtype=z.dtype)
    x = (u - camera.cx) * z / camera.fx
    y = (v - camera.cy) * z / camera.fy
    x, y, z = torch.broadcast_tensors(x, y, z)
    return torch.stack([x, y, z], dim=-1)


def backproject(
    depth: ArrayLike,
    camera: PinholeCamera,
    mask: ArrayLike | None = None,
    frame: Literal["camera", "world"] = "camera",
    depth_max: float | None = None,
    allow_empty: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Back-project valid depth pixels to 3D points (row-major pixel order, like Open3D).

    Parameters
    ----------
    depth : tensor or ndarray [H, W] or [B, 1, H, W]
        Floating-point z-depth in metres (convert raw sensor values with :func:`depth_to_metres`).
        Holes (0, NaN, Inf, > ``depth_max``) are skipped; negative values are an error.
    camera : PinholeCamera
        Intrinsics for ``W x H`` (shared by the batch).
    mask : bool array [H, W] or [B, 1, H, W], optional
        Extra selection, combined with depth validity.
    frame : "camera" or "world"
        "world" applies ``camera.pose`` (identity when None).
    depth_max : float, optional
        Depth above this is treated as a hole.
    allow_empty : bool
        Return empty outputs instead of raising when no pixel is valid.

    Returns
    -------
    points : tensor [N, 3], dtype/device of ``depth``
    pixels : long tensor [N, 2] of (v, u) = (row, column) for [H, W] input, or [N, 3] of
        (b, v, u) for [B, 1, H, W] input.
    """
    d = _as_tensor(depth, "depth")
    if d.ndim == 4:
        if d.shape[1] != 1:
            raise ValueError(f"batched depth must have shape [B, 1, H, W], got {tuple(d.shape)}")
    elif d.ndim != 2:
        raise ValueError(f"depth must have shape [H, W] or [B, 1, H, W], got {tuple(d.shape)}")
    if not d.is_floating_point():
        raise ValueError(
            f"depth must be floating-point metres, got dtype {d.dtype}; convert raw values with depth_to_metres"
        )
    if d.numel() == 0:
        raise ValueError(f"depth is empty, shape {tuple(d.shape)}")
    camera.check_image(d.shape[-2], d.shape[-1], "depth")
    if frame not in ("camera", "world"):
        raise ValueError(f"frame must be 'camera' or 'world', got {frame!r}")
    valid = depth_valid_mask(d, "depth", depth_max=depth_max)
    if mask is not None:
        m = _as_tensor(mask, "mask").to(device=d.device)
        if m.shape != d.shape:
            raise ValueError(f"mask shape {tuple(m.shape)} does not match depth shape {tuple(d.shape)}")
        valid = valid & m.bool()
    if not allow_empty and not bool(valid.any()):
        raise ValueError(f"depth of shape {tuple(d.shape)} has no valid pixel (all holes)")
    idx = torch.nonzero(valid.reshape(-1, d.shape[-2], d.shape[-1]))  # [N, 3] (b, v, u)
    z = d.reshape(-1, d.shape[-2], d.shape[-1])[idx[:, 0], idx[:, 1], idx[:, 2]]
    pts = unproject(idx[:, 2], idx[:, 1], z, camera)
    if frame == "world" and camera.pose is not None:
        pts = transform_points(pts, camera.pose)
    pixels = idx if d.ndim == 4 else idx[:, 1:]
    return pts, pixels


def project(
    points: ArrayLike, camera: PinholeCamera, frame: Literal["camera", "world"] = "camera"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project 3D points to pixel coordinates (inverse of :func:`unproject`).

    Parameters
    ----------
    points : tensor or ndarray [..., 3]
    camera : PinholeCamera
    frame : "camera" or "world"
        "world" first applies the inverse of ``camera.pose``.

    Returns
    -------
    uv : tensor [..., 2] of (u, v) = (column, row); NaN where z <= 0
    z : tensor [...] camera z-depth
    """
    p = _as_tensor(points, "points")
    if p.ndim < 1 or p.shape[-1] != 3:
        raise ValueError(f"points must have shape [..., 3], got {tuple(p.shape)}")
    if frame not in ("camera", "world"):
        raise ValueError(f"frame must be 'camera' or 'world', got {frame!r}")
    p = p.to(_float_dtype(p))
    if frame == "world" and camera.pose is not None:
        p = transform_points(p, camera.world_to_camera)
    z = p[..., 2]
    zs = torch.where(z > 0, z, torch.full_like(z, float("nan")))
    uv = torch.stack([camera.fx * p[..., 0] / zs + camera.cx, camera.fy * p[..., 1] / zs + camera.cy], dim=-1)
    return uv, z


def pixel_rays(
    camera: PinholeCamera,
    frame: Literal["camera", "world"] = "camera",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origin and direction per pixel, directions scaled so their camera z-component is 1.

    With these directions a ray parameter ``t`` equals the z-depth of the hit point.

    Returns
    -------
    origins : tensor [H, W, 3]
    directions : tensor [H, W, 3]
    """
    if frame not in ("camera", "world"):
        raise ValueError(f"frame must be 'camera' or 'world', got {frame!r}")
    v, u = torch.meshgrid(
        torch.arange(camera.height, dtype=dtype, device=device),
        torch.arange(camera.width, dtype=dtype, device=device),
        indexing="ij",
    )
    dirs = unproject(u, v, torch.ones_like(u), camera)
    origins = torch.zeros_like(dirs)
    if frame == "world" and camera.pose is not None:
        R = torch.as_tensor(camera.pose[:3, :3], dtype=dtype, device=dirs.device)
        dirs = dirs @ R.T
        origins = origins + torch.as_tensor(camera.pose[:3, 3], dtype=dtype, device=dirs.device)
    return origins, dirs


def look_at(eye: ArrayLike, target: ArrayLike, up: ArrayLike = (0.0, 1.0, 0.0)) -> np.ndarray:
    """Camera-to-world pose ``[4, 4]`` (float64) of a camera at ``eye`` looking at ``target``.

    The camera's z axis points at ``target``, its y axis (image down) is opposite to ``up``.
    """
    e, t, u = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (eye, target, up))
    if e.shape != (3,) or t.shape != (3,) or u.shape != (3,):
        raise ValueError(f"eye, target and up must be 3-vectors, got {e.shape}, {t.shape}, {u.shape}")
    z = t - e
    if np.linalg.norm(z) == 0:
        raise ValueError("eye and target must differ")
    z /= np.linalg.norm(z)
    x = np.cross(z, u)
    if np.linalg.norm(x) < 1e-9:
        raise ValueError("up must not be parallel to the viewing direction")
    x /= np.linalg.norm(x)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = x, np.cross(z, x), z, e
    return pose
