"""Public API: fit a kernel to a guide image once, render any LR signal with it.

>>> import torch, ua3d
>>> guide = torch.rand(1, 3, 64, 48)                       # [B, C, H, W] in [0, 1]
>>> k = ua3d.fit(guide, (8, 6), steps=5)                   # LR grid 8 x 6
>>> feats = torch.randn(1, 16, 8, 6)                       # any signal on the LR grid
>>> k.render(feats).shape
torch.Size([1, 16, 64, 48])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .core.checks import as_guide, as_signal, check_finite, check_lr_size
from .core.kernel import kernel_weights_reference
from .core.memory import available_memory_bytes
from .core.ops import kernel_render
from .core.params import decode_params
from .core.tto import FitConfig, check_fit_memory, fit_params, lr_guides, prefilter_guide

__all__ = ["Kernel", "as_signal", "available_memory_bytes", "check_lr_size", "fit", "upsample"]

_FORMAT_VERSION = 1


class Kernel:
    """A fitted kernel: per-LR-cell anisotropic Gaussians plus the guide they were fitted on.

    Attributes
    ----------
    params : ``[B, 3 + G, h, w]`` raw parameters (see :mod:`ua3d.core.kernel`).
    guide_hr : ``[B, Cg, H, W]`` the HR guide (the range term needs it at render time).
    guide_lr : ``[B, Cg, h, w]`` the guide on the LR grid (range centres).
    radius : window radius in LR cells.
    groups, valid_hr, valid_lr : range groups and validity masks (None for a plain 2D kernel).
    config : the :class:`FitConfig` used.
    losses : the TTO loss before each step.
    """

    def __init__(
        self,
        params: torch.Tensor,
        guide_hr: torch.Tensor,
        guide_lr: torch.Tensor,
        radius: float,
        *,
        groups: Sequence[int] | None = None,
        valid_hr: torch.Tensor | None = None,
        valid_lr: torch.Tensor | None = None,
        config: FitConfig | None = None,
        losses: Sequence[float] = (),
    ) -> None:
        self.params = params
        self.guide_hr = guide_hr
        self.guide_lr = guide_lr
        self.radius = float(radius)
        self.groups = None if groups is None else tuple(int(g) for g in groups)
        self.valid_hr = valid_hr
        self.valid_lr = valid_lr
        self.config = config or FitConfig(radius=self.radius)
        self.losses = list(losses)

    # ------------------------------------------------------------------ shapes
    @property
    def out_size(self) -> tuple[int, int]:
        return tuple(self.guide_hr.shape[-2:])  # type: ignore[return-value]

    @property
    def lr_size(self) -> tuple[int, int]:
        return tuple(self.params.shape[-2:])  # type: ignore[return-value]

    @property
    def batch(self) -> int:
        return int(self.params.shape[0])

    @property
    def device(self) -> torch.device:
        return self.params.device

    def __repr__(self) -> str:
        return (
            f"Kernel(batch={self.batch}, lr_size={self.lr_size}, out_size={self.out_size}, "
            f"radius={self.radius}, guide_channels={self.guide_hr.shape[1]}, groups={self.groups})"
        )

    # ------------------------------------------------------------------ physical parameters
    def sigmas(self) -> dict[str, torch.Tensor]:
        """Physical parameter maps ``[B, h, w]``: sigma_x, sigma_y (HR px), theta (rad), sigma_r (per group)."""
        d = decode_params(self.params)
        out = {"sigma_x": d.log_sigma_x.exp(), "sigma_y": d.log_sigma_y.exp(), "theta": d.theta}
        for g in range(d.log_sigma_r.shape[1]):
            out["sigma_r" if g == 0 else f"sigma_r{g}"] = d.log_sigma_r[:, g].exp()
        return out

    # ------------------------------------------------------------------ rendering
    def render(
        self,
        signal: object,
        mask: torch.Tensor | None = None,
        *,
        out_dtype: torch.dtype | None = None,
        backend: str | None = None,
        return_support: bool = False,
    ):
        """Render an LR signal to the HR grid.

        Parameters
        ----------
        signal : ``[B, C, h, w]`` (or ``[C, h, w]``, ``[h, w]``) on the kernel's LR grid, any C.
        mask : ``[B, 1, h, w]`` bool, optional: False marks invalid LR values (holes), which are
            excluded and the weights renormalised over valid neighbours. NaN values in ``signal``
            are allowed only where ``mask`` is False.
        out_dtype : e.g. ``torch.float16`` to halve the output's memory.
        backend : override the fit's backend (``"auto"``, ``"fast"``, ``"reference"``).
        return_support : also return ``support [B, 1, H, W]`` (False where no valid neighbour).

        Returns
        -------
        ``[B, C, H, W]`` (and ``support`` if asked). Pixels without support are NaN.
        """
        sig = as_signal(signal, self.lr_size)
        if sig.shape[0] != self.batch:
            raise ValueError(f"signal batch {sig.shape[0]} does not match the kernel batch {self.batch}")
        if mask is not None:
            mask = torch.as_tensor(mask, device=sig.device)
            if mask.ndim == 3:
                mask = mask[:, None]
            if mask.ndim == 2:
                mask = mask[None, None]
            if tuple(mask.shape) != (sig.shape[0], 1, *self.lr_size):
                raise ValueError(
                    f"mask must be [B, 1, h, w] = {(sig.shape[0], 1, *self.lr_size)}, got {tuple(mask.shape)}"
                )
            mask = mask.bool()
            check_finite(sig, "signal", mask=mask.expand_as(sig))
            sig = torch.where(mask, sig, torch.zeros((), dtype=sig.dtype, device=sig.device))
        else:
            check_finite(sig, "signal")
        sig = sig.to(device=self.device)
        work_dtype = self.params.dtype
        out, support = kernel_render(
            self.params,
            self.guide_hr,
            self.guide_lr,
            sig.to(work_dtype),
            self.radius,
            self.groups,
            self.valid_hr,
            self.valid_lr,
            mask,
            backend=backend or self.config.backend,
            out_dtype=out_dtype or sig.dtype,
        )
        return (out, support) if return_support else out

    __call__ = render

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense normalised weights ``[B, K, H, W]`` and LR indices ``[K, H, W]`` (-1 outside). Small sizes only."""
        w, flat, inside = kernel_weights_reference(
            self.params, self.guide_hr, self.guide_lr, self.radius, self.groups, self.valid_hr, self.valid_lr
        )
        return w, torch.where(inside, flat, torch.full_like(flat, -1))

    # ------------------------------------------------------------------ persistence
    def to(self, device=None, dtype=None) -> Kernel:
        def mv(t, cast=True):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if (cast and t.is_floating_point()) else None)

        return Kernel(
            mv(self.params),
            mv(self.guide_hr),
            mv(self.guide_lr),
            self.radius,
            groups=self.groups,
            valid_hr=mv(self.valid_hr, False),
            valid_lr=mv(self.valid_lr, False),
            config=self.config,
            losses=self.losses,
        )

    def state_dict(self) -> dict:
        d = {
            "format_version": _FORMAT_VERSION,
            "params": self.params.detach().cpu(),
            "guide_hr": self.guide_hr.detach().cpu(),
            "guide_lr": self.guide_lr.detach().cpu(),
            "radius": self.radius,
            "groups": list(self.groups) if self.groups else [],
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.config.to_dict().items()},
            "losses": list(self.losses),
        }
        if self.valid_hr is not None:
            d["valid_hr"] = self.valid_hr.cpu()
        if self.valid_lr is not None:
            d["valid_lr"] = self.valid_lr.cpu()
        return d

    def save(self, path: str | os.PathLike) -> Path:
        """Save to ``.pt`` (torch) or ``.npz`` (numpy, float arrays keep their precision)."""
        path = Path(path)
        d = self.state_dict()
        if path.suffix == ".pt":
            torch.save(d, path)
        elif path.suffix == ".npz":
            arrays = {k: v.numpy() for k, v in d.items() if isinstance(v, torch.Tensor)}
            import json

            meta = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
            np.savez(path, meta=np.array(json.dumps(meta)), **arrays)  # type: ignore[arg-type]  # numpy stub
        else:
            raise ValueError(f"path must end in .pt or .npz, got {str(path)!r}")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Kernel:
        """Load a kernel saved with :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no kernel file at {str(path)!r}")
        if path.suffix not in (".pt", ".npz"):
            raise ValueError(f"path must end in .pt or .npz, got {str(path)!r}")
        try:
            if path.suffix == ".pt":
                d = torch.load(path, map_location=map_location, weights_only=True)
            else:
                import json

                with np.load(path, allow_pickle=False) as z:
                    d = json.loads(str(z["meta"]))
                    for k in z.files:
                        if k != "meta":
                            d[k] = torch.from_numpy(z[k]).to(map_location)
        except Exception as exc:  # noqa: BLE001 - zip/pickle/json readers raise many types on a bad file
            raise ValueError(
                f"{str(path)!r}: cannot read it as a kernel {path.suffix} file ({type(exc).__name__}: {exc})"
            ) from None
        if not isinstance(d, dict) or d.get("format_version") != _FORMAT_VERSION:
            found = d.get("format_version") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"{str(path)!r}: unsupported kernel format version {found!r}")
        try:
            cfg = dict(d["config"])
            for k in ("sigma_spatial", "sigma_range", "channel_weights"):
                if isinstance(cfg.get(k), list):
                    cfg[k] = tuple(cfg[k])
            return cls(
                d["params"],
                d["guide_hr"],
                d["guide_lr"],
                d["radius"],
                groups=d["groups"] or None,
                valid_hr=d.get("valid_hr"),
                valid_lr=d.get("valid_lr"),
                config=FitConfig(**cfg),
                losses=d["losses"],
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{str(path)!r}: incomplete kernel file ({type(exc).__name__}: {exc})") from None


def _config(config: FitConfig | None, overrides: dict) -> FitConfig:
    if config is not None and not isinstance(config, FitConfig):
        raise ValueError(f"config must be a FitConfig or None, got {type(config).__name__}")
    return (config or FitConfig()).replace(**overrides) if overrides else (config or FitConfig())


def fit(
    guide: object, lr_size: object, config: FitConfig | None = None, *, callback=None, **overrides
) -> Kernel:
    """Fit a kernel to ``guide`` for signals living on an ``lr_size`` grid.

    Parameters
    ----------
    guide : ``[B, C, H, W]`` float in [0, 1] (any C), ``[C, H, W]``, or a numpy ``[H, W, 3]``
        uint8 image (divided by 255).
    lr_size : ``(h, w)`` of the LR grid, e.g. the feature map's size; any ratio to ``(H, W)``.
    config : :class:`FitConfig`; keyword overrides (``steps=20``, ``radius=4``...) are applied on top.
    callback : optional ``callback(step, loss)`` called after every TTO step (e.g. a progress bar).

    Returns
    -------
    Kernel
    """
    g = as_guide(guide)
    cfg = _config(config, overrides)
    hw = check_lr_size(lr_size, (g.shape[-2], g.shape[-1]))
    check_fit_memory(g, hw, cfg)  # before the LR guide is made (interpolating a strided guide copies it)
    g = prefilter_guide(g, cfg.guide_prefilter)
    g_lr, values = lr_guides(g, hw, cfg)
    params, losses = fit_params(g, g_lr, cfg, values_lr=values, callback=callback)
    return Kernel(params, g, g_lr, cfg.radius, config=cfg, losses=losses)


def upsample(
    guide: object, signal: object, config: FitConfig | None = None, *, mask=None, **overrides
) -> torch.Tensor:
    """Fit on ``guide`` and render ``signal [B, C, h, w]`` to the guide's size in one call."""
    g = as_guide(guide)
    sig = as_signal(signal)
    if sig.shape[0] != g.shape[0]:
        raise ValueError(f"batch size of signal {tuple(sig.shape)} does not match guide {tuple(g.shape)}")
    k = fit(g, tuple(sig.shape[-2:]), config, **overrides)
    return k.render(sig, mask)
