"""Reading and writing RGB-D frames, intrinsics, trajectories, feature volumes and feature point clouds.

Formats
-------
* colour: any 8-bit image OpenCV reads, returned as uint8 RGB ``[H, W, 3]``.
* depth: single-channel 16-bit PNG of raw units (default millimetres, ``depth_scale = 1000``;
  TUM uses 5000); 0 is a hole.
* intrinsics: Open3D JSON ``{"width", "height", "intrinsic_matrix": 9 numbers, column-major}``.
* trajectory: Redwood ``.log``: per frame one line ``i j n`` and four lines of the 4x4
  camera-to-world pose.
* feature volume (``.npz``, :func:`save_volume`): ``volume [C, D, H, W]`` float32 (or float16),
  ``mass [D, H, W]`` float32 (weight mass per voxel), ``bin_depths [D]`` metres (strictly
  increasing), ``K [3, 3]`` and ``image_size [2] = (H, W)`` of the volume grid, optional ``pose
  [4, 4]`` (camera-to-world), ``normalized`` (1 if ``volume`` already holds mass-normalised
  features, 0 if it holds weighted sums), optional ``rgb [Hr, Wr, 3]`` uint8 and ``depth [Hr, Wr]``
  metres of the guiding RGB-D frame (its camera is the volume camera resized to ``Wr x Hr``).
* feature point cloud (``.ply`` / ``.npz`` / ``.pcd``, :func:`save_feature_points`): the one format of
  :mod:`ua3d.rgbd.formats` (PLY with uchar RGB and ``features_i`` properties; lossless ``.npz``).

Every ``.npz`` reader refuses a file of the wrong kind with one clear message (:func:`ua3d.rgbd.formats.read_npz`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ua3d.core.checks import check_number
from ua3d.core.memory import check_memory
from ua3d.rgbd.camera import PinholeCamera, check_rigid
from ua3d.rgbd.formats import read_npz, read_point_cloud, write_point_cloud

PathLike = str | os.PathLike

#: largest decoded image the readers accept by default (pixels); override per call with
#: ``max_pixels=`` or for the process with the ``UA3D_MAX_IMAGE_PIXELS`` environment variable
MAX_IMAGE_PIXELS = 1 << 27  # 134 M pixels, e.g. 16384 x 8192

__all__ = [
    "check_volume",
    "load_feature_points",
    "load_volume",
    "read_color",
    "read_depth",
    "read_depth_raw",
    "read_ids",
    "read_intrinsics",
    "read_trajectory_log",
    "save_feature_points",
    "save_volume",
    "volume_record",
    "write_color",
    "write_depth",
    "write_ids",
    "write_intrinsics",
    "write_trajectory_log",
    "write_volume_record",
]


def _existing(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    return p


def _max_pixels(max_pixels: int | None) -> int:
    if max_pixels is None:
        env = os.environ.get("UA3D_MAX_IMAGE_PIXELS")
        if not env:
            return MAX_IMAGE_PIXELS
        try:
            return int(float(env))
        except ValueError:
            raise ValueError(f"UA3D_MAX_IMAGE_PIXELS must be a number of pixels, got {env!r}") from None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    return int(max_pixels)


def _header(p: Path, what: str) -> tuple[int, int, int, str]:
    """``(width, height, bytes per pixel, format)`` from the file's header, without decoding it."""
    from PIL import Image, UnidentifiedImageError

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # only the header is read here; our own limit applies (PIL's is restored)
    try:
        with Image.open(p) as im:
            w, h = im.size
            bands = len(im.getbands())
            depth = 2 if im.mode in ("I;16", "I;16B", "I;16L", "I", "F") else 1
            return int(w), int(h), bands * depth, str(im.format)
    except UnidentifiedImageError:
        return 0, 0, 0, ""  # a format PIL does not know: let OpenCV try
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"could not read {what} image {p}: corrupted header ({e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _check_complete(p: Path, fmt: str, what: str) -> None:
    """Refuse a truncated JPEG (OpenCV decodes it silently, grey rows for the missing part)."""
    if fmt != "JPEG":
        return
    data = p.read_bytes()
    if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):  # no end-of-image marker after the last scan
        raise ValueError(
            f"could not read {what} image {p}: truncated JPEG (no end-of-image marker after the last scan; "
            f"{len(data)} bytes)"
        )


