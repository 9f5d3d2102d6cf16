"""Input validation shared by every layer (the one home of these rules).

Every public entry point calls these before touching torch so that bad input fails early with a
:class:`ValueError` that names the argument and what was found, instead of failing deep inside
torch or, worse, silently returning garbage. Wrong *types* raise ``ValueError`` too (one exception
type for users to catch, see ``pyproject.toml``).

Rules
-----
* Layouts: torch images are ``[B, C, H, W]`` / ``[C, H, W]``; numpy images are ``[H, W, C]`` /
  ``[H, W]``. A tensor that looks like ``[H, W, C]`` (or a numpy array that looks like
  ``[C, H, W]``) is refused, never guessed.
* Dtypes: float16 / bfloat16 guides are computed in float32 (outputs come back in the signal's
  dtype); integer torch guides are refused; numpy ``uint8`` / ``uint16`` are scaled to [0, 1].
* Guides must be finite and of a sane magnitude (``|x| <= MAX_GUIDE_ABS``; nominally [0, 1]).
* Sizes are positive integers (integer-valued floats are accepted; bools, strings and fractional
  floats are not).
* Depth: 0, NaN and +/-Inf are holes; a negative finite depth is an **error** (:func:`depth_valid_mask`),
  in every layer (lift, camera, depth SR, depth baselines).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .memory import check_memory

__all__ = [
    "MAX_GUIDE_ABS",
    "as_guide",
    "as_signal",
    "check_finite",
    "check_int",
    "check_lr_size",
    "check_number",
    "check_same_batch",
    "check_size",
    "check_tensor",
    "depth_valid_mask",
]

#: largest guide magnitude accepted: the range term squares guide differences (1e18 gives NaN in float32)
MAX_GUIDE_ABS = 1e6
_HALF = (torch.float16, torch.bfloat16)


def check_tensor(x: object, name: str, ndim: int | Sequence[int] | None = None) -> torch.Tensor:
    """Check that ``x`` is a non-empty tensor of the expected rank.

    Parameters
    ----------
    x : object
        The candidate tensor.
    name : str
        Argument name used in the error message.
    ndim : int or sequence of int, optional
        Allowed ranks.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    return x


def _distinct(x: torch.Tensor) -> torch.Tensor:
    """A view of ``x`` without its broadcast (stride-0) axes: the same values, each held once."""
    for d in range(x.ndim):
        if x.stride(d) == 0 and x.shape[d] > 1:
            x = x.narrow(d, 0, 1)
    return x


def check_finite(x: torch.Tensor, name: str, mask: torch.Tensor | None = None) -> None:
    """Raise if ``x`` holds NaN or Inf (optionally only where ``mask`` is True)."""
    if not x.is_floating_point():
        return
    if mask is None:
        lo, hi = torch.aminmax(_distinct(x.detach()))  # a reduction: no full-size temporary (NaN propagates)
        if math.isfinite(float(lo)) and math.isfinite(float(hi)):
            return
    bad = ~torch.isfinite(x)
    if mask is not None:
        bad = bad & mask
    if bool(bad.any()):
        n = int(bad.sum())
        raise ValueError(f"{name} contains {n} NaN/Inf value(s) (shape {tuple(x.shape)})")


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_number(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> float:
    """A real number (not a bool or string) in ``[low, high]`` (open ends with ``*_open``); returns float."""
    if not _is_real(value):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)  # type: ignore[arg-type]
    if math.isnan(v) or (finite and not math.isfinite(v)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (v < low or (low_open and v == low)):
        want = "positive" if (low == 0 and low_open) else f"{'>' if low_open else '>='} {low:g}"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high:g}, got {value!r}")
    return v


def check_int(value: object, name: str, *, low: int | None = None) -> int:
    """An integer (not a bool, float or string) ``>= low``; returns int."""
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    v = int(value)  # type: ignore[call-overload]
    if low is not None and v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return v


def check_size(size: object, name: str) -> tuple[int, int]:
    """Normalise a ``(height, width)`` pair (or one int for both) of positive integers.

    Integer-valued floats (``64.0``) are accepted; bools, strings, fractional floats are not.
    """
    if isinstance(size, (str, bytes)):
        raise ValueError(f"{name} must be an int or a (height, width) pair of ints, got the string {size!r}")
    if isinstance(size, torch.Tensor):
        size = size.tolist()
    if isinstance(size, np.ndarray):
        size = size.tolist()
    if _is_int(size):
        size = (size, size)
    items: tuple[Any, ...]
    try:
        items = tuple(size)  # type: ignore[arg-type]
    except TypeError:
        items = ()
    if len(items) != 2:
        raise ValueError(f"{name} must be an int or a (height, width) pair, got {size!r}")
    out = []
    for v in items:
        if _is_int(v) or (isinstance(v, float) and math.isfinite(v) and v.is_integer()):
            out.append(int(v))
        else:
            raise ValueError(f"{name} must hold integers, got {size!r}")
    if min(out) <= 0:
        raise ValueError(f"{name} must be positive, got {tuple(out)}")
    return out[0], out[1]


