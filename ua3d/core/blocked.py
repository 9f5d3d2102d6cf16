r"""Blocked tensor engine (any torch device): the fit loss/gradient and the render of the kernel.

Numerically the functions of the ``*_reference`` twins in :mod:`ua3d.core.kernel` (see there for the
maths and the parameterisation), organised like the fused CPU engine :mod:`ua3d.core.fast`, but in
plain torch operations, so that it runs on a CUDA device (and, for testing, on CPU):

* **Blocks.** HR pixels that share the same nearest LR anchor ``(i, j)`` form a block; they share
  one neighbour list (the window offsets around the anchor). A chunk of ``nb`` blocks gathers
  its neighbours' decoded parameters once, ``[nb, K]``; the block's pixels are padded to the
  largest block, ``n = by * bx`` slots (a non-integer size ratio makes blocks of two sizes; the
  padding slots are masked out).
* **Logits** ``[nb, n, K]``: the spatial term (offsets rotated by each neighbour's angle) plus the
  range term of every group (masked by ``valid_hr`` / ``valid_lr`` like
  :func:`ua3d.core.kernel.pair_logits`); neighbours outside the LR grid are ``-inf``; the anchor
  is always inside, so the softmax over ``K`` never divides by zero.
* **Render** by ``torch.bmm`` of the weights ``[nb, n, K]`` with the gathered signal
  ``[nb, K, C]``; the ``[nb, n, C]`` result is scattered to the output's pixels.
* **Fit.** The same forward on the LR values, the weighted L1 loss of
  :func:`ua3d.core.kernel.kernel_fit_loss_grad_reference`, and autograd per chunk, with the
  graph freed after each chunk's backward. The leaves are the decoded per-cell values (``cos,
  sin, exp(-2 log sigma)``), computed once per call; one backward through
  :func:`ua3d.core.params.decode_params` at the end gives the gradient w.r.t. ``params``.
* **Memory.** Chunks of blocks are sized by a working-memory budget (:func:`work_budget_bytes`:
  :data:`WORK_BYTES` on CPU, a share of the free device memory on CUDA), so memory is the output
  plus a bounded working set: linear in pixels (:func:`estimate_memory`).

Supported as in the reference: range groups, ``valid_hr`` / ``valid_lr``, ``signal_mask``
(renormalised over valid LR values, NaN and ``support = False`` without any), ``channel_weights``,
``pixel_mask``, ``values_lr``, ``out_dtype``, and the support cut (``support_sigmas``) of
:mod:`ua3d.core.ops`. Parameters must be float32 or float64 (the compute dtype); other dtypes and
tensors on different devices are refused with a ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from .kernel import _group_index, lr_centres, nearest_anchor, spatial_colour_logits, window_offsets
from .memory import MEMORY_FRACTION, available_memory_bytes, check_memory
from .params import decode_params

__all__ = [
    "WORK_BYTES",
    "estimate_memory",
    "kernel_fit_loss_grad",
    "kernel_render",
    "work_budget_bytes",
]

#: working-memory budget of one chunk of blocks on CPU (bytes), on top of the output
WORK_BYTES = 256 << 20
#: on CUDA: this share of the free device memory, at most :data:`CUDA_WORK_MAX` bytes
CUDA_WORK_SHARE = 0.25
CUDA_WORK_MAX = 2 << 30
#: live ``[nb, n, K]`` tensors per pair (render: offsets, rotated offsets, logits, weights; fit: the
#: autograd graph keeps about twice as many), used to size the chunks
RENDER_PAIR_TENSORS = 8
FIT_PAIR_TENSORS = 20


class Layout(NamedTuple):
    """Blocks of an ``(H, W) <- (h, w)`` pair on one device (built by :func:`_layout`)."""

    offs: torch.Tensor  # [K, 2] int64 window offsets (di, dj)
    anchor: int  # index of the offset (0, 0)
    ry0: torch.Tensor  # [h] int64 first HR row whose anchor is row i
    ry1: torch.Tensor  # [h] one past the last
    cx0: torch.Tensor  # [w]
    cx1: torch.Tensor  # [w]
    by: int  # rows of the largest block
    bx: int  # columns of the largest block
    cy: torch.Tensor  # [h] LR centres in HR pixels (compute dtype)
    cx: torch.Tensor  # [w]


class Chunk(NamedTuple):
    """Pixels and neighbours of the blocks ``t0 <= t < t1`` (``t = i w + j``) of one sample."""

    pix: torch.Tensor  # [nb, n] flat HR index y W + x (clamped into the image for padding slots)
    slot_ok: torch.Tensor  # [nb, n] bool, a real pixel of the block
    ys: torch.Tensor  # [nb, n] HR row (compute dtype)
    xs: torch.Tensor  # [nb, n] HR column
    nbr: torch.Tensor  # [nb, K] flat LR index of each neighbour (clamped inside the grid)
    inside: torch.Tensor  # [nb, K] bool, neighbour inside the LR grid
    qy: torch.Tensor  # [nb, K] neighbour centre row (HR pixels)
    qx: torch.Tensor  # [nb, K] neighbour centre column


class Cells(NamedTuple):
    """Decoded parameters per LR cell of one sample, ``[h w]`` each (``rg [G, h w]``)."""

    c: torch.Tensor  # cos theta
    s: torch.Tensor  # sin theta
    ex: torch.Tensor  # exp(-2 log sigma_x)
    ey: torch.Tensor  # exp(-2 log sigma_y)
    rg: torch.Tensor  # exp(-2 log sigma_r) per range group


# --------------------------------------------------------------------------- checks
def _check(params, guide_hr, guide_lr, radius, groups, valid_hr, valid_lr) -> tuple[int, ...]:
    """Shapes, dtypes and devices the engine handles; returns the range groups."""
    for name, t in (("params", params), ("guide_hr", guide_hr), ("guide_lr", guide_lr)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4 or t.numel() == 0:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a non-empty 4-D tensor, got {got}")
        if t.device != params.device:
            raise ValueError(f"{name} is on {t.device} but params on {params.device}: use one device")
    if params.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"the blocked engine computes in float32 or float64 (the dtype of params), got {params.dtype}"
        )
    B, P, h, w = params.shape
    _, Cg, H, W = guide_hr.shape
    gs = (Cg,) if groups is None else tuple(int(v) for v in groups)
    _group_index(gs, Cg)  # the reference's check of the groups
    if P != 3 + len(gs):
        raise ValueError(
            f"params has {P} channels, expected 3 + {len(gs)} range groups (shape {tuple(params.shape)})"
        )
    if guide_hr.shape[0] != B or tuple(guide_lr.shape) != (B, Cg, h, w):
        raise ValueError(
            f"guide_hr {tuple(guide_hr.shape)} and guide_lr {tuple(guide_lr.shape)} do not match "
            f"params {tuple(params.shape)}"
        )
    if not (radius >= 0) or not math.isfinite(radius):
        raise ValueError(f"radius must be a finite number >= 0, got {radius!r}")
    G = len(gs)
    _check_optional(params, {"valid_hr": (valid_hr, (B, G, H, W)), "valid_lr": (valid_lr, (B, G, h, w))})
    return gs


def _check_optional(params: torch.Tensor, tensors: dict) -> None:
    """Each ``name: (tensor or None, shape)`` has that shape and the device of ``params``."""
    for name, (t, shape) in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {got}")
        if t.device != params.device:
            raise ValueError(f"{name} is on {t.device} but params on {params.device}: use one device")


# --------------------------------------------------------------------------- memory
def work_budget_bytes(device: torch.device | str) -> int:
    """Working memory one chunk may use: :data:`WORK_BYTES` on CPU (at most ``MEMORY_FRACTION / 4`` of
    the available memory), a share of the free memory on a CUDA device."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(min(CUDA_WORK_MAX, CUDA_WORK_SHARE * free))
    return int(min(WORK_BYTES, MEMORY_FRACTION * available_memory_bytes() / 4))


