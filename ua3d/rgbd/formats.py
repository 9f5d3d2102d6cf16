"""The one home of ua3d's 3D file formats: feature point clouds (``.ply`` / ``.npz`` / ``.pcd``) and the
``.npz`` reader with one clear error for a file of the wrong kind (used for feature volumes too).

Feature point cloud formats (:func:`write_point_cloud` / :func:`read_point_cloud`)
    * ``.ply`` (default; binary little-endian, written with numpy): ``x y z`` float32, ``red green
      blue`` uchar (what Open3D, MeshLab and CloudCompare show), then the features as float32 scalar
      properties ``features_0 .. features_{C-1}``, and the pixel of each point as int32 ``pixel_row
      pixel_col`` when known. Header comments say what the colours are (``comment ua3d colors rgb`` =
      the guide image, ``pca`` = a PCA of the features) and the frame. Depth bins are not stored.
    * ``.npz`` (lossless): ``positions [N, 3]`` float32, ``colors [N, 3]`` float32 in [0, 1],
      ``features [N, C]`` (their dtype), optional ``pixels [N, 2]`` int64 ``(row, column)``, ``bins
      [N]`` int64 and ``bin_depths [D]``, ``world_frame`` uint8 0/1 and ``pca_colors`` uint8 (1: the
      colours are a PCA of the features, 0: the guide image's). Open3D's ``t.io.read_point_cloud`` reads it too (every array becomes an attribute).
    * ``.pcd`` (binary, for PCL users): ``x y z`` float32, ``rgb`` packed uint32 and ``features``
      (one field, ``COUNT C``, float32). It drops the pixel indices, the depth bins, the frame and
      the colour-mode note, and stores the features as float32.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "COLOR_MODES",
    "PCD_DROPS",
    "POINT_FORMATS",
    "point_format",
    "read_npz",
    "read_point_cloud",
    "write_point_cloud",
]

POINT_FORMATS = ("ply", "npz", "pcd")
COLOR_MODES = ("rgb", "pca")
PCD_DROPS = "pixel indices, depth bins, the frame and the colour-mode note; features become float32"

# what each kind of ua3d .npz holds (to name a file of the wrong kind)
_KINDS = {
    "feature volume": ("volume", "mass", "bin_depths"),
    "feature point cloud": ("positions", "features"),
}
_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"ply\n": "a PLY file",
    b"# .P": "a PCD file",
    b"VERS": "a PCD file",
    b"\x93NUM": "a .npy array (not an .npz archive)",
}


def _describe(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            return what
    return "not a zip archive"


def read_npz(path: str | os.PathLike, kind: str, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    """All arrays of a ua3d ``.npz`` of ``kind`` (e.g. ``"feature volume"``), or one clear ``ValueError``.

    A file that is no ``.npz`` archive, holds pickled objects, or is a ua3d file of another kind
    (it lacks ``required``) is refused with a message naming what it is and what was expected.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{kind} file not found: {p}")
    expected = f"expected a ua3d {kind} .npz with the arrays {list(required)}"
    with open(p, "rb") as f:
        magic = f.read(4)
    if not magic.startswith(b"PK"):
        raise ValueError(f"{p} is {_describe(p)}: {expected}")
    try:
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"{p} could not be read as a {kind} ({str(e).splitlines()[0]}): {expected}"
        ) from None
    missing = [k for k in required if k not in data]
    if missing:
        other = [name for name, keys in _KINDS.items() if name != kind and all(k in data for k in keys)]
        if other:
            raise ValueError(f"{p} is a ua3d {other[0]}, not a {kind}: {expected}")
        names = ", ".join(repr(k) for k in missing)
        raise ValueError(f"{p} has no {names} array: not a ua3d {kind} (it holds {sorted(data)}; {expected})")
    return data


