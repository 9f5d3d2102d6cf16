r"""The Upsample Anything kernel: geometry, weights and rendering (pure-PyTorch reference).

This module is the oracle. It is written for clarity, not speed; every faster
path in :mod:`ua3d.core.fast` has a same-named ``*_reference`` twin here and is
tested against it, the *adaptive support* cut (``support_sigmas``) included. The
log-weight of a pair is written once, :func:`spatial_colour_logits` (the volume
reference of :mod:`ua3d.rgbd.volume` uses it too).

Notation
--------
* HR (output) grid ``H x W``, pixel ``p = (y, x)`` with integer centres.
* LR grid ``h x w``, cell ``q = (i, j)``.
* Per-axis float scales ``s_y = H / h``, ``s_x = W / w`` (any ratio, non-square).
* An HR pixel maps to LR coordinates by the ``align_corners=False`` rule
  ``u = (x + 0.5) * w / W - 0.5``; the LR cell centre in HR pixels is therefore
  ``c_x(j) = (j + 0.5) * W / w - 0.5`` (same for rows).
* Each HR pixel looks at the LR cells ``anchor(p) + o`` for the window offsets
  ``o`` with ``|o| <= radius`` (a disc; radius 8 gives 197 neighbours), where
  ``anchor(p)`` is the nearest LR cell. Cells outside the LR grid are excluded.

Parameters
----------
One tensor ``params [B, 3 + G, h, w]`` of unconstrained values per LR cell:

====== =========================================================
index  meaning
====== =========================================================
0      ``log sigma_x`` (HR pixels)
1      ``log sigma_y`` (HR pixels)
2      ``theta_raw``; ``theta = (pi / 2) * tanh(theta_raw)``
3+g    ``log sigma_r`` of range group ``g`` (guide units)
====== =========================================================

Log-sigmas are clamped to ``[LOG_SIGMA_MIN, LOG_SIGMA_MAX]``; the one decoding rule is
:func:`ua3d.core.params.decode_params`.

The guide's channels are split into ``G`` consecutive *range groups* (``groups``,
channel counts); by default one group holds every channel (RGB, or any channel
count). The RGB-D lift uses a second group for (log) depth. Each group ``g`` has
optional validity masks ``valid_hr [B, G, H, W]`` and ``valid_lr [B, G, h, w]``;
a group's range term is applied to a pair ``(p, q)`` only where both are valid
(holes carry no evidence, they are never "very close").

Weight
------
.. math::

    \ell(p, q) = -\tfrac12 \left(\frac{a^2}{\sigma_x^2} + \frac{b^2}{\sigma_y^2}\right)
                 - \sum_g \frac{\lVert g_g(p) - \bar g_g(q) \rVert^2}{2 \sigma_{r,g}(q)^2}

with ``(a, b)`` the offset ``p - c(q)`` rotated by ``theta(q)``, ``g`` the HR guide
and ``\bar g`` the guide on the LR grid. ``w(p, q) = softmax_q \ell(p, q)`` over the
window (log-sum-exp; the anchor is always in the window, so the normaliser is
never zero and no NaN can appear). ``out(p) = sum_q w(p, q) f(q)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from .params import LOG_SIGMA_MAX, LOG_SIGMA_MIN, THETA_MAX, decode_params, theta_from_raw, theta_to_raw

__all__ = [
    "GUIDE_DOWNSAMPLE_MODES",
    "LOG_SIGMA_MAX",
    "LOG_SIGMA_MIN",
    "THETA_MAX",
    "check_support_sigmas",
    "init_params",
    "kernel_fit_loss_grad_reference",
    "kernel_render_reference",
    "kernel_weights_reference",
    "lr_centres",
    "nearest_anchor",
    "pair_logits",
    "resample_guide",
    "row_chunks",
    "spatial_colour_logits",
    "theta_from_raw",
    "theta_to_raw",
    "window_offsets",
]


# --------------------------------------------------------------------------- geometry
def window_offsets(radius: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Integer LR offsets ``(di, dj)`` of the disc ``di^2 + dj^2 <= radius^2``.

    Returns
    -------
    torch.Tensor
        ``[K, 2]`` int64, sorted row-major; ``(0, 0)`` is always included.

    >>> window_offsets(1).tolist()
    [[-1, 0], [0, -1], [0, 0], [0, 1], [1, 0]]
    >>> window_offsets(8).shape[0]  # the paper's window
    197
    """
    if not (radius >= 0) or not math.isfinite(radius):
        raise ValueError(f"radius must be a finite number >= 0, got {radius!r}")
    r = math.floor(radius)
    rng = torch.arange(-r, r + 1)
    di, dj = torch.meshgrid(rng, rng, indexing="ij")
    keep = (di * di + dj * dj) <= radius * radius + 1e-9
    return torch.stack([di[keep], dj[keep]], dim=1).to(device)


