"""Backend dispatch: the fused fast path when it is available, the reference otherwise.

``backend`` is one of ``"auto"`` (fast path for CPU tensors when numba imports,
reference otherwise, with a one-time warning if the fast path is missing),
``"fast"`` (error if unavailable), ``"reference"`` or ``"blocked"`` (the blocked torch engine
:mod:`ua3d.core.blocked`, any device; ``"auto"`` picks it for non-CPU tensors).

Both entry points accept ``support_sigmas`` (the *adaptive support* speed option):
neighbours whose spatial Mahalanobis distance ``sqrt(a^2 / sigma_x^2 + b^2 / sigma_y^2)``
exceeds it are dropped, the anchor always stays (reference: :func:`ua3d.core.kernel.pair_logits`).

Before a large allocation the render checks a memory estimate
(:func:`estimate_render_memory`) against the available memory and refuses with a
``ValueError`` that says what to change.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from . import kernel as _ref
from .memory import available_memory_bytes, check_memory, check_window, window_size

__all__ = [
    "available_memory_bytes",
    "estimate_fit_memory",
    "estimate_render_memory",
    "fast_available",
    "kernel_fit_loss_grad",
    "kernel_render",
    "resolve_backend",
]

_WARNED = False
BACKENDS = ("auto", "fast", "reference", "blocked")


def fast_available() -> bool:
    """True when the fused CPU engine (numba) can be imported."""
    try:
        from . import fast
    except Exception:  # noqa: BLE001  # pragma: no cover - any failure to import means "not available"
        return False
    return bool(getattr(fast, "AVAILABLE", False))


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return ``"fast"``, ``"reference"`` or ``"blocked"`` (:mod:`ua3d.core.blocked`, what ``"auto"``
    picks for non-CPU tensors) for tensors on ``device``."""
    global _WARNED
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("reference", "blocked"):
        return backend
    if backend == "auto" and torch.device(device).type != "cpu":
        return "blocked"
    ok = fast_available() and torch.device(device).type == "cpu"
    if backend == "fast":
        if not ok:
            raise ValueError(
                "backend='fast' needs CPU tensors and numba (pip install numba); "
                "use backend='reference' or 'auto'"
            )
        return "fast"
    if not ok and torch.device(device).type == "cpu" and not _WARNED:
        _WARNED = True
        warnings.warn(
            "ua3d: the fast CPU engine (numba) is unavailable; using the slower pure-PyTorch reference path",
            RuntimeWarning,
            stacklevel=3,
        )
    return "fast" if ok else "reference"


