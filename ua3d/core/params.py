"""The kernel's raw parameters and their one decoding rule (torch tensors or numpy arrays).

``params [B, 3 + G, ...]`` holds unconstrained values per LR cell (layout: :mod:`ua3d.core.kernel`):

====== ==================================================================
index  decoded value
====== ==================================================================
0      ``log sigma_x``, clamped to ``[LOG_SIGMA_MIN, LOG_SIGMA_MAX]``
1      ``log sigma_y``, clamped likewise
2      ``theta = THETA_MAX * tanh(theta_raw)``, in ``(-pi/2, pi/2)``
3+g    ``log sigma_r`` of range group ``g``, clamped likewise
====== ==================================================================

:func:`decode_params` is the one place that applies this rule; the reference kernel, the fast
engine's coefficient records and :meth:`ua3d.Kernel.sigmas` all call it. The clamp keeps
``exp(-2 log sigma)`` finite (no ``inf * 0 = NaN``); the gradient of a clamped entry is zero.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch

__all__ = [
    "LOG_SIGMA_MAX",
    "LOG_SIGMA_MIN",
    "THETA_MAX",
    "DecodedParams",
    "decode_params",
    "theta_from_raw",
    "theta_to_raw",
]

#: log-sigma values are clamped to this range inside the kernel (no inf*0 = NaN).
LOG_SIGMA_MIN = -7.0
LOG_SIGMA_MAX = 9.0
#: orientation bound: ``theta`` in ``(-pi/2, pi/2)`` covers every orientation.
THETA_MAX = math.pi / 2

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)


class DecodedParams(NamedTuple):
    """Decoded parameter maps, of the type of ``params`` (tensor or numpy array; typed ``Any`` because a
    generic NamedTuple needs Python 3.11); each keeps the trailing axes of ``params``."""

    #: clamped ``log sigma_x`` (HR pixels), ``[B, ...]``
    log_sigma_x: Any
    #: clamped ``log sigma_y`` (HR pixels), ``[B, ...]``
    log_sigma_y: Any
    #: orientation in radians, ``[B, ...]``
    theta: Any
    #: clamped ``log sigma_r`` per range group, ``[B, G, ...]``
    log_sigma_r: Any


def theta_from_raw(raw: torch.Tensor) -> torch.Tensor:
    """Bounded orientation ``theta = (pi/2) tanh(raw)``.

    >>> round(float(theta_from_raw(torch.tensor(1e3))), 6) == round(math.pi / 2, 6)
    True
    """
    return THETA_MAX * torch.tanh(raw)


def theta_to_raw(theta: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`theta_from_raw` (``theta`` strictly inside ``(-pi/2, pi/2)``).

    >>> theta_from_raw(theta_to_raw(torch.tensor([-0.5, 0.0, 1.0]))).tolist()  # doctest: +ELLIPSIS
    [-0.5..., 0.0, 1.0...]
    """
    return torch.atanh((theta / THETA_MAX).clamp(-1 + 1e-6, 1 - 1e-6))


def decode_params(params: ArrayT) -> DecodedParams:
    """Clamped log-sigmas and the bounded orientation of raw ``params [B, 3 + G, ...]``.

    Works on torch tensors (differentiable: ``clamp``, ``tanh``) and on numpy arrays (``clip``,
    ``tanh``; the fast engine's per-cell records); the result has the input's type and dtype.
    ``exp`` of a log-sigma gives the physical ``sigma_x``, ``sigma_y`` (HR pixels) and ``sigma_r``
    (guide units).

    >>> p = torch.tensor([[20.0, -20.0, 0.0, 1.0]]).view(1, 4, 1, 1)
    >>> d = decode_params(p)
    >>> d.log_sigma_x.item(), d.log_sigma_y.item(), d.theta.item(), tuple(d.log_sigma_r.shape)
    (9.0, -7.0, 0.0, (1, 1, 1, 1))
    >>> decode_params(p.numpy()).log_sigma_x.dtype
    dtype('float32')
    """
    if isinstance(params, torch.Tensor):
        if params.ndim < 2 or params.shape[1] < 3:
            raise ValueError(f"params must be [B, 3 + G, ...], got shape {tuple(params.shape)}")
        return DecodedParams(
            params[:, 0].clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX),
            params[:, 1].clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX),
            theta_from_raw(params[:, 2]),
            params[:, 3:].clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX),
        )
    if isinstance(params, np.ndarray):
        if params.ndim < 2 or params.shape[1] < 3:
            raise ValueError(f"params must be [B, 3 + G, ...], got shape {params.shape}")
        return DecodedParams(
            np.clip(params[:, 0], LOG_SIGMA_MIN, LOG_SIGMA_MAX),
            np.clip(params[:, 1], LOG_SIGMA_MIN, LOG_SIGMA_MAX),
            THETA_MAX * np.tanh(params[:, 2]),
            np.clip(params[:, 3:], LOG_SIGMA_MIN, LOG_SIGMA_MAX),
        )
    raise TypeError(f"params must be a torch.Tensor or numpy array, got {type(params).__name__}")
