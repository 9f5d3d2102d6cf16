"""Test-time optimisation (TTO) of the kernel parameters.

Pure tensors in, tensors out: :func:`fit_params` takes the HR guide and its LR
version and returns fitted parameters ``[B, 3 + G, h, w]``. The :class:`FitConfig`
holds every setting; its defaults follow the authors' code where it is sound
(sigma = scale in HR px, sigma_r = 0.12, theta = 0, Adam lr 0.1 with the authors'
exponential decay ``(1e-8)^(1/5100)`` per step, L1 loss, 50 steps, nearest anchor,
log-sum-exp normalisation, a disc window of radius 8 LR cells) and departs from it
where it is not (per-axis float scales, cells outside the grid excluded rather
than clamped, any device and dtype, memory bounded by row chunks), and where the
transfer benchmark (:mod:`ua3d.eval.transfer`, ``docs/transfer.md``,
``docs/transfer_defaults.md``) says so: the range centres are the mean over each cell
(``"box"``, what patch features and pooled labels are) rather than a point sample, the
fit renders values half way between that mean and the cell's dominant colour
(``values_mix=0.5``), and salt-and-pepper, Gaussian-noise and JPEG guides are cleaned
first (``guide_prefilter="auto"``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .checks import check_int, check_number
from .kernel import GUIDE_DOWNSAMPLE_MODES, init_params, resample_guide
from .memory import check_memory, check_window
from .ops import BACKENDS, estimate_fit_memory, fast_available, kernel_fit_loss_grad

__all__ = [
    "CELL_MODES",
    "IMPULSE_SHARE",
    "LR_GUIDE_MODES",
    "NOISE_LEVEL",
    "PREFILTERS",
    "FitConfig",
    "cell_guide",
    "estimate_blockiness",
    "estimate_noise",
    "fit_params",
    "lr_guides",
    "prefilter_guide",
    "step_fraction",
]

#: values of ``FitConfig.guide_prefilter``
PREFILTERS = ("auto", "impulse", "denoise", "none")
#: share of impulse pixels above which ``guide_prefilter="auto"`` filters the guide
IMPULSE_SHARE = 0.005
#: estimated guide noise (std, guide units) above which ``guide_prefilter="auto"`` denoises the guide
NOISE_LEVEL = 0.02
#: responses per channel whose median :func:`estimate_noise` takes (a regular subsample beyond that)
NOISE_SAMPLES = 1 << 18
#: per-cell robust LR guides computed here (:func:`cell_guide`), beside :data:`GUIDE_DOWNSAMPLE_MODES`
CELL_MODES = ("median", "mode")
#: bandwidth (guide units) of the mean-shift step of ``cell_guide(..., "mode")``
MODE_BANDWIDTH = 0.05
#: bilateral range sigma of the denoise pre-filter, in units of the estimated noise, and its passes
DENOISE_RANGE = 2.0
DENOISE_PASSES = 2
#: JPEG blockiness (:func:`estimate_blockiness`) above which ``"auto"`` filters the guide, and the
#: bilateral range sigma it then uses at least (0 = no JPEG rule)
JPEG_BLOCKINESS = 1.2
JPEG_RANGE = 0.1
#: blockiness above which the grid is taken for content (nearest upsampling by 8k), not JPEG
JPEG_BLOCKINESS_MAX = 4.0
#: every value of ``FitConfig.guide_downsample`` / ``fit_values``
LR_GUIDE_MODES = GUIDE_DOWNSAMPLE_MODES + CELL_MODES


@dataclass
class FitConfig:
    """Every setting of the test-time optimisation.

    Attributes
    ----------
    steps : Adam steps (50).
    lr : Adam learning rate (0.1).
    lr_decay : multiplicative learning-rate decay per step (the authors' ``(1e-8)^(1/5100)``).
    radius : window radius in LR cells (8: a disc of 197 neighbours, the authors' window).
    sigma_spatial : initial spatial sigma in HR pixels; None = per-axis scale ``(W/w, H/h)``.
    sigma_range : initial range sigma per range group, in guide units (0.12 for RGB in [0, 1]).
    theta : initial orientation (0).
    guide_downsample : how the LR guide (the range centres, and the values the fit renders) is made
        from the HR guide: ``"box"`` (default: the mean over each LR cell, what a patch token or an
        area-pooled label aggregates), ``"area"`` (antialiased bilinear) or ``"bilinear"`` (the HR
        guide sampled at the cell centres, like the authors' non-antialiased resize). The fit learns
        to reconstruct the HR guide from this LR guide, so it should be made the way the signals that
        will be rendered were made; the choice is measured in ``docs/transfer.md``.
    pixel_fraction : fraction of HR pixels used per step (1.0 = all). With a fraction ``f < 1`` the
        pixels take turns: each gets a seeded random phase ``u`` and step ``t`` uses the pixels with
        ``(u + t f) mod 1 < f``, so every pixel is used once in every ``1 / f`` steps when that is
        an integer (lower gradient noise than a fresh random subset per step).
    cell_samples : None, or the number of HR pixels per LR cell each step uses at most (64): on a
        grid whose cells cover more pixels the step fraction is ``min(pixel_fraction, cell_samples /
        pixels_per_cell)`` (see :func:`step_fraction`). A 16x grid (256 pixels a cell) fits on a
        quarter of its pixels per step: ~3x faster, at the transfer quality of the full fit
        (``docs/transfer_defaults.md``). None = ``pixel_fraction`` alone.
    seed : seed of every random choice (pixel subsets).
    backend : ``"auto"``, ``"fast"`` or ``"reference"``.
    channel_weights : optional loss weight per guide channel.
    adaptive_support : None (default: the full window), or a per-pixel support cut in sigmas
        (e.g. 3.0): neighbours whose spatial Mahalanobis distance exceeds it are dropped from
        the fit (the anchor always stays). A speed option; the render is unaffected unless it
        is given the same cut.
    coarse_to_fine : 1.0 (default: off), or a scale in (0, 1): the first ``steps - fine_steps``
        steps fit on the guide resampled to that fraction of its size (the LR grid is the
        same; spatial sigmas are rescaled in and out), the last ``fine_steps`` at full size.
    fine_steps : steps at full resolution when ``coarse_to_fine < 1`` (10).
    fit_values : None (default: the fit renders the LR guide itself), or one of
        ``GUIDE_DOWNSAMPLE_MODES``: the fit renders the HR guide downsampled that way while the range
        centres stay the ``guide_downsample`` LR guide (e.g. sharp point-sampled centres,
        ``guide_downsample="bilinear"``, reconstructing the HR guide from its ``"box"`` means).
    sigma_spatial_max : None, or a cap on the spatial sigmas in LR cells (per axis: ``x`` times the
        scale ``W / w`` or ``H / h``), kept during the fit. Without it a cell can widen until its
        colour is borrowed by pixels several cells away (good for reconstructing the guide, bad for
        labels and features that change between those places).
    sigma_spatial_min : None, or a floor on the spatial sigmas in LR cells (per axis, like
        ``sigma_spatial_max``), kept during the fit.
    values_mix : share in [0, 1] of the per-cell mode (``cell_guide(..., "mode")``) in the values the fit
        renders: ``(1 - values_mix) * <fit_values or guide_downsample LR guide> + values_mix * mode``
        (default 0.5; 0 = the fit renders the LR guide itself). The box-only fit (0) renders cell means
        best but learns kernels that copy labels across object boundaries; half-sharpened values
        gain 1.2 points of label boundary accuracy for 1 dB of RGB transfer (``docs/transfer_defaults.md``).
    guide_prefilter : ``"auto"`` (default), ``"impulse"``, ``"denoise"`` or ``"none"``: ``"impulse"``
        replaces impulse-noise pixels of the guide (every channel at 0 or at 1 and far from the median
        of the other pixels of their 3x3 neighbourhood) by that median before the fit; ``"denoise"``
        then bilateral-filters it with a range sigma of twice the estimated noise; ``"auto"`` does the
        impulse step only when more than :data:`IMPULSE_SHARE` of the pixels are impulses
        (salt-and-pepper noise) and the bilateral step only when the estimated Gaussian noise exceeds
        :data:`NOISE_LEVEL` or the image shows JPEG blocks, so a clean guide is used unchanged. The
        filtered guide is also the one the kernel renders with. See :func:`prefilter_guide`.
    sigma_range_min : None, or a floor on every range sigma (guide units) kept during the fit: a
        kernel whose range term is sharper than the colour differences inside an object copies
        labels and features across objects of similar colour (see ``docs/transfer.md``).
    """

    steps: int = 50
    lr: float = 0.1
    lr_decay: float = (1e-8) ** (1.0 / 5100)
    radius: float = 8.0
    sigma_spatial: float | tuple[float, float] | None = None
    sigma_range: float | tuple[float, ...] = 0.12
    theta: float = 0.0
    guide_downsample: str = "box"
    pixel_fraction: float = 1.0
    cell_samples: int | None = 64
    seed: int = 0
    backend: str = "auto"
    channel_weights: tuple[float, ...] | None = field(default=None)
    adaptive_support: float | None = None
    coarse_to_fine: float = 1.0
    fine_steps: int = 10
    sigma_range_min: float | None = None
    fit_values: str | None = None
    sigma_spatial_max: float | None = None
    guide_prefilter: str = "auto"
    sigma_spatial_min: float | None = None
    values_mix: float = 0.5

    def __post_init__(self) -> None:
        _check_types(self)  # a wrong type (lr="0.1", seed=-1, sigma_spatial=(1,)) fails here, by name
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")
        if not (self.lr > 0) or not math.isfinite(self.lr):
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not (0 < self.lr_decay <= 1):
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay!r}")
        if not (self.radius >= 0) or not math.isfinite(self.radius):
            raise ValueError(f"radius must be >= 0, got {self.radius!r}")
        if not (0 < self.pixel_fraction <= 1):
            raise ValueError(f"pixel_fraction must be in (0, 1], got {self.pixel_fraction!r}")
        if self.cell_samples is not None and (
            isinstance(self.cell_samples, bool)
            or not isinstance(self.cell_samples, int)
            or self.cell_samples < 1
        ):
            raise ValueError(f"cell_samples must be None or an integer >= 1, got {self.cell_samples!r}")
        if self.guide_downsample not in LR_GUIDE_MODES:
            raise ValueError(
                f"guide_downsample must be one of {LR_GUIDE_MODES}, got {self.guide_downsample!r}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.adaptive_support is not None and (
            not (self.adaptive_support > 0) or not math.isfinite(self.adaptive_support)
        ):
            raise ValueError(
                f"adaptive_support must be None or a positive number of sigmas, got {self.adaptive_support!r}"
            )
        if not (0 < self.coarse_to_fine <= 1):
            raise ValueError(f"coarse_to_fine must be in (0, 1] (1 = off), got {self.coarse_to_fine!r}")
        if self.sigma_range_min is not None and (
            not (self.sigma_range_min > 0) or not math.isfinite(self.sigma_range_min)
        ):
            raise ValueError(
                f"sigma_range_min must be None or a positive number, got {self.sigma_range_min!r}"
            )
        if self.fit_values is not None and self.fit_values not in LR_GUIDE_MODES:
            raise ValueError(f"fit_values must be None or one of {LR_GUIDE_MODES}, got {self.fit_values!r}")
        if self.sigma_spatial_max is not None and (
            not (self.sigma_spatial_max > 0) or not math.isfinite(self.sigma_spatial_max)
        ):
            raise ValueError(
                f"sigma_spatial_max must be None or a positive number of LR cells, got {self.sigma_spatial_max!r}"
            )
        if self.sigma_spatial_min is not None and (
            not (self.sigma_spatial_min > 0) or not math.isfinite(self.sigma_spatial_min)
        ):
            raise ValueError(
                f"sigma_spatial_min must be None or a positive number of LR cells, got {self.sigma_spatial_min!r}"
            )
        if (
            self.sigma_spatial_min is not None
            and self.sigma_spatial_max is not None
            and self.sigma_spatial_min > self.sigma_spatial_max
        ):
            raise ValueError(
                f"sigma_spatial_min ({self.sigma_spatial_min!r}) must not exceed sigma_spatial_max ({self.sigma_spatial_max!r})"
            )
        if not (0 <= self.values_mix <= 1):
            raise ValueError(f"values_mix must be in [0, 1], got {self.values_mix!r}")
        if self.guide_prefilter not in PREFILTERS:
            raise ValueError(f"guide_prefilter must be one of {PREFILTERS}, got {self.guide_prefilter!r}")
        if isinstance(self.fine_steps, bool) or not isinstance(self.fine_steps, int) or self.fine_steps < 0:
            raise ValueError(f"fine_steps must be an integer >= 0, got {self.fine_steps!r}")

    def replace(self, **changes) -> FitConfig:
        """A copy with some fields changed (unknown names raise ``ValueError``)."""
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(changes) - names)
        if bad:
            raise ValueError(f"unknown FitConfig field(s) {bad}; known: {sorted(names)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_types(cfg: FitConfig) -> None:
    """Types (and tuple forms) of the config's fields; the value ranges are checked by ``__post_init__``."""
    for name in ("lr", "lr_decay", "radius", "theta", "pixel_fraction", "coarse_to_fine", "values_mix"):
        check_number(getattr(cfg, name), name, finite=False)
    check_number(cfg.theta, "theta")
    check_int(cfg.seed, "seed", low=0)
    if cfg.sigma_spatial is not None:
        ss = cfg.sigma_spatial
        if isinstance(ss, (list, tuple)):
            if len(ss) != 2:
                raise ValueError(f"sigma_spatial must be None, a number or an (x, y) pair, got {ss!r}")
            sx, sy = (check_number(v, "sigma_spatial", low=0, low_open=True) for v in ss)
            cfg.sigma_spatial = (sx, sy)
        else:
            check_number(ss, "sigma_spatial", low=0, low_open=True)
    sr = cfg.sigma_range
    if isinstance(sr, (list, tuple)):
        if len(sr) == 0:
            raise ValueError("sigma_range must be a number or a non-empty tuple of numbers, got ()")
        cfg.sigma_range = tuple(check_number(v, "sigma_range", low=0, low_open=True) for v in sr)
    else:
        check_number(sr, "sigma_range", low=0, low_open=True)
    if cfg.channel_weights is not None:
        cw = cfg.channel_weights
        if isinstance(cw, (str, bytes)) or not isinstance(cw, (list, tuple)) or len(cw) == 0:
            raise ValueError(f"channel_weights must be None or a non-empty tuple of numbers, got {cw!r}")
        cfg.channel_weights = tuple(check_number(v, "channel_weights", low=0) for v in cw)
    if cfg.adaptive_support is not None:
        check_number(cfg.adaptive_support, "adaptive_support", finite=False)
    for name in ("guide_downsample", "backend"):
        v = getattr(cfg, name)
        if not isinstance(v, str):
            raise ValueError(f"{name} must be a string, got {type(v).__name__} {v!r}")


def check_fit_memory(
    guide_hr: torch.Tensor, lr_size: tuple[int, int], config: FitConfig, n_groups: int = 1
) -> None:
    """Refuse (before allocating) a fit whose window or memory estimate does not fit; see
    :func:`ua3d.core.ops.estimate_fit_memory`. Entry points call it before resampling the guide."""
    B, Cg, H, W = guide_hr.shape
    h, w = lr_size
    check_window(config.radius, (h, w), B)
    need = estimate_fit_memory(
        B,
        Cg,
        (H, W),
        (h, w),
        config.radius,
        n_groups,
        guide_hr.dtype,
        contiguous=guide_hr.is_contiguous(),
        pixel_fraction=step_fraction(config, (H, W), (h, w)),
        backend=config.backend,
    )
    check_memory(
        need,
        f"fitting a kernel to a {Cg}-channel guide of {H}x{W} on a {h}x{w} grid",
        "use a smaller guide (resize it), a smaller radius, or coarse_to_fine < 1",
        device=guide_hr.device,
    )


def fit_params(
    guide_hr: torch.Tensor,
    guide_lr: torch.Tensor,
    config: FitConfig,
    *,
    groups: Sequence[int] | None = None,
    valid_hr: torch.Tensor | None = None,
    valid_lr: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    callback: Callable[[int, float], None] | None = None,
    values_lr: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Fit the kernel so that rendering ``guide_lr`` reconstructs ``guide_hr`` (L1).

    Parameters
    ----------
    guide_hr : ``[B, Cg, H, W]``
    guide_lr : ``[B, Cg, h, w]``
    config : :class:`FitConfig`
    groups, valid_hr, valid_lr : range groups and their validity (see :mod:`ua3d.core.kernel`).
    init : optional initial parameters ``[B, 3 + G, h, w]``.
    callback : called as ``callback(step, loss)`` after every step.
    values_lr : ``[B, Cg, h, w]`` the LR values rendered in the fit (default ``guide_lr``; ``guide_lr``
        always gives the range centres). See :func:`lr_guides`.

    Returns
    -------
    params : ``[B, 3 + G, h, w]`` (detached, guide dtype and device)
    losses : the loss before each step
    """
    B, Cg, H, W = guide_hr.shape
    h, w = guide_lr.shape[-2:]
    n_groups = 1 if groups is None else len(groups)
    check_fit_memory(guide_hr, (h, w), config, n_groups)
    if init is None:
        sr = config.sigma_range
        if isinstance(sr, (int, float)):
            sr = (float(sr),) * n_groups
        if len(sr) != n_groups:
            raise ValueError(f"sigma_range has {len(sr)} values for {n_groups} range groups")
        params = init_params(
            B,
            (h, w),
            (H, W),
            sigma_spatial=config.sigma_spatial,
            sigma_range=sr,
            theta=config.theta,
            device=guide_hr.device,
            dtype=guide_hr.dtype,
        )
    else:
        params = init.detach().clone()
    lam = None
    if config.channel_weights is not None:
        if len(config.channel_weights) != Cg:
            raise ValueError(
                f"channel_weights has {len(config.channel_weights)} values for {Cg} guide channels"
            )
        lam = torch.tensor(config.channel_weights, dtype=guide_hr.dtype, device=guide_hr.device)
    params = params.detach().clone()
    adam = _Adam(params, config.lr, config.lr_decay)
    rng = np.random.default_rng(int(config.seed))
    losses: list[float] = []
    stages = _stages(config, (H, W), (h, w))
    floor = None if config.sigma_range_min is None else math.log(config.sigma_range_min)
    if floor is not None:
        params[:, 3:].clamp_(min=floor)
    cap = None
    if config.sigma_spatial_max is not None:
        cap = (math.log(config.sigma_spatial_max * W / w), math.log(config.sigma_spatial_max * H / h))
        params[:, 0].clamp_(max=cap[0])
        params[:, 1].clamp_(max=cap[1])
    low = None
    if config.sigma_spatial_min is not None:
        low = (math.log(config.sigma_spatial_min * W / w), math.log(config.sigma_spatial_min * H / h))
        params[:, 0].clamp_(min=low[0])
        params[:, 1].clamp_(min=low[1])
    for size, n_steps in stages:
        g_hr, v_hr = _stage_guide(guide_hr, valid_hr, size)
        g_hr = g_hr.contiguous()  # once per stage, not once per step (an HWC image's permute is not)
        shift = _sigma_shift(params, size, (H, W))
        params[:, 0] += shift[0]
        params[:, 1] += shift[1]
        frac = step_fraction(config, size, (h, w))
        turns = _PixelTurns(rng, (B, 1, *size), frac) if frac < 1.0 else None
        for t in range(n_steps):
            pmask = None if turns is None else torch.from_numpy(turns.mask(t)).to(guide_hr.device)
            loss, grad = kernel_fit_loss_grad(
                params,
                g_hr,
                guide_lr,
                config.radius,
                groups,
                v_hr,
                valid_lr,
                lam,
                pmask,
                backend=config.backend,
                support_sigmas=config.adaptive_support,
                values_lr=values_lr,
            )
            adam.step(grad.to(params.dtype))
            if floor is not None:
                params[:, 3:].clamp_(min=floor)
            if cap is not None:
                params[:, 0].clamp_(max=cap[0] + shift[0])
                params[:, 1].clamp_(max=cap[1] + shift[1])
            if low is not None:
                params[:, 0].clamp_(min=low[0] + shift[0])
                params[:, 1].clamp_(min=low[1] + shift[1])
            losses.append(float(loss))
            if callback is not None:
                callback(len(losses) - 1, losses[-1])
        params[:, 0] -= shift[0]
        params[:, 1] -= shift[1]
    return params, losses


class _PixelTurns:
    """The pixel subsets of one fit stage's steps (``FitConfig.pixel_fraction`` / ``cell_samples``).

    Every pixel draws a seeded phase ``u`` in [0, 1) once; step ``t`` uses the pixels with
    ``(u + t f) mod 1 < f``. When ``P = 1 / f`` is an integer that is ``(floor(u P) + t) mod P == 0``:
    each pixel's turn comes once in every ``P`` steps, and it is computed as one comparison of the
    integer turns (a fit step's host work at 640x480 fell from ~5.6 ms to ~0.1 ms).
    """

    def __init__(self, rng: np.random.Generator, shape: tuple[int, ...], frac: float):
        u = rng.random(shape)
        self.frac = float(frac)
        period = 1.0 / self.frac
        self.period = round(period)
        self.turn = None
        self.out = np.empty(shape, dtype=bool)
        if self.period >= 2 and abs(period - self.period) <= 1e-9 * period:
            self.turn = np.floor(u * self.period).astype(np.int32)
        else:
            self.u = u
            self.buf = np.empty(shape, dtype=np.float64)

    def mask(self, t: int) -> np.ndarray:
        """``bool`` array of the pixels step ``t`` uses (a buffer reused by the next call)."""
        if self.turn is not None:
            return np.equal(self.turn, (-t) % self.period, out=self.out)
        np.add(self.u, t * self.frac, out=self.buf)
        np.mod(self.buf, 1.0, out=self.buf)
        return np.less(self.buf, self.frac, out=self.out)


def step_fraction(config: FitConfig, out_size: tuple[int, int], lr_size: tuple[int, int]) -> float:
    """Share of the HR pixels each fit step uses: ``config.pixel_fraction``, capped at
    ``config.cell_samples`` pixels per LR cell (on average) when that is set.

    >>> step_fraction(FitConfig(), (224, 224), (14, 14))  # 256 pixels a cell, 64 of them per step
    0.25
    >>> step_fraction(FitConfig(), (64, 64), (16, 16)), step_fraction(FitConfig(cell_samples=None), (224, 224), (14, 14))
    (1.0, 1.0)
    """
    frac = float(config.pixel_fraction)
    if config.cell_samples is not None:
        per_cell = out_size[0] * out_size[1] / (lr_size[0] * lr_size[1])
        frac = min(frac, config.cell_samples / per_cell)
    return frac


def prefilter_guide(guide: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """The guide ``[B, C, H, W]`` (values in [0, 1]) cleaned of impulse and strong additive noise
    (see ``FitConfig.guide_prefilter``).

    ``"impulse"``: an impulse is a pixel whose channels are all ``<= 1/255`` or all ``>= 254/255`` and
    that differs by more than 0.25 (in some channel) from the median of the non-impulse pixels of its
    3x3 neighbourhood; it is replaced by that median (by the plain 3x3 median where every neighbour is
    an impulse). Other pixels are never changed.
    ``"denoise"``: after that (always), :data:`DENOISE_PASSES` bilateral passes whose range sigma is
    :data:`DENOISE_RANGE` times the noise :func:`estimate_noise` measures.
    ``"auto"``: the impulse step only when more than :data:`IMPULSE_SHARE` of the pixels are
    impulses; the bilateral step only on batch items whose estimated noise exceeds
    :data:`NOISE_LEVEL` or whose :func:`estimate_blockiness` lies between :data:`JPEG_BLOCKINESS`
    and :data:`JPEG_BLOCKINESS_MAX` (JPEG blocks; range sigma at least :data:`JPEG_RANGE`). A clean
    guide is returned unchanged (the same tensor). Thresholds and measurements:
    ``docs/transfer_defaults.md``.
    """
    if mode not in PREFILTERS:
        raise ValueError(f"guide_prefilter must be one of {PREFILTERS}, got {mode!r}")
    if mode == "none":
        return guide
    out = _remove_impulses(guide, force=mode != "auto")
    if mode == "impulse":
        return out
    return _denoise(out, force=mode == "denoise")


def _denoise(guide: torch.Tensor, force: bool = False) -> torch.Tensor:
    """Bilateral-filter the batch items whose estimated noise exceeds :data:`NOISE_LEVEL` (range sigma
    ``DENOISE_RANGE * noise``) or whose JPEG blockiness exceeds :data:`JPEG_BLOCKINESS` (range sigma at
    least :data:`JPEG_RANGE`); ``force``: every item, with the noise rule's sigma."""
    noise = estimate_noise(guide)
    sigma = torch.where(noise > NOISE_LEVEL, DENOISE_RANGE * noise, torch.zeros_like(noise))
    if force:
        sigma = DENOISE_RANGE * noise
    if JPEG_RANGE > 0:
        blk = estimate_blockiness(guide)
        blocky = (blk > JPEG_BLOCKINESS) & (blk < JPEG_BLOCKINESS_MAX)
        sigma = torch.where(blocky, sigma.clamp_min(JPEG_RANGE), sigma)
    loud = sigma > 0
    if not bool(loud.any()):
        return guide
    out = guide
    for _ in range(DENOISE_PASSES):
        out = _bilateral(out, sigma.clamp_min(1e-6))
    return torch.where(loud.view(-1, 1, 1, 1), out, guide)


def estimate_blockiness(guide: torch.Tensor, block: int = 8) -> torch.Tensor:
    """JPEG blockiness of a guide ``[B, C, H, W]`` -> ``[B]``: the mean absolute step of the channel
    mean across the borders of the ``block``-pixel grid (JPEG's 8x8 blocks, anchored at the top-left
    pixel) over the mean step elsewhere, away from the image border (one block is left out on every
    side: replicated or constant margins of upsampled images would bias it). About 1 for an image
    without such a grid (0.7-1.1 measured on the benchmark's photos and scenes), 1.3-2.2 after JPEG
    quality 20 (``docs/transfer_defaults.md``); 1 when the image is smaller than 3 blocks a side.
    A nearest-neighbour upsampling by a multiple of 8 has steps only at the grid (a huge ratio):
    :func:`prefilter_guide` does not take that for JPEG (see :data:`JPEG_BLOCKINESS`)."""
    y = guide.mean(1)
    H, W = y.shape[-2:]
    if H < 3 * block or W < 3 * block:
        return guide.new_ones(guide.shape[0])
    b = block
    # steps between columns j and j + 1 for j in [b - 1, W - b), rows [b, H - b) (and the same for rows)
    dx = (y[:, b:-b, b : -b + 1 if b > 1 else None] - y[:, b:-b, b - 1 : -b]).abs_()
    dy = (y[:, b : -b + 1 if b > 1 else None, b:-b] - y[:, b - 1 : -b, b:-b]).abs_()
    on = dx[:, :, ::b].sum((1, 2)) + dy[:, ::b].sum((1, 2))  # j = b - 1, 2b - 1, ...: the grid borders
    n_on = dx[0, :, ::b].numel() + dy[0, ::b].numel()
    n_off = dx[0].numel() + dy[0].numel() - n_on
    off = dx.sum((1, 2)) + dy.sum((1, 2)) - on
    return (on / n_on) / (off / max(n_off, 1)).clamp_min(1e-12)


def _remove_impulses(guide: torch.Tensor, force: bool) -> torch.Tensor:
    lo, hi = 1.0 / 255, 254.0 / 255
    cand = (guide <= lo).all(1, keepdim=True) | (guide >= hi).all(1, keepdim=True)  # [B, 1, H, W]
    share = cand.flatten(1).float().mean(1)
    if not force and not bool((share > IMPULSE_SHARE).any()):
        return guide
    B, _, H, W = guide.shape
    # only candidates can change: their 3x3 neighbourhoods (replicated borders), in unfold's tap order
    b, y, x = cand[:, 0].nonzero(as_tuple=True)
    pad = torch.nn.functional.pad
    gp = pad(guide, (1, 1, 1, 1), mode="replicate")
    cp = pad(cand.to(guide.dtype), (1, 1, 1, 1), mode="replicate")[:, 0]
    g = torch.stack([gp[b, :, y + dy, x + dx] for dy in range(3) for dx in range(3)], -1)  # [N, C, 9]
    c = torch.stack([cp[b, y + dy, x + dx] for dy in range(3) for dx in range(3)], -1)[:, None] > 0.5
    nan = torch.full((), float("nan"), dtype=guide.dtype, device=guide.device)
    med = torch.where(c, nan, g).nanmedian(-1).values  # [N, C]
    med = torch.where(torch.isnan(med), g.median(-1).values, med)
    here = g[..., 4]
    imp = (here - med).abs().amax(1) > 0.25  # [N]
    n_imp = torch.zeros(B, dtype=torch.float32, device=guide.device).index_add_(0, b, imp.float())
    if not force and not bool((n_imp / (H * W) > IMPULSE_SHARE).any()):
        return guide
    out = guide.clone()
    out[b, :, y, x] = torch.where(imp[:, None], med, here)
    return out


def estimate_noise(guide: torch.Tensor) -> torch.Tensor:
    """Estimated std of additive white noise in a guide ``[B, C, H, W]`` -> ``[B]`` (guide units).

    The response to Immerkaer's Laplacian-difference mask ``[[1, -2, 1], [-2, 4, -2], [1, -2, 1]]``
    (zero on constant and linear patches; ``6 sigma`` std on white noise) is taken robustly: the
    median absolute response over the image / (0.6745 * 6), per channel, then the median over
    channels, so edges and texture (a minority of pixels) raise it little. Needs ``H, W >= 3``.
    """
    B, C, H, W = guide.shape
    if H < 3 or W < 3:
        return guide.new_zeros(B)
    per = []
    for c in range(C):  # one channel at a time, the mask as shifted sums: scratch of about two HR planes
        x = guide[:, c]
        r = x[:, :-2, :-2] + x[:, :-2, 2:]
        r += x[:, 2:, :-2]
        r += x[:, 2:, 2:]
        r.add_(x[:, :-2, 1:-1], alpha=-2).add_(x[:, 2:, 1:-1], alpha=-2)
        r.add_(x[:, 1:-1, :-2], alpha=-2).add_(x[:, 1:-1, 2:], alpha=-2)
        r.add_(x[:, 1:-1, 1:-1], alpha=4)
        r = r.abs_().flatten(1)
        step = max(1, r.shape[1] // NOISE_SAMPLES)  # the median of a regular subsample
        per.append(r[:, ::step].median(-1).values)
    return (torch.stack(per, 1) / (0.6745 * 6.0)).median(-1).values


#: False: the pre-filter's bilateral pass runs in torch (:func:`_bilateral_torch`) even where the fused
#: engine could run it (for tests and measurements)
FAST_BILATERAL = True


def _bilateral_taps(sigma_s: float, radius: int) -> list[tuple[int, int, float]]:
    """``(dy, dx, spatial term)`` of the bilateral filter's disc of ``radius`` px (offsets into the padding)."""
    k = 2 * radius + 1
    return [
        (dy, dx, ((dy - radius) ** 2 + (dx - radius) ** 2) / (2.0 * sigma_s**2))
        for dy in range(k)
        for dx in range(k)
        if (dy - radius) ** 2 + (dx - radius) ** 2 <= (radius + 0.5) ** 2
    ]


def _bilateral(
    guide: torch.Tensor, sigma_r: torch.Tensor, sigma_s: float = 1.5, radius: int = 3
) -> torch.Tensor:
    """Edge-preserving bilateral filter of ``guide [B, C, H, W]`` (range sigma ``sigma_r [B]``, guide units;
    Gaussian spatial weights of ``sigma_s`` px in a disc of ``radius`` px, borders replicated): the fused
    engine's pass (:func:`ua3d.core.fast.prefilter.bilateral`) for CPU float32/float64 guides when numba is
    there, else its reference :func:`_bilateral_torch`."""
    if (
        FAST_BILATERAL
        and guide.device.type == "cpu"
        and guide.dtype in (torch.float32, torch.float64)
        and fast_available()
    ):
        from .fast import prefilter

        return prefilter.bilateral(guide, sigma_r, sigma_s, radius, _bilateral_taps(sigma_s, radius))
    return _bilateral_torch(guide, sigma_r, sigma_s, radius)


def _bilateral_torch(
    guide: torch.Tensor, sigma_r: torch.Tensor, sigma_s: float = 1.5, radius: int = 3
) -> torch.Tensor:
    """The reference of :func:`_bilateral` (torch, any device), in bands of rows of about
    :data:`CELL_BAND_PIXELS` pixels (scratch of a few bands, not of the image)."""
    B, _, H, W = guide.shape
    pad = torch.nn.functional.pad(guide, (radius,) * 4, mode="replicate")
    out = torch.empty_like(guide)
    inv = (0.5 / sigma_r.to(guide.dtype) ** 2).view(B, 1, 1, 1)
    rows = max(1, CELL_BAND_PIXELS // max(1, W))
    taps = _bilateral_taps(sigma_s, radius)
    for y0 in range(0, H, rows):
        y1 = min(H, y0 + rows)
        centre = guide[:, :, y0:y1]
        acc = torch.zeros_like(centre)
        norm = torch.zeros(B, 1, y1 - y0, W, dtype=guide.dtype, device=guide.device)
        for dy, dx, ds in taps:
            q = pad[:, :, y0 + dy : y1 + dy, dx : dx + W]
            wgt = (q - centre).square_().sum(1, keepdim=True).mul_(-inv).sub_(ds).exp_()
            acc.addcmul_(wgt, q)
            norm += wgt
        out[:, :, y0:y1] = acc / norm
    return out


def _lr_guide(guide: torch.Tensor, lr_size: tuple[int, int], mode: str) -> torch.Tensor:
    if mode in CELL_MODES:
        return cell_guide(guide, lr_size, mode)
    return resample_guide(guide, lr_size, mode)


def lr_guides(guide_hr: torch.Tensor, lr_size: tuple[int, int], config: FitConfig):
    """``(range centres, fit values or None)`` on the LR grid for ``config`` (``[B, Cg, h, w]`` each).

    The centres are the ``guide_downsample`` LR guide; the values are None (= the centres) unless
    ``fit_values`` names another mode or ``values_mix > 0`` blends in the per-cell mode."""
    centres = _lr_guide(guide_hr, lr_size, config.guide_downsample)
    values = None
    if config.fit_values is not None and config.fit_values != config.guide_downsample:
        values = _lr_guide(guide_hr, lr_size, config.fit_values)
    if config.values_mix > 0:
        base = centres if values is None else values
        mode = centres if config.guide_downsample == "mode" else cell_guide(guide_hr, lr_size, "mode")
        values = torch.lerp(base, mode, config.values_mix)
    return centres, values


def _cell_bounds(n_hr: int, n_lr: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and stop HR index of every LR cell along one axis (``adaptive_avg_pool2d``'s cells)."""
    i = torch.arange(n_lr)
    return (i * n_hr) // n_lr, -((-(i + 1) * n_hr) // n_lr)


def _cell_pixels(
    guide: torch.Tensor, lr_size: tuple[int, int], rows: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixels [B, C, n, w, K], in_cell [n, w, K])``: the HR pixels of the LR cells of rows
    ``rows = (i0, i1)`` (default all, ``n = i1 - i0``; the cells of the ``"box"`` mean), padded to the
    largest cell; padding entries repeat a cell pixel and are False."""
    B, C, H, W = guide.shape
    h, w = lr_size
    y0, y1 = _cell_bounds(H, h)
    x0, x1 = _cell_bounds(W, w)
    ky, kx = int((y1 - y0).max()), int((x1 - x0).max())
    i0, i1 = (0, h) if rows is None else rows
    y0, y1 = y0[i0:i1], y1[i0:i1]
    ry = y0[:, None] + torch.arange(ky)[None]  # [n, ky]
    rx = x0[:, None] + torch.arange(kx)[None]  # [w, kx]
    oky, okx = ry < y1[:, None], rx < x1[:, None]
    ry, rx = torch.minimum(ry, y1[:, None] - 1), torch.minimum(rx, x1[:, None] - 1)
    dev = guide.device
    g = guide[:, :, ry.to(dev)][:, :, :, :, rx.to(dev)]  # [B, C, n, ky, w, kx]
    g = g.permute(0, 1, 2, 4, 3, 5).reshape(B, C, i1 - i0, w, ky * kx)
    ok = (oky[:, None, :, None] & okx[None, :, None, :]).reshape(i1 - i0, w, ky * kx).to(dev)
    return g, ok


#: HR pixels per band of LR rows that :func:`cell_guide` processes at once (bounds its scratch memory)
CELL_BAND_PIXELS = 1 << 16


def cell_guide(
    guide: torch.Tensor, lr_size: tuple[int, int], mode: str = "median", bandwidth: float | None = None
) -> torch.Tensor:
    """A robust aggregate of the HR pixels of every LR cell, ``[B, C, H, W] -> [B, C, h, w]``.

    The cells are those of the ``"box"`` mean (``adaptive_avg_pool2d``). ``"median"``: the per-channel
    median. ``"mode"``: a mean-shift mode seeking step from the median (8 iterations of the Gaussian-
    weighted mean of the cell's pixels, ``bandwidth`` in guide units, default :data:`MODE_BANDWIDTH`):
    the colour of the cell's dominant region rather than a mix of the regions a boundary or a texture
    cell contains. Bands of LR rows of about :data:`CELL_BAND_PIXELS` HR pixels at a time.
    """
    if mode not in CELL_MODES:
        raise ValueError(f"mode must be one of {CELL_MODES}, got {mode!r}")
    bandwidth = MODE_BANDWIDTH if bandwidth is None else float(bandwidth)
    H, W = guide.shape[-2:]
    h = lr_size[0]
    step = max(1, CELL_BAND_PIXELS // max(1, -(-H // h) * W))
    out = []
    for i0 in range(0, h, step):
        g, ok = _cell_pixels(guide, lr_size, (i0, min(h, i0 + step)))
        nan = torch.full((), float("nan"), dtype=guide.dtype, device=guide.device)
        m = torch.where(ok, g, nan).nanmedian(-1).values
        if mode == "mode":
            okf = ok.to(guide.dtype)
            for _ in range(8):
                d2 = ((g - m[..., None]) ** 2).sum(1, keepdim=True)
                wgt = torch.exp_(d2.mul_(-0.5 / bandwidth**2)).mul_(okf)
                m = (wgt * g).sum(-1) / wgt.sum(-1).clamp_min(1e-30)
        out.append(m)
    return torch.cat(out, 2)


class _Adam:
    """Adam with an exponentially decaying learning rate, written out: the same update as
    ``torch.optim.Adam`` (betas 0.9 / 0.999, eps 1e-8, bias-corrected, no weight decay) followed
    by ``ExponentialLR.step()``, without the optimiser machinery, which costs more than the
    update itself on these small parameter maps (~0.6 ms a step)."""

    def __init__(self, params: torch.Tensor, lr: float, decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.p, self.lr, self.decay, self.eps = params, float(lr), float(decay), eps
        self.b1, self.b2 = betas
        self.m = torch.zeros_like(params)
        self.v = torch.zeros_like(params)
        self.t = 0

    def step(self, grad: torch.Tensor) -> None:
        self.t += 1
        self.m.lerp_(grad, 1 - self.b1)
        self.v.mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
        bc1 = 1 - self.b1**self.t
        bc2 = 1 - self.b2**self.t
        if self.v.device.type == "cpu":  # torch's sqrt wakes OpenMP threads that spin against the engine's
            denom = torch.from_numpy(np.sqrt(self.v.numpy()))
        else:
            denom = self.v.sqrt()
        denom = (denom / math.sqrt(bc2)).add_(self.eps)
        self.p.addcdiv_(self.m, denom, value=-self.lr / bc1)
        self.lr *= self.decay


def _stages(
    config: FitConfig, out_size: tuple[int, int], lr_size: tuple[int, int]
) -> list[tuple[tuple[int, int], int]]:
    """``[(HR size, steps), ...]``: one stage, or a coarse stage then ``fine_steps`` at full size."""
    H, W = out_size
    if config.coarse_to_fine >= 1.0 or config.steps <= config.fine_steps:
        return [((H, W), config.steps)]
    h, w = lr_size
    size = (max(h, round(H * config.coarse_to_fine)), max(w, round(W * config.coarse_to_fine)))
    if size == (H, W):
        return [((H, W), config.steps)]
    return [(size, config.steps - config.fine_steps), ((H, W), config.fine_steps)]


def _stage_guide(guide_hr: torch.Tensor, valid_hr: torch.Tensor | None, size: tuple[int, int]):
    """The HR guide (and its validity) at a stage's size (area resampling; nearest for masks)."""
    if tuple(guide_hr.shape[-2:]) == tuple(size):
        return guide_hr, valid_hr
    g = resample_guide(guide_hr, size, "area")
    v = None
    if valid_hr is not None:
        v = torch.nn.functional.interpolate(valid_hr.to(guide_hr.dtype), size=size, mode="nearest") > 0.5
    return g, v


def _sigma_shift(
    params: torch.Tensor, size: tuple[int, int], out_size: tuple[int, int]
) -> tuple[float, float]:
    """Change of ``(log sigma_x, log sigma_y)`` when HR pixels are rescaled from ``out_size`` to ``size``."""
    return math.log(size[1] / out_size[1]), math.log(size[0] / out_size[0])
