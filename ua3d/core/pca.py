"""Shared PCA colouring of feature maps, volumes and point clouds.

Fit one :class:`PCABasis` and reuse it, so that slices, frames and methods are coloured
identically: the basis stores the mean, the top-3 principal directions (deterministic sign) and
robust per-component percentile ranges used to map scores to [0, 1] RGB.

Feature layouts: a 2-D input is ``[N, C]`` (one row per sample); an input with 3 or more
dimensions is channel-first, ``[C, *S]`` (e.g. ``[C, H, W]`` or ``[C, D, H, W]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["PCABasis", "flatten_features"]


def flatten_features(features: Any, name: str = "features") -> tuple[torch.Tensor, tuple[int, ...]]:
    """Rows ``[N, C]`` of a ``[N, C]`` or channel-first ``[C, *S]`` input and the spatial shape.

    Returns
    -------
    rows : tensor [N, C] (floating, input's device)
    spatial : ``()`` for ``[N, C]`` input (rows keep their order), else ``S``
    """
    x = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape [N, C] or [C, *S], got {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    spatial: tuple[int, ...] = ()
    if x.ndim == 2:
        rows = x
        n, c = x.shape
    else:
        c, spatial = x.shape[0], tuple(x.shape[1:])
        n = int(np.prod(spatial))
        rows = x.reshape(c, n).T
    if c == 0:
        raise ValueError(f"{name} has zero channels, shape {tuple(x.shape)}")
    if n == 0:
        raise ValueError(f"{name} is empty, shape {tuple(x.shape)}")
    return rows, spatial


@dataclass
class PCABasis:
    """Top-3 PCA projection with percentile normalisation to RGB.

    Attributes
    ----------
    mean : tensor [C]
    components : tensor [3, C]
        Unit principal directions (rows); zero rows when C < 3 or the data has no variance
        along them (those channels colour as 0.5). Sign convention: the entry with
        the largest absolute value of each row is positive.
    low, high : tensor [3]
        Score percentiles mapped to 0 and 1.
    """

    mean: torch.Tensor
    components: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def fit(
        cls,
        features: Any,
        seed: int = 0,
        max_samples: int = 20_000,
        percentiles: tuple[float, float] = (1.0, 99.0),
        mask: Any | None = None,
    ) -> PCABasis:
        """Fit on ``features`` ``[N, C]`` or ``[C, *S]`` (rows with NaN/Inf are ignored).

        Parameters
        ----------
        seed : int
            Seed of the random subsample taken when there are more than ``max_samples`` rows.
        max_samples : int
            Maximum number of rows used (> 0).
        percentiles : (low, high)
            Score percentiles (0..100) that map to 0 and 1.
        mask : bool array [N] or [*S], optional
            Rows to fit on (e.g. voxels with mass).
        """
        rows, spatial = flatten_features(features)
        if max_samples <= 0:
            raise ValueError(f"max_samples must be positive, got {max_samples}")
        lo_p, hi_p = percentiles
        if not 0 <= lo_p < hi_p <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
        idx = torch.arange(rows.shape[0], device=rows.device)
        if mask is not None:
            m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).to(
                rows.device
            )
            expected = (rows.shape[0],) if not spatial else spatial
            if tuple(m.shape) != expected:
                raise ValueError(f"mask must have shape {expected}, got {tuple(m.shape)}")
            idx = idx[m.reshape(-1).bool()]
        if idx.numel() > max_samples:  # subsample first: cheap on huge inputs
            g = torch.Generator().manual_seed(int(seed))
            pick = torch.randperm(idx.numel(), generator=g)[:max_samples].sort().values
            idx = idx[pick.to(idx.device)]
        rows = rows[idx]
        rows = rows[torch.isfinite(rows).all(dim=1)]
        if rows.shape[0] == 0:
            raise ValueError("no finite feature rows to fit the PCA on (all masked or NaN/Inf)")
        work = rows.to(torch.float64)
        mean = work.mean(dim=0)
        centred = work - mean
        # Principal directions = eigenvectors of the C x C covariance (same as the SVD of the
        # centred rows, cheaper for N >> C), in float64, largest eigenvalue first.
        evals, evecs = torch.linalg.eigh(centred.T @ centred)
        evals, evecs = evals.flip(0), evecs.flip(1)
        k = min(3, work.shape[1])
        comps = torch.zeros(3, work.shape[1], dtype=torch.float64, device=work.device)
        comps[:k] = evecs[:, :k].T
        # directions without variance (rank-deficient data) get a zero row: they colour as 0.5
        comps[:k][evals[:k] <= 1e-10 * evals[0].clamp_min(1e-300)] = 0.0
        sign = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
        comps = comps * torch.where(sign == 0, torch.ones_like(sign), sign)
        scores = centred @ comps.T
        q = torch.tensor([lo_p / 100, hi_p / 100], dtype=torch.float64, device=work.device)
        lo, hi = torch.quantile(scores, q, dim=0)
        dt = rows.dtype
        return cls(mean.to(dt), comps.to(dt), lo.to(dt), hi.to(dt))

    def project(self, features: Any) -> torch.Tensor:
        """Raw PCA scores: ``[N, C] -> [N, 3]`` or ``[C, *S] -> [*S, 3]``."""
        rows, spatial = flatten_features(features)
        if rows.shape[1] != self.channels:
            raise ValueError(
                f"features have {rows.shape[1]} channels but the PCA basis was fitted on {self.channels}"
            )
        dev, dt = rows.device, rows.dtype
        scores = (rows - self.mean.to(dev, dt)) @ self.components.to(dev, dt).T
        return scores.reshape(*spatial, 3) if spatial else scores

    def transform(self, features: Any) -> torch.Tensor:
        """RGB in [0, 1]: ``[N, C] -> [N, 3]`` or ``[C, *S] -> [*S, 3]`` (input's dtype and device).

        A component whose fitted range is empty (constant scores) maps to 0.5.
        """
        scores = self.project(features)
        lo, hi = self.low.to(scores), self.high.to(scores)
        span = hi - lo
        ok = span > 0
        rgb = (scores - lo) / torch.where(ok, span, torch.ones_like(span))
        rgb = torch.where(ok, rgb, torch.full_like(rgb, 0.5))
        return rgb.clamp(0.0, 1.0)

    def to_dict(self) -> dict[str, np.ndarray]:
        """Numpy arrays (for ``np.savez`` / JSON); inverse of :meth:`from_dict`."""
        return {k: getattr(self, k).detach().cpu().numpy() for k in ("mean", "components", "low", "high")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PCABasis:
        try:
            t = {k: torch.as_tensor(np.asarray(d[k])) for k in ("mean", "components", "low", "high")}
        except KeyError as e:
            raise ValueError(f"PCA basis dict is missing {e.args[0]!r} (keys: {sorted(d)})") from None
        c = t["mean"].shape
        if (
            len(c) != 1
            or t["components"].shape != (3, c[0])
            or t["low"].shape != (3,)
            or t["high"].shape != (3,)
        ):
            raise ValueError(
                f"inconsistent PCA basis shapes: mean {tuple(t['mean'].shape)}, components "
                f"{tuple(t['components'].shape)}, low {tuple(t['low'].shape)}, high {tuple(t['high'].shape)}"
            )
        return cls(**t)
