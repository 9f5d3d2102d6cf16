"""Readers for real RGB-D / guided-depth-super-resolution datasets.

Every reader is a pure function of a folder: it checks the layout, builds one :class:`Sample` per frame
and returns them sorted by name. Nothing is read from disk until :meth:`Sample.load` is called, and the
files are never copied anywhere (arrays are read straight from the user's folder).

Conventions shared by all readers
---------------------------------
* ``rgb``: ``uint8`` array ``[H, W, 3]`` (RGB order).
* ``depth``: ``float32`` array ``[H, W]`` in the units named by ``meta.units``; **invalid pixels are NaN**
  (0, ``inf`` and other sensor "unknown" codes are mapped to NaN, never to a small depth).
* ``meta.intrinsics``: the 3x3 pinhole matrix of the colour camera at the returned resolution when the
  dataset ships one, else ``None``.

Units and conversions (see ``shared/data/README.md``)
-----------------------------------------------------
==================  =========================================================  =========
name                depth returned                                             units
==================  =========================================================  =========
middlebury-gdsr     8-bit hole-filled disparity-like values, as stored         ``0-255``
middlebury2005      ``160 * 3740 / (disp + dmin)`` with ``disp`` the PNG value  ``mm``
middlebury2014      ``baseline * f / (d + doffs)`` from ``disp0GT.pfm``         ``mm``
nyuv2               ``depth.npy`` / ``depths`` of the labelled ``.mat``          ``m``
redwood             uint16 PNG / ``depth_scale`` (1000)                         ``m``
tum                 uint16 PNG / ``depth_scale`` (5000)                         ``m``
sunrgbd             bit-rotated uint16 PNG ``(v >> 3) | (v << 13)`` / 1000      ``m``
nyu-raw             raw Kinect ``351.3 / (1092.5 - raw)``                       ``m``
park2011            8-bit hole-filled disparity (noisy LR inputs given)        ``0-255``
motorcycle          ``baseline * f / (d + doffs)`` of skimage's GT disparity    ``mm``
==================  =========================================================  =========
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "DATASETS",
    "NYUV2_DKN_TEST",
    "DepthMeta",
    "Sample",
    "disparity_to_depth",
    "load_dataset",
    "read_middlebury2005",
    "read_middlebury2014",
    "read_middlebury_gdsr",
    "read_motorcycle",
    "read_nyu_raw",
    "read_nyuv2",
    "read_park2011",
    "read_pfm",
    "read_redwood",
    "read_sunrgbd",
    "read_tum",
    "sample_to_tensors",
    "scaled_depth_png",
]

_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".ppm", ".bmp")

# Middlebury 2005/2006 (full size): focal length in pixels and baseline in mm (README).
_MB2005_FOCAL_PX = 3740.0
_MB2005_BASELINE_MM = 160.0

# skimage.data.stereo_motorcycle(): Middlebury 2014 Motorcycle at 1/4 size (README and skimage docstring).
_MOTO_F, _MOTO_CX, _MOTO_CY, _MOTO_DOFFS, _MOTO_BASELINE_MM = 994.978, 311.193, 254.877, 31.086, 193.001

# The 449-image NYUv2 test split of DKN / FDSR / DCTNet: labelled frames 1000..1448 (0-based).
NYUV2_DKN_TEST = range(1000, 1449)


@dataclass(frozen=True, eq=False)
class DepthMeta:
    """What is known about one frame.

    Attributes
    ----------
    dataset : str
        Registry name of the dataset (see :data:`DATASETS`).
    name : str
        Frame / scene identifier, unique within the dataset.
    units : str
        Units of the returned depth: ``"mm"``, ``"m"`` or ``"0-255"`` (Middlebury GDSR disparity-like).
    intrinsics : numpy.ndarray or None
        ``[3, 3]`` pinhole matrix of the colour camera at the returned resolution, if known.
    source : tuple of str
        Files the frame is read from.
    extra : dict
        Dataset-specific calibration (``baseline_mm``, ``doffs``, ``focal_px``, ``depth_scale``, ...).
    """

    dataset: str
    name: str
    units: str
    intrinsics: np.ndarray | None = None
    source: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Sample:
    """One RGB-D frame, read lazily.

    Attributes
    ----------
    meta : DepthMeta
        Metadata; available without reading the files.
    loader : callable
        ``loader() -> (rgb [H, W, 3] uint8, depth [H, W] float32 with NaN = invalid)``.
    """

    meta: DepthMeta
    loader: Callable[[], tuple[np.ndarray, np.ndarray]] = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        """Frame identifier (``meta.name``)."""
        return self.meta.name

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """Read the frame.

        Returns
        -------
        rgb : numpy.ndarray
            ``[H, W, 3]`` uint8.
        depth : numpy.ndarray
            ``[H, W]`` float32 in ``meta.units``, NaN where invalid.
        """
        rgb, depth = self.loader()
        if rgb.shape[:2] != depth.shape:
            raise ValueError(
                f"sample {self.meta.name!r} of {self.meta.dataset}: rgb shape {rgb.shape} and depth shape "
                f"{depth.shape} differ"
            )
        return rgb, depth


# ----------------------------------------------------------------------------------------------------------
# conversions and low-level readers
# ----------------------------------------------------------------------------------------------------------


def disparity_to_depth(
    disparity: np.ndarray, focal_px: float, baseline: float, doffs: float = 0.0, *, zero_invalid: bool = True
) -> np.ndarray:
    """Convert stereo disparity to depth: ``depth = baseline * focal_px / (disparity + doffs)``.

    Parameters
    ----------
    disparity : numpy.ndarray
        ``[...]`` disparity in pixels. Non-finite values are unknown.
    focal_px : float
        Focal length in pixels (same pixel units as ``disparity``).
    baseline : float
        Stereo baseline; the depth comes out in its units (e.g. mm).
    doffs : float
        Disparity offset (``x`` difference of the principal points; Middlebury 2005 calls it ``dmin``).
    zero_invalid : bool
        Treat ``disparity <= 0`` as unknown (Middlebury 8-bit PNGs use 0 for "no ground truth").

    Returns
    -------
    numpy.ndarray
        ``[...]`` float32 depth, NaN where the disparity is unknown or ``disparity + doffs <= 0``.
    """
    if not (np.isfinite(focal_px) and focal_px > 0 and np.isfinite(baseline) and baseline > 0):
        raise ValueError(f"focal_px and baseline must be positive and finite, got {focal_px}, {baseline}")
    d = np.asarray(disparity, dtype=np.float64)
    denom = d + float(doffs)
    bad = ~np.isfinite(d) | (denom <= 0)
    if zero_invalid:
        bad |= d <= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = baseline * focal_px / denom
    depth[bad] = np.nan
    return depth.astype(np.float32)


def scaled_depth_png(path: str | Path, depth_scale: float) -> np.ndarray:
    """Read a 16-bit depth PNG and convert it to metres: ``value / depth_scale``, 0 -> NaN.

    Parameters
    ----------
    path : str or Path
        uint16 (or uint8) single-channel PNG.
    depth_scale : float
        Raw units per metre: 1000 for Redwood / Kinect mm, 5000 for TUM.

    Returns
    -------
    numpy.ndarray
        ``[H, W]`` float32 metres, NaN where the sensor reported 0 (no measurement).
    """
    if not depth_scale > 0:
        raise ValueError(f"depth_scale must be positive, got {depth_scale}")
    raw = np.asarray(Image.open(path))
    if raw.ndim != 2 or raw.dtype.kind not in "ui":
        raise ValueError(f"{path}: expected a single-channel integer depth PNG, got {raw.dtype} {raw.shape}")
    depth = raw.astype(np.float32) / np.float32(depth_scale)
    depth[raw == 0] = np.nan
    return depth


def read_pfm(path: str | Path) -> np.ndarray:
    """Read a single-channel PFM (``Pf``) file, flipping its bottom-to-top rows to top-to-bottom.

    The header's scale only gives the byte order (negative: little-endian); values are returned as stored.
    (OpenCV 5.0's reader divides the values by ``|scale|``, so it is not used here.)

    Returns
    -------
    numpy.ndarray
        ``[H, W]`` float32.
    """
    with open(path, "rb") as fh:
        magic = fh.readline().strip()
        dims = fh.readline().split()
        scale = float(fh.readline().strip())
        payload = fh.read()
    if magic != b"Pf" or len(dims) != 2:
        raise ValueError(f"{path}: expected a single-channel 'Pf' PFM header, got {magic!r} {dims!r}")
    width, height = int(dims[0]), int(dims[1])
    dtype = np.dtype("<f4" if scale < 0 else ">f4")
    if len(payload) < width * height * 4:
        raise ValueError(
            f"{path}: {len(payload)} data bytes, expected {width * height * 4} for {width}x{height}"
        )
    data = np.frombuffer(payload, dtype=dtype, count=width * height).reshape(height, width)
    return np.flipud(data).astype(np.float32)


def _read_rgb(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _parse_calib(path: Path) -> dict[str, Any]:
    """Parse a Middlebury 2014 ``calib.txt`` (``key=value`` lines, matrices as ``[a b c; d e f; ...]``)."""
    calib: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        if "=" not in line:
            continue
        key, value = (s.strip() for s in line.split("=", 1))
        if value.startswith("["):
            rows = value.strip("[]").split(";")
            calib[key] = np.array([[float(v) for v in r.split()] for r in rows], dtype=np.float64)
        else:
            calib[key] = float(value)
    return calib


def _layout_error(name: str, root: Path, expected: str) -> ValueError:
    return ValueError(f"{name}: folder {str(root)!r} does not match the expected layout: {expected}")


def _check_dir(name: str, root: str | Path, expected: str) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise _layout_error(name, path, expected + " (the folder does not exist)")
    return path


# ----------------------------------------------------------------------------------------------------------
# dataset readers
# ----------------------------------------------------------------------------------------------------------

_GDSR_EXPECTED = (
    "pairs '<name>_output_color.png' + '<name>_output_depth.png', either one folder per scene "
    "(e.g. 02_Art/Middlebury_02_output_depth.png) or flat / in RGB/ and Depth/ subfolders"
)


def read_middlebury_gdsr(root: str | Path) -> list[Sample]:
    """Middlebury guided-depth-SR benchmark (DKN / DCTNet ``RawDatasets/Middlebury``).

    Files ``*_output_depth.png`` (8-bit hole-filled disparity-like values, units ``0-255``) are paired with
    ``*_output_color.png`` of the same prefix anywhere below ``root``; samples are sorted by prefix.
    """
    root = _check_dir("middlebury-gdsr", root, _GDSR_EXPECTED)
    colors = {p.name[: -len("_output_color.png")]: p for p in root.rglob("*_output_color.png")}
    samples = []
    for depth_path in sorted(root.rglob("*_output_depth.png"), key=lambda p: p.name):
        key = depth_path.name[: -len("_output_depth.png")]
        if key not in colors:
            raise _layout_error(
                "middlebury-gdsr", root, f"{_GDSR_EXPECTED}; no colour image for {depth_path}"
            )
        color_path = colors[key]

        def loader(c: Path = color_path, d: Path = depth_path) -> tuple[np.ndarray, np.ndarray]:
            return _read_rgb(c), np.asarray(Image.open(d).convert("L"), dtype=np.float32)

        folder = depth_path.parent
        name = folder.name if folder != root and folder.name.lower() != "depth" else key
        meta = DepthMeta("middlebury-gdsr", name, "0-255", None, (str(color_path), str(depth_path)))
        samples.append(Sample(meta, loader))
    if not samples:
        raise _layout_error("middlebury-gdsr", root, _GDSR_EXPECTED)
    return samples


_MB2005_EXPECTED = "one folder per scene with view1.png, disp1.png (8-bit, 0 = unknown) and dmin.txt"


def read_middlebury2005(root: str | Path) -> list[Sample]:
    """Middlebury 2005/2006 scenes: ``view1.png`` + ``disp1.png`` + ``dmin.txt`` per scene folder.

    Depth in mm: ``160 * 3740 / (disp + dmin)`` with the PNG value used as stored (the README states the
    8-bit values are in full-resolution disparity units at every image size); ``disp == 0`` -> NaN.
    """
    root = _check_dir("middlebury2005", root, _MB2005_EXPECTED)
    scenes = [p for p in sorted(root.iterdir()) if (p / "disp1.png").is_file()]
    if not scenes:
        raise _layout_error("middlebury2005", root, _MB2005_EXPECTED)
    samples = []
    for scene in scenes:
        if not ((scene / "view1.png").is_file() and (scene / "dmin.txt").is_file()):
            raise _layout_error("middlebury2005", scene, _MB2005_EXPECTED)
        dmin = float((scene / "dmin.txt").read_text().split()[0])

        def loader(s: Path = scene, dm: float = dmin) -> tuple[np.ndarray, np.ndarray]:
            disp = np.asarray(Image.open(s / "disp1.png").convert("L"))
            return _read_rgb(s / "view1.png"), disparity_to_depth(
                disp, _MB2005_FOCAL_PX, _MB2005_BASELINE_MM, dm, zero_invalid=True
            )

        extra = {"dmin": dmin, "focal_px_fullsize": _MB2005_FOCAL_PX, "baseline_mm": _MB2005_BASELINE_MM}
        source = (str(scene / "view1.png"), str(scene / "disp1.png"), str(scene / "dmin.txt"))
        samples.append(Sample(DepthMeta("middlebury2005", scene.name, "mm", None, source, extra), loader))
    return samples


_MB2014_EXPECTED = "one folder per scene with im0.png, disp0GT.pfm and calib.txt (MiddEval3 format)"


def read_middlebury2014(root: str | Path) -> list[Sample]:
    """Middlebury 2014 / MiddEval3 scenes: ``im0.png`` + ``disp0GT.pfm`` + ``calib.txt`` per scene folder.

    Depth in mm: ``baseline * f / (d + doffs)`` with ``f = cam0[0, 0]``; ``inf`` disparity -> NaN.
    ``root`` may also be a single scene folder.
    """
    root = _check_dir("middlebury2014", root, _MB2014_EXPECTED)
    scenes = [root] if (root / "disp0GT.pfm").is_file() else []
    scenes += [p for p in sorted(root.iterdir()) if p.is_dir() and (p / "disp0GT.pfm").is_file()]
    if not scenes:
        raise _layout_error("middlebury2014", root, _MB2014_EXPECTED)
    samples = []
    for scene in scenes:
        if not ((scene / "im0.png").is_file() and (scene / "calib.txt").is_file()):
            raise _layout_error("middlebury2014", scene, _MB2014_EXPECTED)
        calib = _parse_calib(scene / "calib.txt")
        if "cam0" not in calib or "baseline" not in calib or "doffs" not in calib:
            raise _layout_error("middlebury2014", scene, "calib.txt with cam0, doffs and baseline")
        k = calib["cam0"]

        def loader(s: Path = scene, c: dict = calib) -> tuple[np.ndarray, np.ndarray]:
            disp = read_pfm(s / "disp0GT.pfm")
            depth = disparity_to_depth(disp, c["cam0"][0, 0], c["baseline"], c["doffs"], zero_invalid=False)
            return _read_rgb(s / "im0.png"), depth

        extra = {"baseline_mm": calib["baseline"], "doffs": calib["doffs"], "focal_px": float(k[0, 0])}
        source = (str(scene / "im0.png"), str(scene / "disp0GT.pfm"), str(scene / "calib.txt"))
        samples.append(Sample(DepthMeta("middlebury2014", scene.name, "mm", k, source, extra), loader))
    return samples


_NYU_EXPECTED = (
    "either one folder per frame with rgb.jpg and depth.npy (metres), or the labelled "
    "nyu_depth_v2_labeled.mat (HDF5 with 'images' and 'depths')"
)
_NYU_K = np.array([[518.8579, 0.0, 325.5824], [0.0, 519.4696, 253.7362], [0.0, 0.0, 1.0]])


def _nyu_frames(root: Path) -> list[Sample]:
    samples = []
    for frame in sorted(p for p in root.iterdir() if p.is_dir() and (p / "depth.npy").is_file()):
        rgb_path = next((frame / f"rgb{e}" for e in _IMAGE_EXTS if (frame / f"rgb{e}").is_file()), None)
        if rgb_path is None:
            raise _layout_error("nyuv2", frame, _NYU_EXPECTED)

        def loader(r: Path = rgb_path, d: Path = frame / "depth.npy") -> tuple[np.ndarray, np.ndarray]:
            depth = np.load(d).astype(np.float32, copy=False)
            depth = np.where(depth > 0, depth, np.float32(np.nan))
            return _read_rgb(r), depth

        source = (str(rgb_path), str(frame / "depth.npy"))
        samples.append(Sample(DepthMeta("nyuv2", frame.name, "m", _NYU_K.copy(), source), loader))
    return samples


def _nyu_mat(path: Path, indices: range | list[int] | None) -> list[Sample]:
    import h5py

    with h5py.File(path, "r") as f:
        if "images" not in f or "depths" not in f:
            raise _layout_error("nyuv2", path, _NYU_EXPECTED)
        count = f["depths"].shape[0]
    chosen = [i for i in (NYUV2_DKN_TEST if indices is None else indices) if 0 <= i < count]
    if not chosen:
        which = "the DKN test split 1000-1448" if indices is None else f"indices {list(indices)[:5]}..."
        raise ValueError(f"nyuv2: {str(path)!r} has {count} frames; none of {which} is among them")

    def loader(i: int) -> tuple[np.ndarray, np.ndarray]:
        # MATLAB arrays come transposed through h5py: images [N, 3, W, H], depths [N, W, H].
        with h5py.File(path, "r") as f:
            rgb = np.ascontiguousarray(np.asarray(f["images"][i]).transpose(2, 1, 0))
            depth = np.asarray(f["depths"][i], dtype=np.float32).T
        return rgb, np.where(depth > 0, depth, np.float32(np.nan))

    return [
        Sample(
            DepthMeta("nyuv2", f"{i:04d}", "m", _NYU_K.copy(), (str(path),), {"index": i}),
            lambda i=i: loader(i),
        )
        for i in chosen
    ]


def read_nyuv2(root: str | Path, indices: range | list[int] | None = None) -> list[Sample]:
    """NYU Depth v2: DKN-style frame folders (``<id>/rgb.jpg`` + ``<id>/depth.npy``) or the labelled ``.mat``.

    Parameters
    ----------
    root : str or Path
        Folder of frame folders, a ``.mat`` file, or a folder holding ``nyu_depth_v2_labeled.mat``.
    indices : sequence of int, optional
        Frames of the ``.mat`` to use (0-based). Default: the 449-frame DKN test split
        (:data:`NYUV2_DKN_TEST`, frames 1000-1448). Ignored for frame folders.

    Depth in metres; in-painted, so normally fully valid (values <= 0 would be NaN). Intrinsics: the
    colour camera's (fx 518.8579, fy 519.4696, cx 325.5824, cy 253.7362).
    """
    path = Path(root)
    if path.is_file() and path.suffix == ".mat":
        return _nyu_mat(path, indices)
    path = _check_dir("nyuv2", path, _NYU_EXPECTED)
    if (path / "nyu_depth_v2_labeled.mat").is_file():
        return _nyu_mat(path / "nyu_depth_v2_labeled.mat", indices)
    samples = _nyu_frames(path)
    if not samples:
        raise _layout_error("nyuv2", path, _NYU_EXPECTED)
    return samples


_REDWOOD_EXPECTED = "color/ and depth/ folders (uint16 PNG depth in mm, 0 = hole), optional rgbd.match"


def _pair_files(root: Path, color_dir: Path, depth_dir: Path) -> list[tuple[Path, Path]]:
    match = root / "rgbd.match"
    if match.is_file():
        pairs = []
        for line in match.read_text().split("\n"):
            parts = line.split()
            if len(parts) >= 2:
                pairs.append((root / parts[1], root / parts[0]))
        return pairs
    colors = {p.stem: p for p in color_dir.iterdir() if p.suffix.lower() in _IMAGE_EXTS}
    return [(colors[d.stem], d) for d in sorted(depth_dir.glob("*.png")) if d.stem in colors]


def _intrinsics_json(path: Path) -> np.ndarray | None:
    """Open3D ``PinholeCameraIntrinsic`` JSON (``intrinsic_matrix`` column-major) -> ``[3, 3]``."""
    if not path.is_file():
        return None
    values = json.loads(path.read_text())["intrinsic_matrix"]
    return np.asarray(values, dtype=np.float64).reshape(3, 3).T


def read_redwood(root: str | Path, depth_scale: float = 1000.0) -> list[Sample]:
    """Redwood-style RGB-D sequence: ``color/*.jpg`` + ``depth/*.png`` (uint16 mm) -> depth in metres.

    Pairs come from ``rgbd.match`` (lines ``depth/xxx.png color/xxx.jpg``) when present, else by file stem.
    Intrinsics from ``camera_primesense.json`` (Open3D format) when present.
    """
    root = _check_dir("redwood", root, _REDWOOD_EXPECTED)
    color_dir, depth_dir = root / "color", root / "depth"
    if not (color_dir.is_dir() and depth_dir.is_dir()):
        raise _layout_error("redwood", root, _REDWOOD_EXPECTED)
    k = _intrinsics_json(root / "camera_primesense.json")
    pairs = _pair_files(root, color_dir, depth_dir)
    if not pairs or not all(c.is_file() and d.is_file() for c, d in pairs):
        raise _layout_error("redwood", root, _REDWOOD_EXPECTED + " with matching colour/depth files")
    return [
        Sample(
            DepthMeta("redwood", d.stem, "m", k, (str(c), str(d)), {"depth_scale": depth_scale}),
            lambda c=c, d=d: (_read_rgb(c), scaled_depth_png(d, depth_scale)),
        )
        for c, d in pairs
    ]


_TUM_EXPECTED = (
    "TUM RGB-D layout (rgb/ and depth/ folders of '<timestamp>.png'), or frame folders holding "
    "'*_color.*' and '*_depth.png' (uint16, metres = value / 5000)"
)


def _tum_timestamp_pairs(root: Path, max_dt: float) -> list[tuple[Path, Path]]:
    colors = sorted((float(p.stem), p) for p in (root / "rgb").glob("*.png"))
    if not colors:
        return []
    stamps = np.array([t for t, _ in colors])
    pairs = []
    for depth in sorted((root / "depth").glob("*.png")):
        t = float(depth.stem)
        j = int(np.argmin(np.abs(stamps - t)))
        if abs(stamps[j] - t) <= max_dt:
            pairs.append((colors[j][1], depth))
    return pairs


def read_tum(root: str | Path, depth_scale: float = 5000.0, max_dt: float = 0.02) -> list[Sample]:
    """TUM RGB-D frames -> depth in metres (``value / 5000``, 0 -> NaN).

    Accepts the TUM layout (``rgb/`` and ``depth/`` with timestamp file names, paired by nearest timestamp
    within ``max_dt`` seconds) or folders holding ``*_color.*`` + ``*_depth.png`` (Open3D's test frames).
    """
    root = _check_dir("tum", root, _TUM_EXPECTED)
    if (root / "rgb").is_dir() and (root / "depth").is_dir():
        try:
            pairs = _tum_timestamp_pairs(root, max_dt)
        except ValueError as err:
            raise _layout_error("tum", root, _TUM_EXPECTED + f" ({err})") from err
    else:
        pairs = []
        for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
            for depth in sorted(folder.glob("*_depth.png")):
                prefix = depth.name[: -len("_depth.png")]
                color = next(
                    (
                        folder / f"{prefix}_color{e}"
                        for e in _IMAGE_EXTS
                        if (folder / f"{prefix}_color{e}").is_file()
                    ),
                    None,
                )
                if color is not None:
                    pairs.append((color, depth))
    if not pairs:
        raise _layout_error("tum", root, _TUM_EXPECTED)
    samples = []
    for c, d in pairs:
        name = d.stem if d.parent.name == "depth" else f"{d.parent.name}/{d.stem}"
        meta = DepthMeta("tum", name, "m", None, (str(c), str(d)), {"depth_scale": depth_scale})
        samples.append(Sample(meta, lambda c=c, d=d: (_read_rgb(c), scaled_depth_png(d, depth_scale))))
    return samples


def read_motorcycle(root: str | Path | None = None) -> list[Sample]:
    """Middlebury 2014 Motorcycle from ``skimage.data.stereo_motorcycle()`` (quarter size, 741x500).

    ``root`` is ignored (the data ships with scikit-image). GT disparity NaN / inf = unknown -> NaN depth;
    depth in mm = ``193.001 * 994.978 / (d + 31.086)``.
    """

    def loader() -> tuple[np.ndarray, np.ndarray]:
        try:
            from skimage import data
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ValueError("motorcycle: needs scikit-image (pip install scikit-image)") from err
        left, _, disp = data.stereo_motorcycle()
        return left, disparity_to_depth(disp, _MOTO_F, _MOTO_BASELINE_MM, _MOTO_DOFFS, zero_invalid=False)

    k = np.array([[_MOTO_F, 0.0, _MOTO_CX], [0.0, _MOTO_F, _MOTO_CY], [0.0, 0.0, 1.0]])
    extra = {"baseline_mm": _MOTO_BASELINE_MM, "doffs": _MOTO_DOFFS, "focal_px": _MOTO_F}
    return [
        Sample(
            DepthMeta("motorcycle", "Motorcycle", "mm", k, ("skimage.data.stereo_motorcycle",), extra), loader
        )
    ]


_PARK_EXPECTED = (
    "scene folders holding '*_big_color.png', 'gt_holefilled.png' and the noisy inputs 'depth_{1..4}_n.png' "
    "(x2, x4, x8, x16) with 'weight_{1..4}_n.png' (Park et al. 2011, as shared by Barron & Poole)"
)


def _read_gray(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.float32)


def read_park2011(root: str | Path) -> list[Sample]:
    """Park et al. ICCV 2011 noisy benchmark: 8-bit disparity GT (``0-255``) with given noisy LR inputs.

    ``meta.extra["lr_inputs"]`` maps each scale (2, 4, 8, 16) to its noisy LR PNG and
    ``meta.extra["weights"]`` to the confidence map (HR size, uint16) shipped with it. The harness uses
    these instead of generating LR depth (``protocol="given"``).
    """
    root = _check_dir("park2011", root, _PARK_EXPECTED)
    samples = []
    for scene in sorted(p for p in root.iterdir() if p.is_dir()):
        colors = sorted(scene.glob("*_big_color.png"))
        gt = scene / "gt_holefilled.png"
        inputs = {2**k: scene / f"depth_{k}_n.png" for k in range(1, 5)}
        weights = {2**k: scene / f"weight_{k}_n.png" for k in range(1, 5)}
        if not (colors and gt.is_file() and all(f.is_file() for f in inputs.values())):
            continue
        extra = {
            "lr_inputs": {s: str(f) for s, f in inputs.items()},
            "weights": {s: str(f) for s, f in weights.items() if f.is_file()},
        }
        meta = DepthMeta("park2011", scene.name, "0-255", None, (str(colors[0]), str(gt)), extra)
        samples.append(Sample(meta, lambda c=colors[0], g=gt: (_read_rgb(c), _positive(_read_gray(g)))))
    if not samples:
        raise _layout_error("park2011", root, _PARK_EXPECTED)
    return samples


def _positive(depth: np.ndarray) -> np.ndarray:
    depth = depth.astype(np.float32)
    depth[~(depth > 0)] = np.nan
    return depth


def _sun_depth(path: Path) -> np.ndarray:
    v = np.asarray(Image.open(path)).astype(np.uint16)
    mm = ((v >> 3) | (v << 13)).astype(np.float32)  # SUN RGB-D stores depth bit-rotated by 3
    mm[(v == 0) | (mm > 7000)] = np.nan  # 0 = hole; the toolbox truncates at 7 m
    return mm / 1000.0


def _nyu_raw_depth(path: Path) -> np.ndarray:
    """Raw Kinect disparity PGM -> metres (``351.3 / (1092.5 - raw)``; 2047 and far values are holes).

    The PGM header says 16 bit but the samples of Open3D's frame are little-endian (a value of 2047 reads
    ``ff 07``), so the bytes are read directly.
    """
    data = path.read_bytes()
    fields = data.split(maxsplit=4)
    if len(fields) < 5 or fields[0] != b"P5":
        raise ValueError(f"{path}: not a binary PGM (P5) file")
    w, h = int(fields[1]), int(fields[2])
    raw = np.frombuffer(data[len(data) - 2 * w * h :], dtype="<u2").reshape(h, w).astype(np.float64)
    with np.errstate(divide="ignore"):
        depth = 351.3 / (1092.5 - raw)
    depth[(raw >= 1084) | (raw <= 0) | ~(depth > 0)] = np.nan  # >= 1084: beyond ~40 m or no return
    return depth.astype(np.float32)


_SENSOR_EXPECTED = (
    "frame folders holding SUN_color.jpg + SUN_depth.png (sunrgbd) or NYU_color.ppm + NYU_depth.pgm (nyu-raw)"
)


def _frames(
    name: str, root: str | Path, color: str, depth: str, read: Callable[[Path], np.ndarray]
) -> list[Sample]:
    root = _check_dir(name, root, _SENSOR_EXPECTED)
    samples = []
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        c, d = folder / color, folder / depth
        if c.is_file() and d.is_file():
            meta = DepthMeta(name, folder.name, "m", None, (str(c), str(d)))
            samples.append(Sample(meta, lambda c=c, d=d: (_read_rgb(c), read(d))))
    if not samples:
        raise _layout_error(name, root, _SENSOR_EXPECTED)
    return samples


def read_sunrgbd(root: str | Path) -> list[Sample]:
    """SUN RGB-D frames (``SUN_color.jpg`` + bit-rotated uint16 ``SUN_depth.png``) -> metres, NaN = hole."""
    return _frames("sunrgbd", root, "SUN_color.jpg", "SUN_depth.png", _sun_depth)


def read_nyu_raw(root: str | Path) -> list[Sample]:
    """Raw NYU Kinect frames (``NYU_color.ppm`` + raw ``NYU_depth.pgm``, not registered) -> metres."""
    return _frames("nyu-raw", root, "NYU_color.ppm", "NYU_depth.pgm", _nyu_raw_depth)


DATASETS: dict[str, Callable[..., list[Sample]]] = {
    "middlebury-gdsr": read_middlebury_gdsr,
    "middlebury2005": read_middlebury2005,
    "middlebury2014": read_middlebury2014,
    "nyuv2": read_nyuv2,
    "redwood": read_redwood,
    "tum": read_tum,
    "sunrgbd": read_sunrgbd,
    "nyu-raw": read_nyu_raw,
    "park2011": read_park2011,
    "motorcycle": read_motorcycle,
}


def load_dataset(name: str, root: str | Path | None = None, **kwargs: Any) -> list[Sample]:
    """Read a dataset by registry name.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS` (``middlebury-gdsr, middlebury2005, middlebury2014, nyuv2, redwood, tum,
        sunrgbd, nyu-raw, park2011, motorcycle``).
    root : str or Path, optional
        Dataset folder (file for a NYUv2 ``.mat``); not needed for ``motorcycle``.
    **kwargs
        Passed to the reader (e.g. ``indices`` for nyuv2, ``depth_scale`` for redwood / tum).

    Returns
    -------
    list of Sample
        Sorted by name, read lazily (:meth:`Sample.load`).

    Raises
    ------
    ValueError
        Unknown name, missing ``root``, or a folder whose layout does not match the dataset.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset name {name!r}; expected one of {', '.join(DATASETS)}")
    if root is None and name != "motorcycle":
        raise ValueError(f"dataset {name!r} needs a root folder, got root=None")
    return DATASETS[name](root, **kwargs)


def sample_to_tensors(
    rgb: np.ndarray, depth: np.ndarray, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a loaded frame into batched tensors.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``[H, W, 3]`` uint8.
    depth : numpy.ndarray
        ``[H, W]`` float depth (NaN = invalid).
    device : torch.device or str, optional
        Target device (default CPU).

    Returns
    -------
    guide : torch.Tensor
        ``[1, 3, H, W]`` float32 in ``[0, 1]``.
    depth : torch.Tensor
        ``[1, 1, H, W]`` float32, NaN = invalid, units unchanged.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or depth.shape != rgb.shape[:2]:
        raise ValueError(
            f"rgb must be [H, W, 3] and depth [H, W] of the same size, got {rgb.shape}, {depth.shape}"
        )
    guide = torch.from_numpy(rgb.astype(np.float32) / np.float32(255.0)).permute(2, 0, 1)[None].to(device)
    d = torch.from_numpy(depth.astype(np.float32))[None, None].to(device)
    return guide, d
