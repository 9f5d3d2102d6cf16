"""Low-resolution features from files: ``.npy``, ``.npz`` and ``.pt``.

A feature file holds one array in one of these shapes:

* ``[C, h, w]`` (layout ``"chw"``) or ``[1, C, h, w]`` (the same with a batch axis),
* ``[h, w, C]`` (layout ``"hwc"``) or ``[1, h, w, C]``,
* ``[h, w]`` (one channel, layout ``"hw"``).

``layout="auto"`` uses the *smallest-axis rule*: the channel axis is the first or the last axis,
whichever is strictly smaller than the two others (``[3, 480, 640]`` is ``chw``,
``[60, 80, 16]`` is ``hwc``). When no end axis is strictly the smallest, as for DINO-style
features ``[384, 37, 37]``, the layout cannot be told from the shape and :func:`load_features`
raises, asking for ``layout`` (``--layout`` on the command line) instead of guessing.

Every error is a :class:`ValueError` (or :class:`FileNotFoundError` for a missing file) whose
message starts with the file's path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..core.memory import check_memory

__all__ = ["FEATURE_SUFFIXES", "LAYOUTS", "guess_layout", "load_features", "save_features"]

LAYOUTS = ("auto", "chw", "hwc")
FEATURE_SUFFIXES = (".npy", ".npz", ".pt", ".pth")


def guess_layout(shape: tuple[int, ...]) -> str | None:
    """Layout of a 3-axis shape by the smallest-axis rule, or None when it is ambiguous.

    Parameters
    ----------
    shape : the three sizes ``(a, b, c)``.

    Returns
    -------
    ``"chw"`` when ``a < min(b, c)``, ``"hwc"`` when ``c < min(a, b)``, else ``None``.

    >>> guess_layout((3, 480, 640)), guess_layout((60, 80, 16)), guess_layout((384, 37, 37))
    ('chw', 'hwc', None)
    """
    a, b, c = shape
    if a < min(b, c):
        return "chw"
    if c < min(a, b):
        return "hwc"
    return None


def _pick(items: dict, key: str | None, path: Path) -> object:
    """The entry ``key`` of a dict-like file, or its only array when ``key`` is None."""
    names = sorted(str(k) for k in items)
    if key is not None:
        if key not in items:
            raise ValueError(f"{path}: no array named {key!r}; the file holds {names}")
        return items[key]
    arrays = [k for k, v in items.items() if isinstance(v, (np.ndarray, torch.Tensor))]
    if len(arrays) == 1:
        return items[arrays[0]]
    if not arrays:
        raise ValueError(f"{path}: holds no array (entries: {names})")
    raise ValueError(f"{path}: holds several arrays {sorted(map(str, arrays))}; pass key=NAME (--key NAME)")


def _check_npy_size(path: Path) -> None:
    """Refuse a ``.npy`` whose header declares more data than the file holds or than memory allows."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return  # np.load checks the rest
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(f)
        offset = f.tell()
    nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    size = path.stat().st_size
    if nbytes > size - offset:
        raise ValueError(
            f"{path}: truncated .npy file: its header declares {shape} {dtype} ({nbytes} bytes) "
            f"but the file holds {size - offset} bytes of data"
        )
    check_memory(nbytes * 2, f"{path}: loading features of shape {shape}", "use a smaller feature file")