def _block_shape(out_size: tuple[int, int], lr_size: tuple[int, int]) -> tuple[int, int]:
    """Rows and columns of the largest block (HR pixels sharing one anchor)."""
    (H, W), (h, w) = out_size, lr_size
    by = int(torch.bincount(nearest_anchor(H, h), minlength=h).max())
    bx = int(torch.bincount(nearest_anchor(W, w), minlength=w).max())
    return max(1, by), max(1, bx)


def _block_bytes(n: int, K: int, channels: int, item: int, fit: bool) -> int:
    """Working bytes of one block: pair tensors ``[n, K]``, the gathered signal ``[K, C]``, the result
    ``[n, C]`` and the block's indices."""
    pairs = n * K * (FIT_PAIR_TENSORS if fit else RENDER_PAIR_TENSORS)
    return (pairs + 2 * K * channels + 3 * n * channels) * item + 8 * 4 * (n + K)


def _blocks_per_chunk(n: int, K: int, channels: int, item: int, fit: bool, budget: int) -> int:
    return max(1, int(budget) // _block_bytes(n, K, channels, item, fit))


def estimate_memory(
    batch: int,
    channels: int,
    out_size: tuple[int, int],
    lr_size: tuple[int, int],
    radius: float,
    dtype: torch.dtype = torch.float32,
    *,
    fit: bool = False,
    budget_bytes: int | None = None,
) -> dict[str, int]:
    """Planned bytes of a render of ``channels`` channels (``dtype`` = compute and output dtype) or, with
    ``fit=True``, of a loss/gradient call with a ``channels``-channel guide: ``{"output", "working",
    "total"}``. ``output``: ``B C H W`` values and the support mask (fit: the parameters, gradient and
    decoded cells, and per sample the loss weights and target ``[H W, Cg]``); ``working``: one chunk of
    blocks, at most ``budget_bytes`` (default :data:`WORK_BYTES`), so the total grows linearly with the
    pixels."""
    H, W = out_size
    h, w = lr_size
    item = torch.empty((), dtype=dtype).element_size()
    by, bx = _block_shape(out_size, lr_size)
    n, K = by * bx, window_offsets(radius).shape[0]
    budget = WORK_BYTES if budget_bytes is None else int(budget_bytes)
    per_block = _block_bytes(n, K, channels, item, fit)
    working = min(h * w, max(1, budget // per_block)) * per_block
    if fit:
        output = batch * h * w * 16 * item + 3 * channels * H * W * item
    else:
        output = batch * H * W * (channels * item + 1)
    return {"output": int(output), "working": int(working), "total": int(output + working)}


# --------------------------------------------------------------------------- geometry
def _layout(
    H: int, W: int, h: int, w: int, radius: float, device: torch.device, dtype: torch.dtype
) -> Layout:
    offs = window_offsets(radius, device)
    anchor = int(((offs[:, 0] == 0) & (offs[:, 1] == 0)).nonzero()[0, 0])
    ay, ax = nearest_anchor(H, h, device), nearest_anchor(W, w, device)
    cy_idx, cx_idx = torch.arange(h, device=device), torch.arange(w, device=device)
    ry0, ry1 = torch.searchsorted(ay, cy_idx), torch.searchsorted(ay, cy_idx, right=True)
    cx0, cx1 = torch.searchsorted(ax, cx_idx), torch.searchsorted(ax, cx_idx, right=True)
    by, bx = _block_shape((H, W), (h, w))
    cy, cx = lr_centres(h, H, device, dtype), lr_centres(w, W, device, dtype)
    return Layout(offs, anchor, ry0, ry1, cx0, cx1, by, bx, cy, cx)


def _chunk(L: Layout, t0: int, t1: int, H: int, W: int, h: int, w: int, dtype: torch.dtype) -> Chunk:
    """Pixels and neighbours of the blocks ``t0 <= t < t1`` (block ``t`` has the anchor ``(t // w, t % w)``)."""
    dev = L.offs.device
    t = torch.arange(t0, t1, device=dev)
    i, j = t // w, t % w
    y = L.ry0[i][:, None] + torch.arange(L.by, device=dev)  # [nb, by]
    x = L.cx0[j][:, None] + torch.arange(L.bx, device=dev)  # [nb, bx]
    ok = (y < L.ry1[i][:, None])[:, :, None] & (x < L.cx1[j][:, None])[:, None, :]  # [nb, by, bx]
    y, x = y.clamp(max=H - 1), x.clamp(max=W - 1)
    pix = (y[:, :, None] * W + x[:, None, :]).flatten(1)
    ys = y.to(dtype)[:, :, None].expand(-1, -1, L.bx).flatten(1)
    xs = x.to(dtype)[:, None, :].expand(-1, L.by, -1).flatten(1)
    qi = i[:, None] + L.offs[:, 0]  # [nb, K]
    qj = j[:, None] + L.offs[:, 1]
    inside = (qi >= 0) & (qi < h) & (qj >= 0) & (qj < w)
    qi, qj = qi.clamp(0, h - 1), qj.clamp(0, w - 1)
    return Chunk(pix, ok.flatten(1), ys, xs, qi * w + qj, inside, L.cy[qi], L.cx[qj])


def _chunks(n_blocks: int, per_chunk: int) -> Iterator[tuple[int, int]]:
    for t0 in range(0, n_blocks, per_chunk):
        yield t0, min(n_blocks, t0 + per_chunk)


def _cells(params_b: torch.Tensor) -> Cells:
    """Decoded per-cell values of one sample's ``params [1, 3 + G, h, w]`` (differentiable)."""
    lsx, lsy, th, lsr = decode_params(params_b)
    return Cells(
        torch.cos(th).flatten(),
        torch.sin(th).flatten(),
        torch.exp(-2 * lsx).flatten(),
        torch.exp(-2 * lsy).flatten(),
        torch.exp(-2 * lsr[0]).flatten(1),
    )


# --------------------------------------------------------------------------- logits / weights
def _logits(cells, ck, ghr_b, glr_b, gidx, vhr_b, vlr_b, cut, anchor):
    """Logits ``[nb, n, K]`` of a chunk (``-inf`` outside the grid and, with a cut, beyond it): the
    blocked form of :func:`ua3d.core.kernel.pair_logits`.

    ``ghr_b [Cg, H W]``, ``glr_b [Cg, h w]`` the sample's guides; ``vhr_b [G, H W]``, ``vlr_b [G, h w]``
    bool or None; ``anchor`` the window slot of offset ``(0, 0)`` (never cut).
    """
    nbr = ck.nbr
    c, s = cells.c[nbr][:, None, :], cells.s[nbr][:, None, :]  # [nb, 1, K]
    dy = ck.ys[:, :, None] - ck.qy[:, None, :]  # [nb, n, K]
    dx = ck.xs[:, :, None] - ck.qx[:, None, :]
    px, py = 0.5 * cells.ex[nbr][:, None, :], 0.5 * cells.ey[nbr][:, None, :]
    ranges = []
    for g, (c0, c1) in enumerate(gidx):
        diff = sum((ghr_b[ch][ck.pix][:, :, None] - glr_b[ch][nbr][:, None, :]) ** 2 for ch in range(c0, c1))
        ok = None
        if vhr_b is not None:
            ok = vhr_b[g][ck.pix][:, :, None]
        if vlr_b is not None:
            vq = vlr_b[g][nbr][:, None, :]
            ok = vq if ok is None else ok & vq
        ranges.append((diff, 0.5 * cells.rg[g][nbr][:, None, :], ok))
    logits = spatial_colour_logits(dx, dy, c, s, px, py, ranges)
    if cut is not None:  # the spatial Mahalanobis distance is sqrt(-2 x spatial logit)
        keep = spatial_colour_logits(dx, dy, c, s, px, py) >= -0.5 * cut * cut
        keep[:, :, anchor] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits.masked_fill(~ck.inside[:, None, :], float("-inf"))


def _weights(logits: torch.Tensor, usable: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax over ``K``; with ``usable`` (``[nb, 1, K]``) also ``-inf`` logits are excluded and a pixel
    with no usable neighbour gets zero weights. Returns ``(weights, support [nb, n] or None)``."""
    if usable is None:
        return torch.softmax(logits, dim=-1), None
    usable = usable & torch.isfinite(logits)
    support = usable.any(-1)
    masked = logits.masked_fill(~usable, float("-inf")).masked_fill(~support[..., None], 0.0)
    return torch.softmax(masked, dim=-1) * support[..., None], support


# --------------------------------------------------------------------------- render
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
    out_dtype: torch.dtype | None = None,
    support_sigmas: float | None = None,
    blocks_per_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``signal [B, C, h, w]`` to ``[B, C, H, W]``: the twin of
    :func:`ua3d.core.kernel.kernel_render_reference` (and, with ``support_sigmas``, of the cut
    reference in :mod:`ua3d.core.ops`).

    ``signal_mask [B, 1, h, w]`` bool: LR values to use (NaN and ``support = False`` where a pixel
    has none); ``out_dtype`` (default the signal's); ``blocks_per_chunk`` (default from
    :func:`work_budget_bytes`). Returns ``(out, support [B, 1, H, W] bool)``.
    """
    gs = _check(params, guide_hr, guide_lr, radius, groups, valid_hr, valid_lr)
    B, _, h, w = params.shape
    if not isinstance(signal, torch.Tensor) or signal.ndim != 4:
        got = tuple(signal.shape) if isinstance(signal, torch.Tensor) else type(signal).__name__
        raise ValueError(f"signal must be a 4-D tensor [B, C, h, w], got {got}")
    _check_optional(
        params, {"signal": (signal, (B, signal.shape[1], h, w)), "signal_mask": (signal_mask, (B, 1, h, w))}
    )
    cut = _cut(support_sigmas)
    dt, dev = params.dtype, params.device
    H, W = guide_hr.shape[-2:]
    C = signal.shape[1]
    L = _layout(H, W, h, w, radius, dev, dt)
    K, n = L.offs.shape[0], L.by * L.bx
    odt = out_dtype or signal.dtype
    item = params.element_size()
    per = blocks_per_chunk or _blocks_per_chunk(n, K, C, item, False, work_budget_bytes(dev))
    check_memory(
        B * C * H * W * torch.empty((), dtype=odt).element_size()
        + min(per, h * w) * _block_bytes(n, K, C, item, False),
        f"rendering {C} channels at {(H, W)} (blocked engine)",
        "render fewer channels at a time or use out_dtype=torch.float16",
        device=dev,
    )
    out = torch.empty(B, C, H, W, dtype=odt, device=dev)
    support = torch.ones(B, 1, H, W, dtype=torch.bool, device=dev)
    gidx = _group_index(gs, sum(gs))
    with torch.no_grad():
        for b in range(B):
            cells = _cells(params[b : b + 1])
            ghr_b, glr_b = guide_hr[b].flatten(1).to(dt), guide_lr[b].flatten(1).to(dt)
            vhr_b = None if valid_hr is None else valid_hr[b].flatten(1).bool()
            vlr_b = None if valid_lr is None else valid_lr[b].flatten(1).bool()
            sig_b = signal[b].flatten(1).t().to(dt).contiguous()  # [h w, C]: one row per cell
            sm_b = None if signal_mask is None else signal_mask[b, 0].flatten().bool()
            out_b, sup_b = out[b].view(C, H * W), support[b].view(H * W)
            for t0, t1 in _chunks(h * w, per):
                ck = _chunk(L, t0, t1, H, W, h, w, dt)
                logits = _logits(cells, ck, ghr_b, glr_b, gidx, vhr_b, vlr_b, cut, L.anchor)
                wts, sup = _weights(logits, None if sm_b is None else sm_b[ck.nbr][:, None, :])
                vals = sig_b[ck.nbr]  # [nb, K, C]
                if sm_b is not None:
                    vals = torch.where(sm_b[ck.nbr][..., None], vals, torch.zeros((), dtype=dt, device=dev))
                res = torch.bmm(wts, vals)  # [nb, n, C]
                if sup is not None:
                    res = res.masked_fill(~sup[..., None], float("nan"))
                ok = ck.slot_ok
                pix = ck.pix[ok]
                out_b[:, pix] = res[ok].t().to(odt)
                if sup is not None:
                    sup_b[pix] = sup[ok]
    return out, support


# --------------------------------------------------------------------------- fit
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
    support_sigmas: float | None = None,
    values_lr: torch.Tensor | None = None,
    blocks_per_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TTO loss and gradient w.r.t. ``params``: the twin of
    :func:`ua3d.core.kernel.kernel_fit_loss_grad_reference` (per-sample weighted mean L1 error of the
    render of ``values_lr``, default ``guide_lr``, against ``guide_hr``, summed over the batch).

    Returns ``(loss, grad)``: a detached scalar and ``[B, 3 + G, h, w]``.
    """
    gs = _check(params, guide_hr, guide_lr, radius, groups, valid_hr, valid_lr)
    B, _, h, w = params.shape
    Cg, H, W = guide_hr.shape[1:]
    _check_optional(
        params,
        {
            "channel_weights": (channel_weights, (Cg,)),
            "pixel_mask": (pixel_mask, (B, 1, H, W)),
            "values_lr": (values_lr, (B, Cg, h, w)),
        },
    )
    cut = _cut(support_sigmas)
    dt, dev = params.dtype, params.device
    L = _layout(H, W, h, w, radius, dev, dt)
    K, n = L.offs.shape[0], L.by * L.bx
    per = blocks_per_chunk or _blocks_per_chunk(n, K, Cg, params.element_size(), True, work_budget_bytes(dev))
    gidx = _group_index(gs, sum(gs))
    lam = torch.ones(Cg, dtype=dt, device=dev) if channel_weights is None else channel_weights.to(dt)
    chan_group = torch.cat([torch.full((c1 - c0,), g, device=dev) for g, (c0, c1) in enumerate(gidx)])
    p = params.detach().requires_grad_(True)
    total = torch.zeros((), dtype=dt, device=dev)
    grad = torch.zeros_like(params)
    for b in range(B):
        cells = _cells(p[b : b + 1])
        leaves = Cells(*(t.detach().requires_grad_(True) for t in cells))
        ghr_b, glr_b = guide_hr[b].flatten(1).to(dt), guide_lr[b].flatten(1).to(dt)
        vhr_b = None if valid_hr is None else valid_hr[b].flatten(1).bool()
        vlr_b = None if valid_lr is None else valid_lr[b].flatten(1).bool()
        vals_b = (guide_lr if values_lr is None else values_lr)[b].flatten(1).t().to(dt).contiguous()
        # loss mask per pixel and channel: the channel's group validity x pixel_mask (as the reference)
        m_b = torch.ones(Cg, H * W, dtype=dt, device=dev)
        if vhr_b is not None:
            m_b = m_b * vhr_b[chan_group].to(dt)
        if pixel_mask is not None:
            m_b = m_b * pixel_mask[b, 0].flatten().to(dt)
        denom = m_b.sum().clamp_min(1.0) if (vhr_b is not None or pixel_mask is not None) else H * W * Cg
        weight = (m_b * lam[:, None] / denom).t().contiguous()  # [H W, Cg]
        target = ghr_b.t().contiguous()  # [H W, Cg]
        for t0, t1 in _chunks(h * w, per):
            ck = _chunk(L, t0, t1, H, W, h, w, dt)
            logits = _logits(leaves, ck, ghr_b, glr_b, gidx, vhr_b, vlr_b, cut, L.anchor)
            wts, _ = _weights(logits, None)
            rec = torch.bmm(wts, vals_b[ck.nbr])  # [nb, n, Cg]
            wgt = weight[ck.pix] * ck.slot_ok[..., None]  # padding slots weigh 0
            loss = ((rec - target[ck.pix]).abs() * wgt).sum()
            loss.backward()
            total = total + loss.detach()
        torch.autograd.backward(
            list(cells), [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
        )
    if p.grad is not None:
        grad = p.grad.detach()
    return total, grad


# --------------------------------------------------------------------------- helpers
def _cut(support_sigmas: float | None) -> float | None:
    if support_sigmas is None:
        return None
    if not (support_sigmas > 0) or not math.isfinite(support_sigmas):
        raise ValueError(f"support_sigmas must be a positive finite number or None, got {support_sigmas!r}")
    return float(support_sigmas)