def point_format(path: str | os.PathLike, format: str | None = None) -> str:
    """The point-cloud format of ``path``: ``format`` if given (and consistent), else the suffix."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if format is None:
        if suffix not in POINT_FORMATS:
            raise ValueError(f"point cloud path must end in .ply, .npz or .pcd, got {str(path)!r}")
        return suffix
    if format not in POINT_FORMATS:
        raise ValueError(f"format must be one of {POINT_FORMATS}, got {format!r}")
    if suffix != format:
        raise ValueError(f"format {format!r} does not match the file name {str(path)!r} (use .{format})")
    return format


def _colors_u8(colors: np.ndarray) -> np.ndarray:
    c = np.asarray(colors)
    if c.dtype == np.uint8:
        return c
    return np.round(np.clip(np.nan_to_num(c.astype(np.float64)), 0.0, 1.0) * 255.0).astype(np.uint8)


def _colors01(colors: np.ndarray) -> np.ndarray:
    c = np.asarray(colors)
    if c.dtype == np.uint8:
        return c.astype(np.float32) / 255.0
    return np.clip(c.astype(np.float32), 0.0, 1.0)


def _check(positions: np.ndarray, colors: np.ndarray, features: np.ndarray) -> None:
    if positions.ndim != 2 or positions.shape[1] != 3 or positions.shape[0] == 0:
        raise ValueError(f"positions must have shape [N, 3] with N > 0, got {positions.shape}")
    n = positions.shape[0]
    if features.ndim != 2 or features.shape[0] != n:
        raise ValueError(f"features must have shape [N, C] with N = {n}, got {features.shape}")
    if features.shape[1] == 0:
        raise ValueError(f"features must have at least one channel, got shape {features.shape}")
    if colors.shape != (n, 3):
        raise ValueError(f"colors must have shape ({n}, 3), got {colors.shape}")
    if not (np.all(np.isfinite(positions)) and np.all(np.isfinite(features))):
        raise ValueError("positions and features must be finite (no NaN/Inf)")


def write_point_cloud(
    path: str | os.PathLike,
    positions: np.ndarray,
    colors: np.ndarray | None,
    features: np.ndarray,
    *,
    format: str | None = None,
    color_mode: str = "rgb",
    pixels: np.ndarray | None = None,
    bins: np.ndarray | None = None,
    bin_depths: np.ndarray | None = None,
    frame: str = "camera",
    compressed: bool = False,
) -> Path:
    """Write a feature point cloud (formats: module doc). ``colors``: uint8 or float in [0, 1], None = grey."""
    fmt = point_format(path, format)
    if color_mode not in COLOR_MODES:
        raise ValueError(f"color_mode must be one of {COLOR_MODES}, got {color_mode!r}")
    pos = np.ascontiguousarray(positions, dtype=np.float32)
    feats = np.asarray(features)
    cols = np.full((len(pos), 3), 0.5, np.float32) if colors is None else np.asarray(colors)
    _check(pos, cols, feats)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    n, c = feats.shape
    if fmt == "npz":
        arrays: dict[str, np.ndarray] = {
            "positions": pos,
            "colors": _colors01(cols),
            "features": feats,
            "world_frame": np.array(int(frame == "world"), dtype=np.uint8),
            "pca_colors": np.array(int(color_mode == "pca"), dtype=np.uint8),
        }
        for name, a, dt in (
            ("pixels", pixels, np.int64),
            ("bins", bins, np.int64),
            ("bin_depths", bin_depths, np.float64),
        ):
            if a is not None:
                arrays[name] = np.asarray(a, dtype=dt)
        (np.savez_compressed if compressed else np.savez)(p, **arrays)
        return p
    u8 = _colors_u8(cols)
    f32 = feats.astype(np.float32)
    if fmt == "ply":
        pix = None if pixels is None else np.asarray(pixels)
        pix = pix if pix is not None and pix.shape == (n, 2) and pix.min() >= 0 else None
        extra = [] if pix is None else [("pixel_row", "<i4"), ("pixel_col", "<i4")]
        dt = np.dtype(
            [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
            + [(f"features_{i}", "<f4") for i in range(c)]
            + extra
        )
        rec = np.empty(n, dt)
        rec["x"], rec["y"], rec["z"] = pos.T
        rec["red"], rec["green"], rec["blue"] = u8.T
        for i in range(c):
            rec[f"features_{i}"] = f32[:, i]
        if pix is not None:
            rec["pixel_row"], rec["pixel_col"] = pix.T
        header = (
            "\n".join(
                [
                    "ply",
                    "format binary_little_endian 1.0",
                    "comment ua3d feature point cloud",
                    f"comment ua3d colors {color_mode}",
                    f"comment ua3d frame {frame}",
                    f"element vertex {n}",
                    "property float x",
                    "property float y",
                    "property float z",
                    "property uchar red",
                    "property uchar green",
                    "property uchar blue",
                ]
                + [f"property float features_{i}" for i in range(c)]
                + ([] if pix is None else ["property int pixel_row", "property int pixel_col"])
                + ["end_header"]
            )
            + "\n"
        )
    else:  # pcd
        dt = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<u4"), ("features", "<f4", (c,))])
        rec = np.empty(n, dt)
        rec["x"], rec["y"], rec["z"] = pos.T
        u = u8.astype(np.uint32)
        rec["rgb"] = (u[:, 0] << 16) | (u[:, 1] << 8) | u[:, 2]
        rec["features"] = f32
        header = (
            "# .PCD v0.7 - Point Cloud Data file format (ua3d feature point cloud)\nVERSION 0.7\n"
            f"FIELDS x y z rgb features\nSIZE 4 4 4 4 4\nTYPE F F F U F\nCOUNT 1 1 1 1 {c}\nWIDTH {n}\nHEIGHT 1\n"
            f"VIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA binary\n"
        )
    with open(p, "wb") as fh:
        fh.write(header.encode("ascii"))
        fh.write(rec.tobytes())
    return p


_PLY_TYPES = {
    "char": "i1",
    "int8": "i1",
    "uchar": "u1",
    "uint8": "u1",
    "short": "i2",
    "int16": "i2",
    "ushort": "u2",
    "uint16": "u2",
    "int": "i4",
    "int32": "i4",
    "uint": "u4",
    "uint32": "u4",
    "float": "f4",
    "float32": "f4",
    "double": "f8",
    "float64": "f8",
}


def _read_header(fh, p: Path, end: bytes) -> list[str]:
    lines = []
    while True:
        line = fh.readline()
        if not line:
            raise ValueError(f"{p}: truncated header (no {end.decode()!r} line)")
        lines.append(line.decode("latin-1").strip())
        if line.strip() == end or (end == b"DATA" and line.startswith(b"DATA")):
            return lines


def _read_ply(p: Path) -> dict[str, Any]:
    with open(p, "rb") as fh:
        if fh.readline().strip() != b"ply":
            raise ValueError(f"{p} is {_describe(p)}, not a PLY file")
        lines = _read_header(fh, p, b"end_header")
        fmt = next((ln.split()[1] for ln in lines if ln.startswith("format")), "")
        if fmt != "binary_little_endian":
            raise ValueError(f"{p}: ua3d reads binary little-endian PLY (as it writes), got format {fmt!r}")
        n, props, seen_vertex = 0, [], False
        for ln in lines:
            t = ln.split()
            if t[:1] == ["element"]:
                if seen_vertex:
                    break
                seen_vertex = t[1] == "vertex"
                n = int(t[2]) if seen_vertex else n
            elif t[:1] == ["property"] and seen_vertex:
                if t[1] == "list" or t[1] not in _PLY_TYPES:
                    raise ValueError(f"{p}: unsupported vertex property {ln!r}")
                props.append((t[2], "<" + _PLY_TYPES[t[1]]))
        rec = np.frombuffer(fh.read(np.dtype(props).itemsize * n), dtype=np.dtype(props), count=n)
    names = rec.dtype.names or ()
    if not {"x", "y", "z"} <= set(names):
        raise ValueError(f"{p}: the PLY has no x, y, z vertex properties")
    feat = sorted((k for k in names if re.fullmatch(r"features_\d+", k)), key=lambda k: int(k.split("_")[1]))
    if not feat:
        raise ValueError(f"{p}: the PLY has no features_0.. properties (not a ua3d feature point cloud)")
    mode = next((ln.split()[3] for ln in lines if ln.startswith("comment ua3d colors")), "rgb")
    frame = next((ln.split()[3] for ln in lines if ln.startswith("comment ua3d frame")), "camera")
    cols = np.stack([rec[k] for k in ("red", "green", "blue")], 1) if "red" in names else None
    return {
        "positions": np.stack([rec["x"], rec["y"], rec["z"]], 1).astype(np.float32),
        "colors": None if cols is None else _colors01(cols.astype(np.uint8)),
        "features": np.stack([rec[k] for k in feat], 1).astype(np.float32),
        "color_mode": mode,
        "frame": frame,
        "pixels": np.stack([rec["pixel_row"], rec["pixel_col"]], 1).astype(np.int64)
        if "pixel_row" in names
        else None,
    }


def _read_pcd(p: Path) -> dict[str, Any]:
    with open(p, "rb") as fh:
        lines = [ln for ln in _read_header(fh, p, b"DATA") if not ln.startswith("#")]
        head = {ln.split()[0]: ln.split()[1:] for ln in lines if ln}
        if head.get("DATA") != ["binary"]:
            raise ValueError(f"{p}: ua3d reads binary PCD (as it writes), got DATA {head.get('DATA')}")
        kinds = {("F", "4"): "<f4", ("F", "8"): "<f8", ("U", "4"): "<u4", ("U", "1"): "u1", ("I", "4"): "<i4"}
        try:
            dt = np.dtype(
                [
                    (f, kinds[(t, s)], (int(c),))
                    for f, s, t, c in zip(head["FIELDS"], head["SIZE"], head["TYPE"], head["COUNT"])
                ]
            )
            n = int(head["POINTS"][0])
        except KeyError as e:
            raise ValueError(f"{p}: unsupported PCD header ({e})") from None
        rec = np.frombuffer(fh.read(dt.itemsize * n), dtype=dt, count=n)
    if "features" not in (rec.dtype.names or ()):
        raise ValueError(f"{p}: the PCD has no 'features' field (not a ua3d feature point cloud)")
    cols = None
    if "rgb" in rec.dtype.names:
        v = rec["rgb"][:, 0].view(np.uint32)
        cols = np.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], 1).astype(np.uint8)
    return {
        "positions": np.concatenate([rec["x"], rec["y"], rec["z"]], 1).astype(np.float32),
        "colors": None if cols is None else _colors01(cols),
        "features": rec["features"].astype(np.float32),
        "color_mode": "rgb",
        "frame": "camera",
    }


def read_point_cloud(path: str | os.PathLike) -> dict[str, Any]:
    """Read a feature point cloud written by :func:`write_point_cloud` (``.ply``, ``.npz`` or ``.pcd``).

    Returns
    -------
    dict with ``positions [N, 3]`` float32, ``colors [N, 3]`` float32 in [0, 1] (grey when the file has
    none), ``features [N, C]``, ``color_mode``, ``frame``, ``bins`` / ``bin_depths`` (``.npz`` only, else
    None) and ``pixels [N, 2]`` ``(row, column)`` (``.npz`` / ``.ply`` when stored, else None).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"feature point cloud file not found: {p}")
    fmt = point_format(p)
    if fmt == "npz":
        z = read_npz(p, "feature point cloud", ("positions", "features"))
        d: dict[str, Any] = {
            "positions": z["positions"].astype(np.float32),
            "features": z["features"],
            "colors": None if "colors" not in z else _colors01(z["colors"]),
            "color_mode": "pca" if "pca_colors" in z and int(z["pca_colors"]) else "rgb",
            "frame": "world" if "world_frame" in z and int(z["world_frame"]) else "camera",
        }
        for k in ("pixels", "bins", "bin_depths"):
            d[k] = z.get(k)
    else:
        d = _read_ply(p) if fmt == "ply" else _read_pcd(p)
        d.setdefault("pixels", None)
        d.update(bins=None, bin_depths=None)
    if d["colors"] is None:
        d["colors"] = np.full((len(d["positions"]), 3), 0.5, np.float32)
    _check(d["positions"], d["colors"], np.asarray(d["features"]))
    return d