def lr_centres(n_lr: int, n_hr: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """HR pixel coordinate of each LR cell centre: ``(i + 0.5) * n_hr / n_lr - 0.5``. ``[n_lr]``.

    >>> lr_centres(2, 8).tolist()
    [1.5, 5.5]
    """
    i = torch.arange(n_lr, device=device, dtype=torch.float64)
    return ((i + 0.5) * (n_hr / n_lr) - 0.5).to(dtype)


def nearest_anchor(n_hr: int, n_lr: int, device=None) -> torch.Tensor:
    """Nearest LR cell of each HR pixel along one axis, exact integer arithmetic. ``[n_hr]`` int64.

    ``round(u)`` with ``u = (y + 0.5) n_lr / n_hr - 0.5`` equals
    ``floor((2y + 1) n_lr / (2 n_hr))`` (ties go up), clamped to ``[0, n_lr - 1]``.

    >>> nearest_anchor(8, 2).tolist()
    [0, 0, 0, 0, 1, 1, 1, 1]
    >>> nearest_anchor(3, 2).tolist()  # the middle pixel sits on a tie: it goes up
    [0, 1, 1]
    """
    y = torch.arange(n_hr, device=device, dtype=torch.int64)
    return torch.div((2 * y + 1) * n_lr, 2 * n_hr, rounding_mode="floor").clamp_(0, n_lr - 1)


def init_params(
    batch: int,
    lr_size: tuple[int, int],
    out_size: tuple[int, int],
    *,
    sigma_spatial: float | tuple[float, float] | None = None,
    sigma_range: float | Sequence[float] = 0.12,
    theta: float = 0.0,
    device=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """Constant initial parameters ``[B, 3 + G, h, w]``.

    ``sigma_spatial`` defaults to the per-axis scale ``(W / w, H / h)`` in HR pixels
    (the authors' "sigma = scale"); a float sets both axes, a pair sets ``(sigma_x, sigma_y)``.
    ``sigma_range`` is one value per range group.

    >>> p = init_params(1, (4, 4), (16, 32), sigma_range=(0.1, 0.2))
    >>> tuple(p.shape)
    (1, 5, 4, 4)
    >>> d = decode_params(p)
    >>> round(d.log_sigma_x.exp()[0, 0, 0].item(), 4), round(d.log_sigma_y.exp()[0, 0, 0].item(), 4)
    (8.0, 4.0)
    >>> [round(v, 4) for v in d.log_sigma_r.exp()[0, :, 0, 0].tolist()]
    [0.1, 0.2]
    """
    h, w = lr_size
    H, W = out_size
    if sigma_spatial is None:
        sx, sy = W / w, H / h
    elif isinstance(sigma_spatial, (tuple, list)):
        sx, sy = float(sigma_spatial[0]), float(sigma_spatial[1])
    else:
        sx = sy = float(sigma_spatial)
    srs = [float(sigma_range)] if isinstance(sigma_range, (int, float)) else [float(s) for s in sigma_range]
    for name, v in (("sigma_spatial", sx), ("sigma_spatial", sy), *(("sigma_range", s) for s in srs)):
        if not (v > 0) or not math.isfinite(v):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    vals = [math.log(sx), math.log(sy), float(theta_to_raw(torch.tensor(theta, dtype=torch.float64)))]
    vals += [math.log(s) for s in srs]
    p = torch.tensor(vals, device=device, dtype=dtype).view(1, -1, 1, 1)
    return p.expand(batch, -1, h, w).contiguous()


#: the ways :func:`resample_guide` makes an LR guide
GUIDE_DOWNSAMPLE_MODES = ("box", "area", "bilinear")


def resample_guide(guide: torch.Tensor, lr_size: tuple[int, int], mode: str = "area") -> torch.Tensor:
    """Guide on the LR grid, ``[B, C, H, W] -> [B, C, h, w]``.

    ``mode="box"`` is the mean of the HR pixels under each LR cell (``adaptive_avg_pool2d``; for a
    non-integer ratio the cells' footprints overlap by at most one pixel), i.e. exactly what a patch
    token or an area-pooled label map aggregates; ``"area"`` (default) is antialiased bilinear (a
    triangle low-pass, then a sample at the LR centres); ``"bilinear"`` samples the HR guide at the
    LR centres without low-pass (classic JBU's ``I(q)``).
    """
    if mode == "box":
        return F.interpolate(guide, size=lr_size, mode="area")
    if mode == "area":
        return F.interpolate(guide, size=lr_size, mode="bilinear", antialias=True, align_corners=False)
    if mode == "bilinear":
        return F.interpolate(guide, size=lr_size, mode="bilinear", antialias=False, align_corners=False)
    raise ValueError(f"mode must be one of {GUIDE_DOWNSAMPLE_MODES}, got {mode!r}")


def row_chunks(n_rows: int, chunk: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, stop)`` row ranges of at most ``chunk`` rows."""
    chunk = max(1, int(chunk))
    for s in range(0, n_rows, chunk):
        yield s, min(n_rows, s + chunk)


def _group_index(groups: Sequence[int], n_channels: int) -> list[tuple[int, int]]:
    if sum(groups) != n_channels or any(g <= 0 for g in groups):
        raise ValueError(f"groups {tuple(groups)} must be positive channel counts summing to {n_channels}")
    out, s = [], 0
    for g in groups:
        out.append((s, s + g))
        s += g
    return out


# --------------------------------------------------------------------------- logits
def spatial_colour_logits(
    dx: torch.Tensor,
    dy: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    prec_x: torch.Tensor,
    prec_y: torch.Tensor,
    ranges: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = (),
) -> torch.Tensor:
    """The kernel's log-weight of pairs, from per-pair (broadcastable) quantities: the one torch form.

    ``l = -(a^2 px + b^2 py) - sum_g pr_g D_g`` with the rotated offsets ``a = cos dx + sin dy``,
    ``b = cos dy - sin dx`` (``(dx, dy) = p - c(q)`` in HR pixels), the precisions
    ``px = 1 / (2 sigma_x^2)``, ``py = 1 / (2 sigma_y^2)`` and, per range group, ``ranges`` holds
    ``(D_g, pr_g, ok_g)``: the squared guide distance, ``1 / (2 sigma_r^2)`` and the pairs where the
    term applies (None: every pair). Used by :func:`pair_logits` and the volume reference
    (``ua3d.rgbd.volume``); the numba kernels of :mod:`ua3d.core.fast.blocks` are its fused twins.

    >>> one = torch.ones(())
    >>> spatial_colour_logits(2 * one, one, one, 0 * one, 0.5 * one, one).item()  # -(4 / 2 + 1)
    -3.0
    """
    a = cos * dx + sin * dy
    b = cos * dy - sin * dx
    out = -(a * a * prec_x + b * b * prec_y)
    for dist, prec, ok in ranges:
        term = dist * prec
        if ok is not None:
            term = torch.where(ok, term, torch.zeros((), dtype=term.dtype, device=term.device))
        out = out - term
    return out


def check_support_sigmas(support_sigmas: float | None) -> float:
    """The support cut in sigmas as a float, ``0.0`` for None (no cut); error unless positive and finite."""
    if support_sigmas is None:
        return 0.0
    if not (support_sigmas > 0) or not math.isfinite(support_sigmas):
        raise ValueError(f"support_sigmas must be a positive finite number or None, got {support_sigmas!r}")
    return float(support_sigmas)


def pair_logits(
    params: torch.Tensor,
    guide_hr: torch.Tensor,
    guide_lr: torch.Tensor,
    rows: tuple[int, int],
    radius: float,
    groups: Sequence[int] | None = None,
    valid_hr: torch.Tensor | None = None,
    valid_lr: torch.Tensor | None = None,
    support_sigmas: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalised log-weights for the HR rows ``rows = (y0, y1)``.

    Parameters
    ----------
    params : ``[B, 3 + G, h, w]``
    guide_hr : ``[B, Cg, H, W]``
    guide_lr : ``[B, Cg, h, w]``
    rows : ``(y0, y1)`` HR row range (``R = y1 - y0``)
    radius : window radius in LR cells
    groups : channel counts of the G range groups (default: one group)
    valid_hr : ``[B, G, H, W]`` bool or None
    valid_lr : ``[B, G, h, w]`` bool or None
    support_sigmas : None, or the *adaptive support* cut: pairs whose spatial Mahalanobis distance
        ``sqrt(a^2 / sigma_x^2 + b^2 / sigma_y^2)`` exceeds it get ``-inf`` (the anchor always stays).

    Returns
    -------
    logits : ``[B, K, R, W]`` (``-inf`` outside the LR grid and beyond the cut)
    flat : ``[K, R, W]`` int64 flat LR index of each neighbour (clamped inside the grid)
    inside : ``[K, R, W]`` bool, neighbour inside the LR grid
    """
    _B, P, h, w = params.shape
    Cg, H, W = guide_hr.shape[1:]
    groups = (Cg,) if groups is None else tuple(groups)
    gidx = _group_index(groups, Cg)
    if P != 3 + len(groups):
        raise ValueError(f"params has {P} channels, expected 3 + {len(groups)} range groups")
    cut = check_support_sigmas(support_sigmas)
    dev = params.device
    dtype = params.dtype
    y0, y1 = rows
    offs = window_offsets(radius, dev)
    di, dj = offs[:, 0], offs[:, 1]
    iy = nearest_anchor(H, h, dev)[y0:y1]
    ix = nearest_anchor(W, w, dev)
    ny = iy[None, :] + di[:, None]  # [K, R]
    nx = ix[None, :] + dj[:, None]  # [K, W]
    inside = ((ny >= 0) & (ny < h))[:, :, None] & ((nx >= 0) & (nx < w))[:, None, :]
    nyc, nxc = ny.clamp(0, h - 1), nx.clamp(0, w - 1)
    flat = nyc[:, :, None] * w + nxc[:, None, :]  # [K, R, W]

    ys = torch.arange(y0, y1, device=dev, dtype=dtype)
    xs = torch.arange(W, device=dev, dtype=dtype)
    dy = (ys[None, :] - lr_centres(h, H, dev, dtype)[nyc])[:, :, None]  # [K, R, 1]
    dx = (xs[None, :] - lr_centres(w, W, dev, dtype)[nxc])[:, None, :]  # [K, 1, W]

    pf = params.flatten(2)[:, :, flat]  # [B, P, K, R, W]
    lsx, lsy, th, lsr_all = decode_params(pf)
    c, s = torch.cos(th), torch.sin(th)
    prec_x, prec_y = 0.5 * torch.exp(-2 * lsx), 0.5 * torch.exp(-2 * lsy)
    keep = None
    if cut > 0:  # spatial Mahalanobis distance d^2 = -2 (spatial logit) beyond the cut; the anchor stays
        spatial = spatial_colour_logits(dx, dy, c, s, prec_x, prec_y)
        anchor = ((di == 0) & (dj == 0)).view(1, -1, 1, 1)
        keep = (spatial >= -0.5 * cut * cut) | anchor

    glr = guide_lr.flatten(2)
    ranges = []
    for g, (c0, c1) in enumerate(gidx):
        ghr = guide_hr[:, c0:c1, y0:y1][:, :, None]  # [B, cg, 1, R, W]
        gq = glr[:, c0:c1][:, :, flat]  # [B, cg, K, R, W]
        diff = ((ghr - gq) ** 2).sum(1)  # [B, K, R, W]
        pair_ok = None
        if valid_hr is not None:
            pair_ok = valid_hr[:, g, y0:y1][:, None]  # [B, 1, R, W]
        if valid_lr is not None:
            vq = valid_lr[:, g].flatten(1)[:, flat]  # [B, K, R, W]
            pair_ok = vq if pair_ok is None else (pair_ok & vq)
        ranges.append((diff, 0.5 * torch.exp(-2 * lsr_all[:, g]), pair_ok))
    logits = spatial_colour_logits(dx, dy, c, s, prec_x, prec_y, ranges)
    logits = logits.masked_fill(~inside, float("-inf"))
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits, flat, inside


# --------------------------------------------------------------------------- weights / render
def kernel_weights_reference(
    params: torch.Tensor,
    guide_hr: torch.Tensor,
    guide_lr: torch.Tensor,
    radius: float,
    groups: Sequence[int] | None = None,
    valid_hr: torch.Tensor | None = None,
    valid_lr: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised weights for every HR pixel (small sizes only: memory ``B K H W``).

    Returns ``weights [B, K, H, W]`` (zero outside the grid, sums to 1 over K),
    ``flat [K, H, W]`` and ``inside [K, H, W]``.
    """
    H = guide_hr.shape[-2]
    logits, flat, inside = pair_logits(params, guide_hr, guide_lr, (0, H), radius, groups, valid_hr, valid_lr)
    return torch.softmax(logits, dim=1), flat, inside


def _render_rows(logits, flat, signal, signal_mask):
    """``out [B, C, R, W]`` and ``support [B, 1, R, W]`` from the logits of a row chunk.

    Pairs with a ``-inf`` logit (outside the grid, beyond a support cut) and, with ``signal_mask
    [B, 1, h, w]``, invalid LR values carry no weight; pixels left without a usable neighbour get NaN
    and ``support=False`` (only possible with a signal mask: the anchor is always usable otherwise).
    """
    usable = torch.isfinite(logits)
    if signal_mask is not None:
        usable = usable & signal_mask.flatten(2)[:, 0][:, flat]
    support = usable.any(1, keepdim=True)  # [B, 1, R, W]
    safe = torch.where(
        usable, logits, torch.full((), float("-inf"), dtype=logits.dtype, device=logits.device)
    )
    safe = torch.where(support, safe, torch.zeros((), dtype=logits.dtype, device=logits.device))
    wts = torch.softmax(safe, dim=1) * support
    vals = signal.flatten(2)[:, :, flat]
    if signal_mask is not None:
        vals = torch.where(usable[:, None], vals, torch.zeros((), dtype=vals.dtype, device=vals.device))
    out = torch.einsum("bkrw,bckrw->bcrw", wts, vals)
    if signal_mask is not None:
        out = torch.where(support, out, torch.full((), float("nan"), dtype=out.dtype, device=out.device))
    return out, support


def kernel_render_reference(
    params: torch.Tensor,
    guide_hr: torch.Tensor,
    guide_lr: torch.Tensor,
    signal: torch.Tensor,
    radius: float,
    groups: Sequence[int] | None = None,
    valid_hr: torch.Tensor | None = None,
    valid_lr: torch.Tensor | None = None,
    signal_mask: torch.Tensor | None = None,
    rows_per_chunk: int = 16,
    support_sigmas: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render an LR signal with the kernel: ``out(p) = sum_q w(p, q) f(q)``.

    Parameters
    ----------
    signal : ``[B, C, h, w]``
    signal_mask : ``[B, 1, h, w]`` bool or None. Where False the LR value is invalid
        (e.g. a depth hole): it is excluded and the weights renormalised over the
        valid neighbours. Pixels with no valid neighbour get NaN and ``support=False``.
    support_sigmas : None, or the adaptive support cut (see :func:`pair_logits`).

    Returns
    -------
    out : ``[B, C, H, W]`` in the signal's dtype
    support : ``[B, 1, H, W]`` bool
    """
    H, W = guide_hr.shape[-2:]
    B, C = signal.shape[:2]
    out = signal.new_empty(B, C, H, W)
    support = torch.empty(B, 1, H, W, dtype=torch.bool, device=signal.device)
    for y0, y1 in row_chunks(H, rows_per_chunk):
        logits, flat, _ = pair_logits(
            params, guide_hr, guide_lr, (y0, y1), radius, groups, valid_hr, valid_lr, support_sigmas
        )
        o, s = _render_rows(logits, flat, signal, signal_mask)
        out[:, :, y0:y1] = o.to(signal.dtype)
        support[:, :, y0:y1] = s
    return out, support


def kernel_fit_loss_grad_reference(
    params: torch.Tensor,
    guide_hr: torch.Tensor,
    guide_lr: torch.Tensor,
    radius: float,
    groups: Sequence[int] | None = None,
    valid_hr: torch.Tensor | None = None,
    valid_lr: torch.Tensor | None = None,
    channel_weights: torch.Tensor | None = None,
    pixel_mask: torch.Tensor | None = None,
    rows_per_chunk: int = 16,
    values_lr: torch.Tensor | None = None,
    support_sigmas: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TTO objective and its gradient w.r.t. ``params`` (autograd, one row chunk at a time).

    The loss is the weighted mean absolute reconstruction error

    .. math:: L = \\sum_b \\frac{\\sum_{p,c} m_c(p)\\, \\lambda_c\\, |\\hat g_c(p) - g_c(p)|}{\\sum_{p,c} m_c(p)}

    (a mean per sample, summed over the batch, so that batch samples are fitted independently)

    where ``\\hat g = render(values_lr)`` (``values_lr [B, Cg, h, w]``, default ``guide_lr``: the
    range centres are always ``guide_lr``), ``lambda = channel_weights [Cg]`` and
    ``m_c(p)`` is ``valid_hr`` of the channel's group (and ``pixel_mask [B, 1, H, W]``,
    e.g. a random subset of pixels). Memory is bounded by the row chunk: each chunk's
    graph is freed after its backward. ``support_sigmas``: the adaptive support cut of
    :func:`pair_logits` (a fixed mask: no gradient flows through it).

    Returns
    -------
    loss : scalar tensor (detached)
    grad : ``[B, 3 + G, h, w]``
    """
    Cg, H, _W = guide_hr.shape[1:]
    groups_t = (Cg,) if groups is None else tuple(groups)
    gidx = _group_index(groups_t, Cg)
    lam = (
        torch.ones(Cg, dtype=params.dtype, device=params.device)
        if channel_weights is None
        else channel_weights
    )
    mask = _loss_mask(guide_hr, gidx, valid_hr, pixel_mask)
    # per-sample means, summed over the batch: samples are fitted independently
    if mask is not None:
        denom = mask.sum(dim=(1, 2, 3)).clamp_min(1.0)
    else:
        denom = torch.full(
            (guide_hr.shape[0],), float(guide_hr[0].numel()), dtype=params.dtype, device=params.device
        )
    p = params.detach().requires_grad_(True)
    total = torch.zeros((), dtype=params.dtype, device=params.device)
    for y0, y1 in row_chunks(H, rows_per_chunk):
        logits, flat, _ = pair_logits(
            p, guide_hr, guide_lr, (y0, y1), radius, groups_t, valid_hr, valid_lr, support_sigmas
        )
        rec, _ = _render_rows(logits, flat, guide_lr if values_lr is None else values_lr, None)
        err = (rec - guide_hr[:, :, y0:y1]).abs() * lam.view(1, -1, 1, 1)
        if mask is not None:
            err = err * mask[:, :, y0:y1]
        loss = (err.sum(dim=(1, 2, 3)) / denom).sum()
        loss.backward()
        total = total + loss.detach()
    return total, p.grad.detach()  # type: ignore[union-attr]  # set by backward()


def _loss_mask(guide_hr, gidx, valid_hr, pixel_mask):
    """Per-channel loss mask ``[B, Cg, H, W]`` float, or None when every pixel counts."""
    if valid_hr is None and pixel_mask is None:
        return None
    B, Cg, H, W = guide_hr.shape
    m = torch.ones(B, Cg, H, W, dtype=guide_hr.dtype, device=guide_hr.device)
    if valid_hr is not None:
        for g, (c0, c1) in enumerate(gidx):
            m[:, c0:c1] *= valid_hr[:, g : g + 1].to(m.dtype)
    if pixel_mask is not None:
        m = m * pixel_mask.to(m.dtype)
    return m