def check_same_batch(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"batch size of {name_a} {tuple(a.shape)} does not match {name_b} {tuple(b.shape)}")


def check_lr_size(lr_size: object, out_size: tuple[int, ...], name: str = "lr_size") -> tuple[int, int]:
    """Validate an LR grid size against the HR output size."""
    h, w = check_size(lr_size, name)
    H, W = out_size
    if h > H or w > W:
        raise ValueError(f"{name} {(h, w)} is larger than the guide/output size {(H, W)}")
    return h, w


def _check_magnitude(g: torch.Tensor, name: str) -> None:
    lo, hi = (float(v) for v in torch.aminmax(_distinct(g.detach())))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        check_finite(_distinct(g), name)
    big = max(abs(lo), abs(hi))
    if big > MAX_GUIDE_ABS:
        raise ValueError(
            f"{name} values must be of a sane magnitude (|x| <= {MAX_GUIDE_ABS:g}, nominally [0, 1]); found values "
            f"in [{lo:.3g}, {hi:.3g}] (shape {tuple(g.shape)}): rescale the guide (e.g. divide by its maximum)"
        )


def as_guide(guide: object, name: str = "guide") -> torch.Tensor:
    """Convert a guide image to a float tensor ``[B, C, H, W]``.

    Accepted layouts
    ----------------
    * ``torch.Tensor`` ``[B, C, H, W]`` or ``[C, H, W]``, floating point, values
      nominally in ``[0, 1]`` (any channel count). A tensor whose last axis has at most 4 entries while
      its channel axis has more (``[48, 40, 3]``: an ``[H, W, C]`` image) is refused.
    * ``numpy.ndarray`` ``[H, W, C]`` or ``[H, W]``: ``uint8`` is divided by 255,
      ``uint16`` by 65535, floats are taken as they are. An array that looks like ``[C, H, W]``
      (first axis at most 4, last axis more) is refused.

    Returns a floating tensor: float32 for numpy, float16 and bfloat16 input, the input dtype otherwise.
    Values must be finite with ``|x| <= MAX_GUIDE_ABS``.
    """
    if isinstance(guide, np.ndarray):
        if guide.ndim == 2:
            guide = guide[..., None]
        if guide.ndim != 3:
            raise ValueError(f"{name} as a numpy array must be [H, W, C] or [H, W], got shape {guide.shape}")
        if guide.size == 0:
            raise ValueError(f"{name} is empty: shape {guide.shape}")
        if guide.shape[0] <= 4 < guide.shape[2]:
            raise ValueError(
                f"{name} numpy array of shape {guide.shape} looks like [C, H, W]; numpy guides are [H, W, C] "
                f"images: pass np.moveaxis({name}, 0, -1), or a torch tensor [C, H, W]"
            )
        check_memory(
            guide.size * 4,
            f"converting {name} of shape {guide.shape} to float32",
            f"pass a smaller {name} (resize it first)",
        )
        if guide.dtype == np.uint8:
            arr = guide.astype(np.float32) / 255.0
        elif guide.dtype == np.uint16:
            arr = guide.astype(np.float32) / 65535.0
        elif np.issubdtype(guide.dtype, np.floating):
            arr = guide.astype(np.float32)
        else:
            raise ValueError(f"{name} numpy dtype {guide.dtype} not supported (uint8, uint16 or float)")
        guide = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]
    if not isinstance(guide, torch.Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor [B, C, H, W] or a numpy image, got {type(guide).__name__}"
        )
    check_tensor(guide, name, ndim=(3, 4))
    if guide.shape[-1] <= 4 < guide.shape[-3]:
        perm = "permute(2, 0, 1)" if guide.ndim == 3 else "permute(0, 3, 1, 2)"
        raise ValueError(
            f"{name} of shape {tuple(guide.shape)} looks like an [H, W, C] image; torch guides are [C, H, W] or "
            f"[B, C, H, W] (HR guides narrower than 5 pixels are not supported): pass {name}.{perm}"
        )
    if guide.ndim == 3:
        guide = guide[None]
    if not guide.is_floating_point():
        raise ValueError(f"{name} must be floating point in [0, 1], got dtype {guide.dtype}")
    if guide.dtype in _HALF:
        guide = guide.to(torch.float32)  # the kernel's exponentials need float32 (float16 gives NaN)
    _check_magnitude(guide, name)
    return guide


