"""Window attention of AnyUp: window bounds, the tile plan with its cost model, the tiled attention.

Every output pixel attends to the low-resolution cells inside ``+-window_ratio`` of its own
position (:func:`window_bounds`, the official float32 arithmetic).  The output is cut into tiles
whose shape a cost model picks within a memory budget (:func:`plan_tiles`); each tile gathers only
the key block its queries can see (:func:`window_attention`), so memory is linear in the output size.
"""

from __future__ import annotations

import math

import torch

from .constants import SOFTMAX_FLOOR

__all__ = ["plan_tiles", "window_attention", "window_bounds"]

# Tile cost model: seconds of fixed cost per tile, and sustained flop/s, per device type.
_TILE_OVERHEAD_S = {"cpu": 6e-5}
_TILE_OVERHEAD_S_OTHER = 3e-4
_FLOPS = {"cpu": 4e10}
_FLOPS_OTHER = 1e13


def window_bounds(n_out: int, n_lr: int, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-resolution index range seen by each output row (or column).

    Uses the official float32 arithmetic: centre ``c = (i + 0.5) / n_out``, inclusive start
    ``floor(clamp(c - ratio, 0, 1) * n_lr)`` and exclusive end ``ceil(clamp(c + ratio, 0, 1) * n_lr)``.
    Float32 matters: e.g. ``n_out = 150, n_lr = 8, i = 52`` starts at LR row 2 in float32 but at 1 in
    float64.  ``ratio <= 0`` means global attention (every range is ``[0, n_lr)``).

    Parameters
    ----------
    n_out : int
        Output size along this axis (``H'`` or ``W'``).
    n_lr : int
        Low-resolution size along this axis (``h`` or ``w``).
    ratio : float
        Half window size relative to the image size (AnyUp: 0.1).

    Returns
    -------
    start, end : torch.Tensor
        int64 ``[n_out]`` each, on the CPU; ``0 <= start < end <= n_lr``.
    """
    if n_out <= 0 or n_lr <= 0:
        raise ValueError(f"window_bounds needs positive sizes, got n_out={n_out}, n_lr={n_lr}")
    if ratio <= 0:
        return torch.zeros(n_out, dtype=torch.long), torch.full((n_out,), n_lr, dtype=torch.long)
    centre = (torch.arange(n_out, dtype=torch.float32) + 0.5) / n_out
    start = ((centre - ratio).clamp(0.0, 1.0) * n_lr).floor().long()
    end = ((centre + ratio).clamp(0.0, 1.0) * n_lr).ceil().long()
    return start, end


def _axis_tiling(start: torch.Tensor, end: torch.Tensor, tile: int) -> tuple[int, int, int]:
    """Cost of cutting one output axis into tiles of ``tile`` indices.

    Returns ``(n_tiles, sum over tiles of tile_length * key_span, largest key_span)``, where a
    tile's key span is the length of the union of its indices' windows.
    """
    n_out = start.numel()
    n_tiles = -(-n_out // tile)
    idx = torch.arange(n_tiles * tile).clamp_(max=n_out - 1).view(n_tiles, tile)
    span = end[idx].amax(1) - start[idx].amin(1)
    length = (n_out - torch.arange(n_tiles) * tile).clamp_(max=tile)
    return n_tiles, int((length * span).sum()), int(span.max())


def _tile_biases(
    n_out: int, n_lr: int, tile: int, ratio: float, zero: torch.Tensor, neg_inf: torch.Tensor
) -> list[tuple[int, int, int, int, torch.Tensor, int]]:
    """Split one output axis into tiles and give each its LR key range and 1-D window bias.

    Returns ``(a, b, k0, k1, bias, pattern)`` per tile: output indices ``[a, b)``, LR range
    ``[k0, k1)`` (the union of the tile's windows), ``bias`` ``[b - a, k1 - k0]`` with 0 inside each
    output index's own window and -inf outside (dtype/device of ``zero``), and ``pattern``, an id
    shared by the tiles whose ``bias`` is identical (interior tiles repeat a few patterns).
    """
    start, end = window_bounds(n_out, n_lr, ratio)
    tiles, patterns = [], {}
    for a in range(0, n_out, tile):
        b = min(n_out, a + tile)
        k0, k1 = int(start[a:b].min()), int(end[a:b].max())
        key = (k1 - k0, tuple((start[a:b] - k0).tolist()), tuple((end[a:b] - k0).tolist()))
        if key not in patterns:
            idx = torch.arange(k0, k1)
            inside = ((idx >= start[a:b, None]) & (idx < end[a:b, None])).to(zero.device)
            patterns[key] = (len(patterns), torch.where(inside, zero, neg_inf))
        pattern, bias = patterns[key]
        tiles.append((a, b, k0, k1, bias, pattern))
    return tiles


def _floored_softmax(x: torch.Tensor, dim: int, inplace: bool) -> torch.Tensor:
    """``softmax(max(x, max_dim(x) - SOFTMAX_FLOOR), dim)`` (module docstring); ``x`` is overwritten if ``inplace``."""
    floor = x.detach().amax(dim, keepdim=True).sub_(SOFTMAX_FLOOR)
    x = torch.maximum(x, floor, out=x) if inplace else torch.maximum(x, floor)
    return x.softmax(dim)


def plan_tiles(
    out_hw: tuple[int, int],
    lr_hw: tuple[int, int],
    batch: int,
    channels: int,
    budget: int,
    q_chunk_size: int | None,
    value_bytes: int = 4,
    device: torch.device | None = None,
    *,
    num_heads: int,
    qk_dim: int,
    window_ratio: float,
) -> tuple[int, int]:
    """Tile shape ``(rows, cols)`` in output pixels.

    Every candidate shape is scored with a cost model: ``n_tiles * overhead + pairs *
    flops_per_pair / flops``, where ``pairs`` is the exact number of (query, key) pairs the
    tiles compute (each tile pairs its queries with the union of their windows, so it grows
    with the tile size) and the per-tile overhead and flop rate are rough per-device
    constants.  Shapes whose tile memory (logits, softmax, mask, queries, keys, values,
    outputs) exceeds ``budget`` bytes are skipped, and ``q_chunk_size`` caps the queries per
    tile.  The cheapest shape wins; ``(1, 1)`` if none fits.
    """
    (H, W), (h, w) = out_hw, lr_hw
    kind = "cpu" if device is None else device.type
    overhead = _TILE_OVERHEAD_S.get(kind, _TILE_OVERHEAD_S_OTHER)
    flops = _FLOPS.get(kind, _FLOPS_OTHER)
    heads, d = num_heads, qk_dim
    pair_s = (2 * channels + 2 * d + heads * 24) / flops

    def candidates(n: int) -> list[int]:
        return sorted({*range(1, min(n, 64) + 1), *range(64, min(n, 512) + 1, 16), n})

    def axis(n_out: int, n_lr: int) -> list[tuple[int, int, int, int]]:
        start, end = window_bounds(n_out, n_lr, window_ratio)
        return [(t, *_axis_tiling(start, end, t)) for t in candidates(n_out)]

    rows, cols = axis(H, h), axis(W, w)
    best, best_cost = (1, 1), math.inf
    for tr, n_r, pairs_r, span_r in rows:
        for tc, n_c, pairs_c, span_c in cols:
            n_q, n_k = tr * tc, span_r * span_c
            if q_chunk_size is not None and n_q > q_chunk_size:
                continue
            mem = batch * value_bytes * (n_q * n_k * (2 * heads + 2) + (n_q + n_k) * (channels + d))
            if mem > budget:
                continue
            cost = n_r * n_c * overhead + pairs_r * pairs_c * pair_s
            if cost < best_cost:
                best, best_cost = (tr, tc), cost
    return best


def window_attention(
    qp: torch.Tensor,
    kp: torch.Tensor,
    vt: torch.Tensor,
    tile: tuple[int, int],
    *,
    window_ratio: float,
    num_heads: int,
    grad: bool,
) -> torch.Tensor:
    """Window cross-attention tile by tile (:meth:`AnyUp.attend`), on projected inputs.

    Parameters
    ----------
    qp : ``[B, H', W', D]`` projected, scaled queries.
    kp : ``[B, h, w, D]`` projected keys.
    vt : ``[B, h, w, C]`` values, channels last.
    tile : ``(rows, cols)`` of one output tile (:func:`plan_tiles`).
    window_ratio : half window relative to the image size (``<= 0``: global).
    num_heads : attention heads (the per-head softmaxes are averaged).
    grad : build the autograd graph (no in-place softmax).

    Returns
    -------
    ``[B, C, H', W']`` in the dtype and on the device of ``vt``.
    """
    B, H, W, D = qp.shape
    _, h, w, C = vt.shape
    heads, hd = num_heads, D // num_heads
    tr, tc = tile
    neg_inf = torch.tensor(float("-inf"), dtype=qp.dtype, device=qp.device)
    zero = torch.zeros((), dtype=qp.dtype, device=qp.device)
    row_tiles = _tile_biases(H, h, tr, window_ratio, zero, neg_inf)
    col_tiles = _tile_biases(W, w, tc, window_ratio, zero, neg_inf)

    out = vt.new_empty(B, C, H, W)
    biases: dict[tuple[int, int], torch.Tensor] = {}  # 2-D window masks by (row, col) pattern
    with torch.set_grad_enabled(grad):
        for bi in range(B):
            q_b, k_b, v_b, out_b = qp[bi], kp[bi], vt[bi], out[bi]
            for ra, rb, kr0, kr1, row_bias, row_pattern in row_tiles:
                for ca, cb, kc0, kc1, col_bias, col_pattern in col_tiles:
                    n_q, n_k = (rb - ra) * (cb - ca), (kr1 - kr0) * (kc1 - kc0)
                    # additive window mask [n_q, n_k]: 0 inside each query's window, -inf outside
                    bias = biases.get((row_pattern, col_pattern))
                    if bias is None:
                        bias = (row_bias[:, None, :, None] + col_bias[None, :, None, :]).view(n_q, n_k)
                        biases[row_pattern, col_pattern] = bias
                    qt = q_b[ra:rb, ca:cb].reshape(n_q, heads, hd).permute(1, 0, 2)
                    kb = k_b[kr0:kr1, kc0:kc1].reshape(n_k, heads, hd).permute(1, 2, 0)
                    logits = torch.baddbmm(bias, qt, kb)  # [heads, n_q, n_k]
                    attn = _floored_softmax(logits, -1, inplace=not grad).sum(dim=0)
                    vb = v_b[kr0:kr1, kc0:kc1].reshape(n_k, C)
                    # head mean: (values @ head-summed weights) / heads
                    res = torch.addmm(zero, vb.t(), attn.t(), beta=0, alpha=1.0 / heads)
                    out_b[:, ra:rb, ca:cb] = res.view(C, rb - ra, cb - ca)
    return out
