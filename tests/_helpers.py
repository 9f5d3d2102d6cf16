"""Helpers shared by several test modules (import as ``from _helpers import ...``)."""

from __future__ import annotations

import math

import torch


def random_params(B, h, w, H, W, G=1, seed=0, dtype=torch.float64):
    """Random but sane kernel parameters ``[B, 3 + G, h, w]``: sigmas around the scale, any
    orientation, sigma_r around 0.1."""
    g = torch.Generator().manual_seed(seed)
    s = math.log(max(H / h, W / w))
    p = torch.empty(B, 3 + G, h, w, dtype=dtype)
    p[:, 0:2] = s + 0.6 * torch.randn(B, 2, h, w, generator=g, dtype=dtype)
    p[:, 2] = 1.5 * torch.randn(B, h, w, generator=g, dtype=dtype)
    p[:, 3:] = math.log(0.1) + 0.5 * torch.randn(B, G, h, w, generator=g, dtype=dtype)
    return p
