"""Backend dispatch: the fused fast path when it is available, the reference otherwise.

``backend`` is one of ``"auto"`` (fast path for CPU tensors when numba imports,
reference otherwise, with a one-time warning if the fast path is missing),
``"fast"`` (error if unavailable) or ``"reference"``.

Both entry points accept ``support_sigmas`` (the *adaptive support* speed option):
neighbours whose spatial Mahalanobis distance ``sqrt(a^2 / sigma_x^2 + b^2 / sigma_y^2)``
exceeds it are dropped, the anchor always stays. The reference twin of that option lives
here (:func:`_pair_logits_cut`), built on :func:`ua3d.core.kernel.pair_logits`.

Before a large allocation the render checks a memory estimate
(:func:`estimate_render_memory`) against the available memory and refuses with a
``ValueError`` that says what to change.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence

import torch

from . import kernel as _ref

__all__ = [
    "available_memory_bytes",
    "estimate_render_memory",
    "fast_available",
    "kernel_fit_loss_grad",
    "kernel_render",
    "resolve_backend",
]

_WARNED = False
BACKENDS = ("auto", "fast", "reference")
#: fraction of the available memory a render may plan to use
MEMORY_FRACTION = 0.85


def fast_available() -> bool:
    """True when the fused CPU engine (numba) can be imported."""
    try:
        from . import fast
    except Exception:  # noqa: BLE001  # pragma: no cover - any failure to import means "not available"
        return False
    return bool(getattr(fast, "AVAILABLE", False))


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return ``"fast"`` or ``"reference"`` for tensors on ``device``."""
    global _WARNED
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
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
def available_memory_bytes() -> int:
    """Physical memory available to this process (best effort; Linux ``/proc/meminfo``)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    try:  # pragma: no cover
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 1 << 40


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

        working = min(fast.render_working_bytes(out_size, lr_size, channels, radius), fast.TILE_BYTES)
    else:
        working = 256 << 20
    return {"output": int(output), "working": int(working), "total": int(output + working)}


def _check_memory(need: dict[str, int], what: str) -> None:
    avail = available_memory_bytes()
    if need["total"] > MEMORY_FRACTION * avail:
        raise ValueError(
            f"{what} needs about {need['total'] / 2**30:.2f} GiB (output {need['output'] / 2**30:.2f} GiB + "
            f"working {need['working'] / 2**30:.2f} GiB) but only {avail / 2**30:.2f} GiB is available: "
            f"render fewer channels at a time or use out_dtype=torch.float16"
        )


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
    _check_cut(support_sigmas)
    if params.device.type == "cpu":
        need = estimate_render_memory(
            params.shape[0], signal.shape[1], tuple(guide_hr.shape[-2:]), tuple(params.shape[-2:]), radius,
            out_dtype or signal.dtype, which,
        )
        _check_memory(need, f"rendering {signal.shape[1]} channels at {tuple(guide_hr.shape[-2:])}")
    if which == "fast":
        from . import fast

        return fast.kernel_render(
            params, guide_hr, guide_lr, signal, radius, groups, valid_hr, valid_lr, signal_mask,
            out_dtype=out_dtype, support_sigmas=support_sigmas,
        )
    rows = rows_per_chunk or _rows_for_budget(params, guide_hr, signal.shape[1], radius)
    if support_sigmas is None:
        out, sup = _ref.kernel_render_reference(
            params, guide_hr, guide_lr, signal, radius, groups, valid_hr, valid_lr, signal_mask, rows
        )
    else:
        out, sup = _render_cut_reference(
            params, guide_hr, guide_lr, signal, radius, groups, valid_hr, valid_lr, signal_mask, rows,
            support_sigmas,
        )
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
        raise ValueError(f"values_lr must have the shape of guide_lr {tuple(guide_lr.shape)}, "
                         f"got {tuple(values_lr.shape)}")
    which = resolve_backend(backend, params.device)
    _check_cut(support_sigmas)
    if which == "fast":
        from . import fast

        return fast.kernel_fit_loss_grad(
            params, guide_hr, guide_lr, radius, groups, valid_hr, valid_lr, channel_weights, pixel_mask,
            support_sigmas=support_sigmas, values_lr=values_lr,
        )
    rows = rows_per_chunk or _rows_for_budget(params, guide_hr, guide_hr.shape[1] * 6 + 24, radius)
    if support_sigmas is None:
        return _ref.kernel_fit_loss_grad_reference(
            params, guide_hr, guide_lr, radius, groups, valid_hr, valid_lr, channel_weights, pixel_mask, rows,
            values_lr,
        )
    return _fit_cut_reference(
        params, guide_hr, guide_lr, radius, groups, valid_hr, valid_lr, channel_weights, pixel_mask, rows,
        support_sigmas, values_lr,
    )


def _rows_for_budget(params, guide_hr, per_pair_floats: int, radius: float, budget_bytes: int = 256 << 20) -> int:
    """Rows per chunk so that ``B * K * rows * W * per_pair_floats`` elements fit the budget."""
    B = params.shape[0]
    W = guide_hr.shape[-1]
    K = _ref.window_offsets(radius).shape[0]
    per_row = B * K * W * (per_pair_floats + 16) * params.element_size()
    return max(1, int(budget_bytes // max(per_row, 1)))


# --------------------------------------------------------------------------- adaptive support (reference)
def _check_cut(support_sigmas: float | None) -> None:
    if support_sigmas is not None and (not (support_sigmas > 0) or not math.isfinite(support_sigmas)):
        raise ValueError(f"support_sigmas must be a positive finite number or None, got {support_sigmas!r}")


def _pair_logits_cut(params, guide_hr, guide_lr, rows, radius, groups, valid_hr, valid_lr, cut):
    """:func:`ua3d.core.kernel.pair_logits` with the support cut applied (``-inf`` beyond it).

    The spatial Mahalanobis distance is ``d^2 = -2 x`` (the logits of an all-zero guide).
    """
    logits, flat, inside = _ref.pair_logits(params, guide_hr, guide_lr, rows, radius, groups, valid_hr, valid_lr)
    spatial, _, _ = _ref.pair_logits(params, torch.zeros_like(guide_hr), torch.zeros_like(guide_lr), rows, radius,
                                     groups)
    offs = _ref.window_offsets(radius, params.device)
    anchor = ((offs[:, 0] == 0) & (offs[:, 1] == 0)).view(1, -1, 1, 1)
    keep = (spatial >= -0.5 * cut * cut) | anchor
    return logits.masked_fill(~keep, float("-inf")), flat, inside


def _masked_softmax_render(logits, flat, signal, signal_mask):
    """``out [B, C, R, W]`` and ``support`` from logits that may be ``-inf`` (cut or outside)."""
    usable = torch.isfinite(logits)
    if signal_mask is not None:
        usable = usable & signal_mask.flatten(2)[:, 0][:, flat]
    support = usable.any(1, keepdim=True)
    safe = torch.where(usable, logits, torch.full((), float("-inf"), dtype=logits.dtype, device=logits.device))
    safe = torch.where(support, safe, torch.zeros((), dtype=logits.dtype, device=logits.device))
    wts = torch.softmax(safe, dim=1) * support
    vals = signal.flatten(2)[:, :, flat]
    if signal_mask is not None:
        vals = torch.where(usable[:, None], vals, torch.zeros((), dtype=vals.dtype, device=vals.device))
    out = torch.einsum("bkrw,bckrw->bcrw", wts, vals)
    if signal_mask is not None:
        out = torch.where(support, out, torch.full((), float("nan"), dtype=out.dtype, device=out.device))
    return out, support


def _render_cut_reference(params, guide_hr, guide_lr, signal, radius, groups, valid_hr, valid_lr, signal_mask,
                          rows_per_chunk, cut):
    """Reference render with the adaptive support cut (see :func:`kernel_render`)."""
    H, W = guide_hr.shape[-2:]
    B, C = signal.shape[:2]
    out = signal.new_empty(B, C, H, W)
    support = torch.empty(B, 1, H, W, dtype=torch.bool, device=signal.device)
    for y0, y1 in _ref.row_chunks(H, rows_per_chunk):
        logits, flat, _ = _pair_logits_cut(params, guide_hr, guide_lr, (y0, y1), radius, groups, valid_hr,
                                           valid_lr, cut)
        o, s = _masked_softmax_render(logits, flat, signal, signal_mask)
        out[:, :, y0:y1] = o.to(signal.dtype)
        support[:, :, y0:y1] = s
    return out, support


def _fit_cut_reference(params, guide_hr, guide_lr, radius, groups, valid_hr, valid_lr, channel_weights,
                       pixel_mask, rows_per_chunk, cut, values_lr=None):
    """Reference loss and gradient with the adaptive support cut (autograd; the cut is a fixed mask)."""
    B, Cg, H, W = guide_hr.shape
    gs = (Cg,) if groups is None else tuple(groups)
    lam = torch.ones(Cg, dtype=params.dtype, device=params.device) if channel_weights is None else channel_weights
    mask = torch.ones(B, Cg, H, W, dtype=guide_hr.dtype, device=guide_hr.device)
    if valid_hr is not None:
        c0 = 0
        for g, n in enumerate(gs):
            mask[:, c0:c0 + n] *= valid_hr[:, g:g + 1].to(mask.dtype)
            c0 += n
    if pixel_mask is not None:
        mask = mask * pixel_mask.to(mask.dtype)
    denom = mask.sum(dim=(1, 2, 3)).clamp_min(1.0)
    p = params.detach().requires_grad_(True)
    total = torch.zeros((), dtype=params.dtype, device=params.device)
    for y0, y1 in _ref.row_chunks(H, rows_per_chunk):
        logits, flat, _ = _pair_logits_cut(p, guide_hr, guide_lr, (y0, y1), radius, gs, valid_hr, valid_lr, cut)
        rec, _ = _masked_softmax_render(logits, flat, guide_lr if values_lr is None else values_lr, None)
        err = (rec - guide_hr[:, :, y0:y1]).abs() * lam.view(1, -1, 1, 1) * mask[:, :, y0:y1]
        loss = (err.sum(dim=(1, 2, 3)) / denom).sum()
        loss.backward()
        total = total + loss.detach()
    return total, p.grad.detach()