def _imread(path: PathLike, what: str, max_pixels: int | None = None) -> np.ndarray:
    p = _existing(path, what)
    w, h, bpp, fmt = _header(p, what)
    limit = _max_pixels(max_pixels)
    if w * h > limit:
        raise ValueError(
            f"{what} image {p} decodes to {w}x{h} = {w * h / 1e6:.0f} M pixels ({w * h * bpp / 2**30:.2f} GiB), "
            f"above the limit of {limit / 1e6:.0f} M pixels: pass max_pixels={w * h} (or set "
            f"UA3D_MAX_IMAGE_PIXELS) if the image is trusted"
        )
    check_memory(w * h * max(bpp, 1) * 2, f"decoding {what} image {p} ({w}x{h})", "use a smaller image")
    _check_complete(p, fmt, what)
    img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"could not read {what} image {p} (not an image, corrupted or unsupported format)")
    return img


def _imwrite(path: PathLike, img: np.ndarray) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(p), img):
        raise ValueError(f"could not write image {p} (unsupported extension or unwritable location)")
    return p


# ---------------------------------------------------------------------- colour
def read_color(path: PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read an 8-bit colour image as uint8 RGB ``[H, W, 3]`` (grey is replicated, alpha dropped).

    ``max_pixels``: refuse images that decode to more pixels (default :data:`MAX_IMAGE_PIXELS`).
    Truncated or corrupted files raise ``ValueError`` naming the file.
    """
    img = _imread(path, "colour", max_pixels)
    if img.dtype != np.uint8:
        raise ValueError(f"colour image {path} must be 8-bit, got dtype {img.dtype}")
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def write_color(path: PathLike, rgb: np.ndarray) -> Path:
    """Write RGB ``[H, W, 3]`` (uint8, or float in [0, 1] which is rounded to uint8)."""
    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[2] != 3 or a.size == 0:
        raise ValueError(f"rgb must have shape [H, W, 3], got {a.shape}")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)):
            raise ValueError("rgb has NaN/Inf values")
        a = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8 or float in [0, 1], got dtype {a.dtype}")
    return _imwrite(path, cv2.cvtColor(a, cv2.COLOR_RGB2BGR))


# ---------------------------------------------------------------------- depth
def read_depth_raw(path: PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read a single-channel 16-bit depth PNG unchanged: uint16 ``[H, W]`` (``max_pixels``: see :func:`read_color`)."""
    img = _imread(path, "depth", max_pixels)
    if img.ndim != 2 or img.dtype != np.uint16:
        raise ValueError(
            f"depth image {path} must be single-channel 16-bit, got dtype {img.dtype} and shape {img.shape}"
        )
    return img


def read_depth(path: PathLike, depth_scale: float = 1000.0, max_pixels: int | None = None) -> np.ndarray:
    """Read a 16-bit depth PNG as float32 metres ``[H, W]`` (raw / ``depth_scale``; holes stay 0)."""
    check_number(depth_scale, "depth_scale", low=0, low_open=True)
    return read_depth_raw(path, max_pixels).astype(np.float32) / np.float32(depth_scale)


def write_depth(path: PathLike, depth: np.ndarray, depth_scale: float = 1000.0) -> Path:
    """Write metric depth ``[H, W]`` as a 16-bit PNG of ``round(depth * depth_scale)``.

    0, NaN and Inf are written as 0 (hole). Negative depth, or depth that does not fit in
    16 bits, raises ``ValueError``.
    """
    d = np.asarray(depth, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"depth must have shape [H, W], got {d.shape}")
    check_number(depth_scale, "depth_scale", low=0, low_open=True)
    finite = np.isfinite(d)
    if np.any(d[finite] < 0):
        raise ValueError(f"depth has negative values (min {d[finite].min():g})")
    raw = np.where(finite, np.round(d * depth_scale), 0.0)
    if raw.max() > 65535:
        raise ValueError(
            f"depth up to {d[finite].max():g} does not fit in 16 bits with depth_scale={depth_scale} "
            f"(max {65535 / depth_scale:g})"
        )
    if Path(path).suffix.lower() != ".png":
        raise ValueError(f"depth must be written as .png to keep 16 bits, got {path}")
    return _imwrite(path, raw.astype(np.uint16))


def read_ids(path: PathLike) -> np.ndarray:
    """Read an object-id PNG (8- or 16-bit, single channel) as int32 ``[H, W]``."""
    img = _imread(path, "id")
    if img.ndim != 2:
        raise ValueError(f"id image {path} must be single-channel, got shape {img.shape}")
    return img.astype(np.int32)


def write_ids(path: PathLike, ids: np.ndarray) -> Path:
    """Write integer ids ``[H, W]`` in [0, 65535] as an 8-bit (if max < 256) or 16-bit PNG."""
    a = np.asarray(ids)
    if a.ndim != 2 or a.size == 0 or a.dtype.kind not in "iu":
        raise ValueError(f"ids must be an integer array [H, W], got dtype {a.dtype} and shape {a.shape}")
    if a.min() < 0 or a.max() > 65535:
        raise ValueError(f"ids must lie in [0, 65535], got range [{a.min()}, {a.max()}]")
    return _imwrite(path, a.astype(np.uint8 if a.max() < 256 else np.uint16))


# ---------------------------------------------------------------------- intrinsics / poses
def read_intrinsics(path: PathLike) -> PinholeCamera:
    """Read Open3D intrinsics JSON (``intrinsic_matrix`` column-major) into a :class:`PinholeCamera`."""
    p = _existing(path, "intrinsics")
    try:
        d = json.loads(p.read_text())
        m = np.asarray(d["intrinsic_matrix"], dtype=np.float64)
        width, height = int(d["width"]), int(d["height"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"could not parse Open3D intrinsics JSON {p}: {e!r}") from None
    if m.size != 9:
        raise ValueError(f"intrinsic_matrix in {p} must have 9 entries, got {m.size}")
    K = m.reshape(3, 3).T  # Open3D stores it column-major: [fx, 0, 0, 0, fy, 0, cx, cy, 1]
    if (K[2, 0] or K[2, 1]) and not (K[0, 2] or K[1, 2]):
        raise ValueError(
            f"intrinsic_matrix in {p} is row-major ([fx, 0, cx, 0, fy, cy, 0, 0, 1]: the principal point "
            f"({K[2, 0]:g}, {K[2, 1]:g}) is in the slots of the last row); Open3D's JSON is column-major: write "
            f"[fx, 0, 0, 0, fy, 0, cx, cy, 1] (e.g. with ua3d.io.rgbd.write_intrinsics)"
        )
    try:
        return PinholeCamera.from_K(K, width, height)
    except ValueError as e:
        raise ValueError(f"bad intrinsics in {p}: {e}") from None


def write_intrinsics(path: PathLike, camera: PinholeCamera) -> Path:
    """Write Open3D intrinsics JSON (column-major ``intrinsic_matrix``); the pose is not stored."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    d = {"width": camera.width, "height": camera.height, "intrinsic_matrix": camera.K.T.reshape(-1).tolist()}
    p.write_text(json.dumps(d, indent=4) + "\n")
    return p


def read_trajectory_log(path: PathLike, return_metadata: bool = False) -> Any:
    """Read a Redwood ``.log`` trajectory.

    Returns
    -------
    poses : float64 ``[N, 4, 4]`` camera-to-world; with ``return_metadata`` also int64 ``[N, 3]``
        (the ``i j n`` line of each entry).
    """
    p = _existing(path, "trajectory")
    rows = [line.split() for line in p.read_text().splitlines() if line.strip()]
    if len(rows) % 5 != 0:
        raise ValueError(f"trajectory {p} must have 5 non-empty lines per entry, got {len(rows)} lines")
    try:
        meta = np.array([[int(x) for x in rows[i]] for i in range(0, len(rows), 5)], dtype=np.int64)
        poses = np.array(
            [[[float(x) for x in rows[i + r]] for r in range(1, 5)] for i in range(0, len(rows), 5)],
            dtype=np.float64,
        )
    except ValueError as e:
        raise ValueError(f"could not parse trajectory {p}: {e}") from None
    if meta.ndim != 2 or meta.shape[1] != 3 or poses.shape[1:] != (4, 4):
        raise ValueError(f"trajectory {p} entries must be a line 'i j n' then a 4x4 matrix")
    for n, T in enumerate(poses):
        if not np.all(np.isfinite(T)):
            raise ValueError(f"trajectory {p}: pose {n} (frame {int(meta[n, 0])}) has NaN/Inf entries")
        if not np.allclose(T[3], [0.0, 0.0, 0.0, 1.0]):
            raise ValueError(f"trajectory {p}: pose {n} last row must be [0, 0, 0, 1], got {T[3].tolist()}")
        try:
            check_rigid(T[:3, :3], f"pose {n}")
        except ValueError as e:
            raise ValueError(f"trajectory {p}: {e}") from None
    return (poses, meta) if return_metadata else poses


def write_trajectory_log(path: PathLike, poses: np.ndarray, metadata: np.ndarray | None = None) -> Path:
    """Write camera-to-world poses ``[N, 4, 4]`` as a Redwood ``.log`` (default metadata ``i i i+1``)."""
    P = np.asarray(poses, dtype=np.float64)
    if P.ndim != 3 or P.shape[1:] != (4, 4) or P.shape[0] == 0:
        raise ValueError(f"poses must have shape [N, 4, 4] with N > 0, got {P.shape}")
    meta = (
        np.asarray(metadata)
        if metadata is not None
        else np.stack([np.arange(len(P)), np.arange(len(P)), np.arange(len(P)) + 1], axis=1)
    )
    if meta.shape != (len(P), 3):
        raise ValueError(f"metadata must have shape [{len(P)}, 3], got {meta.shape}")
    lines = []
    for m, T in zip(meta, P):
        lines.append(" ".join(str(int(x)) for x in m))
        lines.extend(" ".join(repr(float(x)) for x in row) for row in T)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines) + "\n")
    return p


# ---------------------------------------------------------------------- feature volumes
def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _all_finite(a: np.ndarray) -> bool:
    """``np.isfinite(a).all()``; float16 through its exponent bits (numpy's float16 ``isfinite`` is
    scalar code: 0.3-0.6 s of CPU on the demo's 300 MB volume, the bit test 0.09 s)."""
    if a.dtype == np.float16 and a.size:  # Inf/NaN: all five exponent bits set
        bits = np.ascontiguousarray(a).view(np.uint16).reshape(len(a), -1)
        return all(int(np.max(row & np.uint16(0x7C00))) != 0x7C00 for row in bits)
    return bool(np.all(np.isfinite(a)))


def check_volume(volume: np.ndarray, mass: np.ndarray, bin_depths: np.ndarray, camera: PinholeCamera) -> None:
    """Raise ``ValueError`` unless volume ``[C, D, H, W]``, mass ``[D, H, W]``, bin_depths ``[D]``
    (positive, strictly increasing) and the camera (``W x H``) are consistent and finite."""
    if mass is None:
        raise ValueError("mass is required: a feature volume needs its weight mass [D, H, W]")
    if volume.ndim != 4:
        raise ValueError(f"volume must have shape [C, D, H, W], got {volume.shape}")
    if volume.shape[0] == 0 or 0 in volume.shape:
        raise ValueError(f"volume must have at least one channel and non-empty D, H, W, got {volume.shape}")
    if mass.shape != volume.shape[1:]:
        raise ValueError(f"mass must have shape [D, H, W] = {volume.shape[1:]}, got {mass.shape}")
    if bin_depths.shape != (volume.shape[1],):
        raise ValueError(f"bin_depths must have shape [D] = ({volume.shape[1]},), got {bin_depths.shape}")
    if not (np.all(np.isfinite(bin_depths)) and np.all(bin_depths > 0) and np.all(np.diff(bin_depths) > 0)):
        raise ValueError(f"bin_depths must be positive, finite and strictly increasing, got {bin_depths}")
    if not _all_finite(volume) or not _all_finite(mass):
        raise ValueError("volume and mass must be finite (no NaN/Inf)")
    if np.any(mass < 0):
        raise ValueError(f"mass must be non-negative, got min {mass.min():g}")
    camera.check_image(volume.shape[2], volume.shape[3], "volume")


def volume_record(
    volume: Any,
    mass: Any,
    bin_depths: Any,
    camera: PinholeCamera,
    rgb: Any | None = None,
    depth: Any | None = None,
    normalized: bool = True,
) -> dict[str, Any]:
    """The in-memory form of a feature volume, checked once: the dict :func:`load_volume` returns
    (what the viewers draw), built from arrays without a file.

    ``volume [C, D, H, W]`` keeps float16 (other dtypes become float32), ``mass [D, H, W]`` float32,
    ``bin_depths [D]`` float64; ``rgb`` uint8 ``[Hr, Wr, 3]`` and ``depth`` ``[Hr, Wr]`` metres are the
    optional guide frame. Arrays already of those dtypes are not copied.
    """
    vol = _np(volume)
    vol = vol if vol.dtype in (np.float16, np.float32) else vol.astype(np.float32)
    m = _np(mass).astype(np.float32, copy=False)
    bins = _np(bin_depths).astype(np.float64, copy=False)
    check_volume(vol, m, bins, camera)
    rgb8 = None if rgb is None else _check_rgb(_np(rgb), "rgb")
    return {
        "volume": vol,
        "mass": m,
        "bin_depths": bins,
        "camera": camera,
        "normalized": bool(normalized),
        "rgb": rgb8,
        "depth": None if depth is None else _check_guide_depth(_np(depth), rgb8),
    }


def save_volume(
    path: PathLike,
    volume: Any,
    mass: Any,
    bin_depths: Any,
    camera: PinholeCamera,
    rgb: Any | None = None,
    depth: Any | None = None,
    normalized: bool = True,
    compressed: bool = False,
    compress_level: int | None = None,
) -> Path:
    """Save a feature volume ``[C, D, H, W]`` with mass ``[D, H, W]`` to ``.npz`` (format: module doc).

    ``camera`` holds the intrinsics of the ``W x H`` volume grid (and optionally its pose);
    ``rgb`` uint8 ``[Hr, Wr, 3]`` and ``depth`` ``[Hr, Wr]`` metres are the optional guide frame.
    A float16 volume stays float16 (half the file); other dtypes are stored as float32.
    ``compressed``: deflate the arrays (``np.savez_compressed``); ``compress_level`` (1-9, default
    zlib's 6) trades file size for time: level 1 wrote the demo's float16 volume ~3x faster for a
    ~25% larger file. Any level is an ordinary ``.npz`` (``np.load`` reads it).
    """
    _check_compress_level(compressed, compress_level)
    rec = volume_record(volume, mass, bin_depths, camera, rgb, depth, normalized)
    return write_volume_record(path, rec, compressed, compress_level)


def _check_compress_level(compressed: bool, compress_level: int | None) -> None:
    if compress_level is not None and (
        isinstance(compress_level, bool) or compress_level not in range(1, 10) or not compressed
    ):
        raise ValueError(f"compress_level must be None or 1..9 with compressed=True, got {compress_level!r}")


def write_volume_record(
    path: PathLike, record: dict[str, Any], compressed: bool = False, compress_level: int | None = None
) -> Path:
    """:func:`save_volume` of a :func:`volume_record` (already checked: not checked again).
    Safe to run in a background thread (the demo does)."""
    _check_compress_level(compressed, compress_level)
    rec, camera = record, record["camera"]
    arrays: dict[str, np.ndarray] = {
        "volume": rec["volume"],
        "mass": rec["mass"],
        "bin_depths": rec["bin_depths"],
        "K": camera.K,
        "image_size": np.array([camera.height, camera.width], dtype=np.int64),
        "normalized": np.array(int(bool(rec["normalized"]))),
    }
    if camera.pose is not None:
        arrays["pose"] = camera.pose
    for key in ("rgb", "depth"):
        if rec[key] is not None:
            arrays[key] = rec[key]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if compress_level is not None:
        _savez_level(p, arrays, compress_level)
    else:
        (np.savez_compressed if compressed else np.savez)(p, **arrays)
    return p


def _savez_level(path: Path, arrays: dict[str, np.ndarray], level: int) -> None:
    """``np.savez_compressed`` with a chosen zlib level (the same archive layout: one ``name.npy``
    member per array). zlib releases the GIL while it deflates, so this can run in a thread."""
    import zipfile

    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")  # what np.savez does
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, allowZip64=True, compresslevel=level) as zf:
        for name, a in arrays.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)


def _check_rgb(rgb: np.ndarray, name: str) -> np.ndarray:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise ValueError(f"{name} must have shape [H, W, 3], got {rgb.shape}")
    if rgb.dtype.kind == "f":
        rgb = np.round(np.clip(rgb, 0, 1) * 255)
    return rgb.astype(np.uint8)


def _check_guide_depth(depth: np.ndarray, rgb: np.ndarray | None) -> np.ndarray:
    if depth.ndim != 2 or depth.size == 0:
        raise ValueError(f"depth must have shape [H, W], got {depth.shape}")
    if rgb is not None and depth.shape != rgb.shape[:2]:
        raise ValueError(f"depth shape {depth.shape} must match rgb shape {rgb.shape[:2]}")
    return depth.astype(np.float32)


def load_volume(path: PathLike, dtype: Any = None) -> dict[str, Any]:
    """Load a feature-volume ``.npz`` written by :func:`save_volume`.

    ``dtype``: None (default) keeps the stored float16 or float32 volume as it is (no copy: casting
    the demo's 300 MB float16 volume to float32 took ~0.3-0.6 s and 600 MB, and the viewer pools a
    float16 volume channel by channel); ``np.float32`` casts it to float32.

    Returns
    -------
    dict with ``volume [C, D, H, W]`` (float16 or float32, see ``dtype``), ``mass [D, H, W]``
    float32, ``bin_depths [D]`` float64, ``camera`` (:class:`PinholeCamera` of the volume grid),
    ``normalized`` (bool), and ``rgb`` / ``depth`` (arrays or None): the dict of
    :func:`volume_record`.
    """
    if dtype is not None and np.dtype(dtype).kind != "f":
        raise ValueError(f"dtype must be None or a float dtype, got {dtype!r}")
    p = Path(path)
    data = read_npz(p, "feature volume", ("volume", "mass", "bin_depths"))
    for key in ("K", "image_size"):
        if key not in data:
            raise ValueError(f"volume file {p} has no '{key}' array (keys: {sorted(data)})")
    h, w = (int(x) for x in data["image_size"])
    camera = PinholeCamera.from_K(data["K"], w, h, data.get("pose"))
    vol = data["volume"] if dtype is None else data["volume"].astype(dtype, copy=False)
    rec = volume_record(
        vol,
        data["mass"],
        data["bin_depths"],
        camera,
        normalized=bool(data.get("normalized", np.array(1))),
    )
    rec["rgb"], rec["depth"] = data.get("rgb"), data.get("depth")
    return rec


# ---------------------------------------------------------------------- feature point clouds
def save_feature_points(
    path: PathLike,
    positions: Any,
    features: Any,
    colors: Any | None = None,
    compressed: bool = False,
    color_mode: str = "rgb",
) -> Path:
    """Save a feature point cloud ``positions [N, 3]``, ``features [N, C]``, ``colors [N, 3]`` (uint8 or
    float in [0, 1], default mid grey) as ``.ply``, ``.npz`` or ``.pcd`` (:mod:`ua3d.rgbd.formats`)."""
    cols = None if colors is None else _np(colors)
    return write_point_cloud(
        path,
        _np(positions).astype(np.float32),
        cols,
        _np(features).astype(np.float32),
        color_mode=color_mode,
        compressed=compressed,
    )


def load_feature_points(path: PathLike) -> dict[str, np.ndarray]:
    """Load a feature point cloud (``.ply``/``.npz``/``.pcd``): dict with ``positions``, ``colors``
    (float [0, 1]), ``features`` (float32), ``color_mode``."""
    d = read_point_cloud(path)
    return {
        "positions": d["positions"],
        "colors": d["colors"],
        "features": np.asarray(d["features"], np.float32),
        "color_mode": d["color_mode"],
    }