def _read(path: Path, key: str | None) -> object:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            if key is not None:
                raise ValueError(f"{path}: key={key!r} applies to .npz and .pt files only, not .npy")
            _check_npy_size(path)
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return np.asarray(_pick({k: z[k] for k in z.files}, key, path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except ValueError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ValueError(f"{path}: cannot read it as a {suffix} feature file ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - torch's unpickler raises IndexError, KeyError, ... on junk
        raise ValueError(
            f"{path}: cannot read it as a {suffix} feature file ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(obj, dict):
        return _pick(obj, key, path)
    if key is not None:
        raise ValueError(f"{path}: key={key!r} given but the file holds a single {type(obj).__name__}")
    return obj


def _to_nchw(arr: torch.Tensor, layout: str, path: Path) -> tuple[torch.Tensor, str]:
    """``[1, C, h, w]`` from a 2-, 3- or 4-axis array, and the layout used."""
    shape = tuple(arr.shape)
    if arr.ndim == 4:
        if shape[0] != 1:
            raise ValueError(f"{path}: a 4-axis feature array must have batch size 1, got shape {shape}")
        arr = arr[0]
    elif arr.ndim == 2:
        if layout == "hwc":
            raise ValueError(f"{path}: layout 'hwc' needs 3 axes, got shape {shape}")
        return arr[None, None], "hw"
    elif arr.ndim != 3:
        raise ValueError(
            f"{path}: features must be [C, h, w], [h, w, C], [1, C, h, w] or [h, w]; got shape {shape}"
        )
    if layout == "auto":
        guessed = guess_layout(tuple(arr.shape))
        if guessed is None:
            raise ValueError(
                f"{path}: cannot tell the layout of features with shape {shape} (no end axis is strictly "
                f"the smallest); pass layout='chw' for [C, h, w] or layout='hwc' for [h, w, C] (--layout)"
            )
        layout = guessed
    if layout == "hwc":
        arr = arr.permute(2, 0, 1)
    return arr[None].contiguous(), layout


def load_features(
    path: str | os.PathLike, layout: str = "auto", key: str | None = None
) -> tuple[torch.Tensor, str]:
    """Load low-resolution features from a ``.npy``, ``.npz`` or ``.pt``/``.pth`` file.

    Parameters
    ----------
    path : the file. ``.npy``: one array. ``.npz``: one array, or the one named ``key``.
        ``.pt``: a tensor, or a dict holding one tensor (or the one named ``key``); read with
        ``torch.load(weights_only=True)``, so no code in the file is run.
    layout : ``"auto"`` (the smallest-axis rule of :func:`guess_layout`, raising when it is
        ambiguous), ``"chw"`` or ``"hwc"``. A 2-axis array ``[h, w]`` is one channel.
    key : name of the array inside a ``.npz`` / dict ``.pt`` file.

    Returns
    -------
    features : float32 tensor ``[1, C, h, w]`` on the CPU.
    layout : the layout used: ``"chw"``, ``"hwc"`` or ``"hw"``.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        Unknown suffix, unreadable file, wrong rank, batch size other than 1, empty array,
        non-numeric data, NaN/Inf values, or an ambiguous shape with ``layout="auto"``.
        The message starts with the path.
    """
    path = Path(path)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such feature file")
    if path.suffix.lower() not in FEATURE_SUFFIXES:
        raise ValueError(
            f"{path}: unsupported feature file type {path.suffix!r}; use one of {FEATURE_SUFFIXES}"
        )
    obj = _read(path, key)
    if isinstance(obj, np.ndarray):
        if not (np.issubdtype(obj.dtype, np.number) or obj.dtype == np.bool_):
            raise ValueError(f"{path}: features must be numeric, got dtype {obj.dtype}")
        obj = torch.from_numpy(np.ascontiguousarray(obj))
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path}: expected an array or tensor, found a {type(obj).__name__}")
    if obj.is_complex():
        raise ValueError(f"{path}: features must be real, got dtype {obj.dtype}")
    if obj.numel() == 0:
        raise ValueError(f"{path}: the feature array is empty (shape {tuple(obj.shape)})")
    feats, used = _to_nchw(obj.detach().to(torch.float32), layout, path)
    bad = int((~torch.isfinite(feats)).sum())
    if bad:
        raise ValueError(f"{path}: features contain {bad} NaN/Inf value(s) (shape {tuple(obj.shape)})")
    return feats, used


def save_features(path: str | os.PathLike, features: torch.Tensor | np.ndarray) -> Path:
    """Save features ``[1, C, h, w]`` or ``[C, h, w]`` as ``[C, h, w]`` (layout ``"chw"``).

    Parameters
    ----------
    path : ``.npy``, ``.npz`` (array named ``"features"``) or ``.pt``/``.pth`` (a plain tensor).
        Missing parent folders are created.
    features : tensor or array ``[1, C, h, w]`` or ``[C, h, w]``; saved as float32.

    Returns
    -------
    The path written. Read it back with ``load_features(path, layout="chw")``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FEATURE_SUFFIXES:
        raise ValueError(
            f"{path}: unsupported feature file type {path.suffix!r}; use one of {FEATURE_SUFFIXES}"
        )
    t = torch.from_numpy(np.asarray(features)) if not isinstance(features, torch.Tensor) else features
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3 or t.numel() == 0:
        raise ValueError(
            f"features must be [1, C, h, w] or [C, h, w] and non-empty, got shape {tuple(t.shape)}"
        )
    t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npy":
        np.save(path, t.numpy())
    elif suffix == ".npz":
        np.savez(path, features=t.numpy())
    else:
        torch.save(t, path)
    return path