# --------------------------------------------------------------------------- memory
def estimate_render_memory(
    batch: int,
    channels: int,
    out_size: tuple[int, int],
    lr_size: tuple[int, int],
    radius: float,
    out_dtype: torch.dtype = torch.float32,
    backend: str = "fast",
) -> dict[str, int]:
    """Planned memory of a render in bytes: ``{"output", "working", "total"}``.

    ``output`` is ``B C H W`` elements of ``out_dtype`` plus the support mask; ``working``
    is the engine's bounded tile (fast: one row of blocks, see
    :func:`ua3d.core.fast.render_working_bytes`; reference: its row-chunk budget).
    """
    H, W = out_size
    item = torch.empty((), dtype=out_dtype).element_size()
    output = batch * channels * H * W * item + batch * H * W
    if backend == "fast" and fast_available():
        from . import fast

        h, w = lr_size
        by, bx = -(-H // h) + 1, -(-W // w) + 1  # largest block (HR pixels sharing an anchor), bounded
        isz = 8 if out_dtype == torch.float64 else 4
        if channels <= fast.SMALL_C:  # tiles of whole block rows: [C, rows, W] + support
            per_row = channels * by * W * isz + by * W
        else:  # weights [w, K, P], gathered signal [w, K, cc] and products [w, cc, P] per block row
            K, cc = window_size(radius), min(channels, 128)
            per_row = w * (by * bx * K + K * cc + 3 * by * bx * cc) * isz + w * by * bx
        working = min(h, max(1, fast.TILE_BYTES // per_row)) * per_row
    else:  # row chunks of 256 MiB, at least one row of pairs
        working = max(256 << 20, batch * window_size(radius) * W * (channels + 16) * 4)
    return {"output": int(output), "working": int(working), "total": int(output + working)}


def estimate_fit_memory(
    batch: int,
    guide_channels: int,
    out_size: tuple[int, int],
    lr_size: tuple[int, int],
    radius: float,
    n_groups: int = 1,
    dtype: torch.dtype = torch.float32,
    *,
    contiguous: bool = True,
    pixel_fraction: float = 1.0,
    backend: str = "fast",
) -> dict[str, int]:
    """Planned memory of a TTO fit in bytes, before anything is allocated: ``{"guide copy", "working", "total"}``.

    ``guide copy``: a strided guide (e.g. broadcast-expanded) is made contiguous once (``B Cg H W``);
    ``working``: parameters, gradient and Adam moments (``4 B (3 + G) h w``), the fast engine's per-LR-row
    gradient buffers (``B h (2 r + 1) w (3 + G)`` float64) and per-thread block scratch (``K`` x the padded
    block), or the reference's row chunks (256 MiB, at least one row of pairs); per-step pixel subsets.
    """
    B, Cg, G = int(batch), int(guide_channels), int(n_groups)
    H, W = out_size
    h, w = lr_size
    item = torch.empty((), dtype=dtype).element_size()
    r = math.floor(radius)
    K = window_size(radius)
    params = 4 * B * (3 + G) * h * w * item
    if backend != "reference" and fast_available():
        from . import fast

        pmax = (-(-H // h) + 1) * (-(-W // w) + 1)
        per_thread = (K * (pmax + 2 * (6 + 2 * G + Cg) + 11) + pmax * (4 * Cg + G + 16)) * item
        engine = B * h * (2 * r + 1) * w * (3 + G) * 8 * 2 + fast.num_threads() * per_thread
    else:
        engine = max(256 << 20, B * K * W * (Cg * 6 + 24 + 16) * item * 2)
    pixels = B * H * W * (4 + 1 + item) if pixel_fraction < 1 else 0
    copy = 0 if contiguous else B * Cg * H * W * item
    working = params + engine + pixels
    return {"guide copy": int(copy), "working": int(working), "total": int(copy + working)}


def _check_memory(need: dict[str, int], what: str) -> None:
    check_memory(need, what, "render fewer channels at a time or use out_dtype=torch.float16")


# --------------------------------------------------------------------------- dispatch
def kernel_render(
    params: torch.Tensor,
    guide_hr: torch.Tensor,
    guide_lr: torch.Tensor,
    signal: torch.Tensor,
    radius: float,
    groups: Sequence[int] | None = None,
    valid_hr: torch.Tensor | None = None,
    valid_lr: torch.Tensor | None = None,
    signal_mask: torch.Tensor | None = None,
    backend: str = "auto",
    out_dtype: torch.dtype | None = None,
    rows_per_chunk: int | None = None,
    support_sigmas: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``signal [B, C, h, w]`` to ``[B, C, H, W]``; see :func:`ua3d.core.kernel.kernel_render_reference`.

    ``support_sigmas`` (None = full window) drops neighbours beyond that many sigmas.
    Returns ``(out, support)`` with ``support [B, 1, H, W]`` bool.
    """
    which = resolve_backend(backend, params.device)
    _ref.check_support_sigmas(support_sigmas)
    check_window(radius, (params.shape[-2], params.shape[-1]), params.shape[0])
    if params.device.type == "cpu":
        need = estimate_render_memory(
            params.shape[0],
            signal.shape[1],
            (guide_hr.shape[-2], guide_hr.shape[-1]),
            (params.shape[-2], params.shape[-1]),
            radius,
            out_dtype or signal.dtype,
            which,
        )
        if not guide_hr.is_contiguous():  # the engines copy a strided (e.g. broadcast-expanded) guide
            need["guide copy"] = guide_hr.numel() * params.element_size()
            need["total"] += need["guide copy"]
        _check_memory(need, f"rendering {signal.shape[1]} channels at {tuple(guide_hr.shape[-2:])}")
    args = (params, guide_hr, guide_lr, signal, radius, groups, valid_hr, valid_lr, signal_mask)
    if which == "fast":
        from . import fast

        return fast.kernel_render(*args, out_dtype=out_dtype, support_sigmas=support_sigmas)
    if which == "blocked":
        from . import blocked

        return blocked.kernel_render(*args, out_dtype=out_dtype, support_sigmas=support_sigmas)
    rows = rows_per_chunk or _rows_for_budget(params, guide_hr, signal.shape[1], radius)
    out, sup = _ref.kernel_render_reference(*args, rows, support_sigmas)
    if out_dtype is not None:
        out = out.to(out_dtype)
    return out, sup


def kernel_fit_loss_grad(
    params: torch.Tensor,
    guide_hr: torch.Tensor,
    guide_lr: torch.Tensor,
    radius: float,
    groups: Sequence[int] | None = None,
    valid_hr: torch.Tensor | None = None,
    valid_lr: torch.Tensor | None = None,
    channel_weights: torch.Tensor | None = None,
    pixel_mask: torch.Tensor | None = None,
    backend: str = "auto",
    rows_per_chunk: int | None = None,
    support_sigmas: float | None = None,
    values_lr: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TTO loss and gradient; see :func:`ua3d.core.kernel.kernel_fit_loss_grad_reference`.

    ``support_sigmas`` (None = full window) drops neighbours beyond that many sigmas.
    ``values_lr`` (None = ``guide_lr``) are the LR values rendered to reconstruct the HR guide;
    ``guide_lr`` stays the range centres.
    """
    if values_lr is not None and tuple(values_lr.shape) != tuple(guide_lr.shape):
        raise ValueError(
            f"values_lr must have the shape of guide_lr {tuple(guide_lr.shape)}, got {tuple(values_lr.shape)}"
        )
    which = resolve_backend(backend, params.device)
    _ref.check_support_sigmas(support_sigmas)
    check_window(radius, (params.shape[-2], params.shape[-1]), params.shape[0])
    args = (params, guide_hr, guide_lr, radius, groups, valid_hr, valid_lr, channel_weights, pixel_mask)
    if which == "fast":
        from . import fast

        return fast.kernel_fit_loss_grad(*args, support_sigmas=support_sigmas, values_lr=values_lr)
    if which == "blocked":
        from . import blocked

        return blocked.kernel_fit_loss_grad(*args, support_sigmas=support_sigmas, values_lr=values_lr)
    rows = rows_per_chunk or _rows_for_budget(params, guide_hr, guide_hr.shape[1] * 6 + 24, radius)
    return _ref.kernel_fit_loss_grad_reference(*args, rows, values_lr, support_sigmas)


def _rows_for_budget(
    params, guide_hr, per_pair_floats: int, radius: float, budget_bytes: int = 256 << 20
) -> int:
    """Rows per chunk so that ``B * K * rows * W * per_pair_floats`` elements fit the budget."""
    B = params.shape[0]
    W = guide_hr.shape[-1]
    K = _ref.window_offsets(radius).shape[0]
    per_row = B * K * W * (per_pair_floats + 16) * params.element_size()
    return max(1, int(budget_bytes // max(per_row, 1)))
