"""Backend dispatch: the fused fast path when it is available, the reference otherwise.

``backend`` is one of ``"auto"`` (fast path for CPU tensors when numba imports,
reference otherwise, with a one-time warning if the fast path is missing),
``"fast"`` (error if unavailable) or ``"reference"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from . import kernel as _ref

__all__ = ["resolve_backend", "kernel_render", "kernel_fit_loss_grad", "fast_available"]

_WARNED = False
BACKENDS = ("auto", "fast", "reference")


def fast_available() -> bool:
    """True when the fused CPU engine (numba) can be imported."""
    try:
        from . import fast  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``signal [B, C, h, w]`` to ``[B, C, H, W]``; see :func:`ua3d.core.kernel.kernel_render_reference`.

    Returns ``(out, support)`` with ``support [B, 1, H, W]`` bool.
    """
    which = resolve_backend(backend, params.device)
    if which == "fast":
        from . import fast

        out, sup = fast.kernel_render(
            params, guide_hr, guide_lr, signal, radius, groups, valid_hr, valid_lr, signal_mask,
            out_dtype=out_dtype,
        )
        return out, sup
    rows = rows_per_chunk or _rows_for_budget(params, guide_hr, signal.shape[1], radius)
    out, sup = _ref.kernel_render_reference(
        params, guide_hr, guide_lr, signal, radius, groups, valid_hr, valid_lr, signal_mask, rows
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """TTO loss and gradient; see :func:`ua3d.core.kernel.kernel_fit_loss_grad_reference`."""
    which = resolve_backend(backend, params.device)
    if which == "fast":
        from . import fast

        return fast.kernel_fit_loss_grad(
            params, guide_hr, guide_lr, radius, groups, valid_hr, valid_lr, channel_weights, pixel_mask
        )
    rows = rows_per_chunk or _rows_for_budget(params, guide_hr, guide_hr.shape[1] * 6 + 24, radius)
    return _ref.kernel_fit_loss_grad_reference(
        params, guide_hr, guide_lr, radius, groups, valid_hr, valid_lr, channel_weights, pixel_mask, rows
    )


def _rows_for_budget(params, guide_hr, per_pair_floats: int, radius: float, budget_bytes: int = 256 << 20) -> int:
    """Rows per chunk so that ``B * K * rows * W * per_pair_floats`` elements fit the budget."""
    B = params.shape[0]
    W = guide_hr.shape[-1]
    K = _ref.window_offsets(radius).shape[0]
    per_row = B * K * W * (per_pair_floats + 16) * params.element_size()
    return max(1, int(budget_bytes // max(per_row, 1)))