def as_signal(signal: object, lr_size: tuple[int, int] | None = None, name: str = "signal") -> torch.Tensor:
    """Convert an LR signal to a floating tensor ``[B, C, h, w]``.

    Accepts a tensor ``[B, C, h, w]``, ``[C, h, w]`` or ``[h, w]``, or a numpy array of the
    same layouts (``[h, w]`` becomes one channel). Integer and bool inputs (labels, one-hot) become
    float32; complex input is refused.
    """
    if isinstance(signal, np.ndarray):
        if not (np.issubdtype(signal.dtype, np.number) or signal.dtype == np.bool_) or np.iscomplexobj(
            signal
        ):
            raise ValueError(f"{name} must be a real numeric array, got numpy dtype {signal.dtype}")
        signal = torch.from_numpy(np.ascontiguousarray(signal))
    if not isinstance(signal, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(signal).__name__}")
    if signal.is_complex():
        raise ValueError(f"{name} must be real, got dtype {signal.dtype}")
    if signal.ndim == 2:
        signal = signal[None, None]
    elif signal.ndim == 3:
        signal = signal[None]
    check_tensor(signal, name, ndim=4)
    if not signal.is_floating_point():
        signal = signal.to(torch.float32)
    if lr_size is not None and tuple(signal.shape[-2:]) != tuple(lr_size):
        raise ValueError(
            f"{name} grid {tuple(signal.shape[-2:])} does not match the kernel's LR grid {tuple(lr_size)} "
            f"(signal shape {tuple(signal.shape)})"
        )
    return signal


def depth_valid_mask(
    depth, name: str = "depth", mask=None, depth_max: float | None = None, *, negative: str = "error"
):
    """The one depth-validity rule: valid = finite and ``> 0`` (and ``<= depth_max``, and ``mask``).

    0, NaN, +Inf and -Inf are holes. A negative finite value that is not masked out is an error:
    a depth map never holds negative distances, so it is a wrong unit or offset, not a hole.

    Parameters
    ----------
    depth : tensor or ndarray, any shape (integer input is taken as raw units).
    name : argument name for the message.
    mask : optional bool array of the same shape; False excludes a pixel (its value is ignored, even
        when negative).
    depth_max : optional upper limit (positive); farther depth is a hole.
    negative : ``"error"`` (the rule, for every computation) or ``"hole"``: only for displays, which
        paint any map they are given and mark negative pixels as invalid instead of refusing to draw.

    Returns
    -------
    bool mask of the same shape and kind (torch in -> torch out, numpy in -> numpy out).
    """
    if depth_max is not None:
        check_number(depth_max, "depth_max", low=0, low_open=True)
    if negative not in ("error", "hole"):
        raise ValueError(f"negative must be 'error' or 'hole', got {negative!r}")
    d: Any
    valid: Any
    neg: Any
    if isinstance(depth, torch.Tensor):
        d = depth if depth.is_floating_point() else depth.to(torch.float64)
        finite = torch.isfinite(d)
        neg = finite & (d < 0)
        if mask is not None:
            neg = neg & torch.as_tensor(mask, device=d.device).bool()
        valid = finite & (d > 0)
        if depth_max is not None:
            valid = valid & (d <= depth_max)
    else:
        d = np.asarray(depth)
        if d.dtype.kind not in "fiub":
            raise ValueError(f"{name} must be numeric, got dtype {d.dtype}")
        d = d if d.dtype.kind == "f" else d.astype(np.float64)
        finite = np.isfinite(d)
        with np.errstate(invalid="ignore"):
            neg = finite & (d < 0)
            valid = finite & (d > 0)
            if depth_max is not None:
                valid = valid & (d <= depth_max)
        if mask is not None:
            neg = neg & np.asarray(mask, dtype=bool)
    if negative == "error" and bool(neg.any()):
        n = int(neg.sum())
        lo = float(d[neg].min())
        raise ValueError(
            f"{name} has {n} negative value(s) (min {lo:g}, shape {tuple(d.shape)}); depth must be >= 0 with "
            f"0, NaN or Inf marking holes"
        )
    if mask is not None:
        valid = valid & (
            torch.as_tensor(mask, device=d.device).bool()
            if isinstance(valid, torch.Tensor)
            else np.asarray(mask, dtype=bool)
        )
    return valid
