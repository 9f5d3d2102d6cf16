"""AnyUp (Wimmer et al., 2025) re-implemented with window-local attention.

AnyUp upsamples low-resolution features of any backbone with a trained, feature-agnostic
cross-attention: queries come from the high-resolution image, keys from the image (pooled to the
feature grid) fused with a "feature unification" of the features, and the values are the raw
features.  Every output pixel attends only to the low-resolution cells inside a window of
``+-window_ratio`` (relative image size) around its own position.

This module is an independent implementation that reproduces the official model
(``wimmerth/anyup`` at commit ``351807a9``) numerically (max abs difference < 1e-6 on the parity
fixture ``anyup_parity_v1.pt``).  ``AnyUp().state_dict()`` has the official 73 keys, order and
shapes (878,080 values), those of the official default ``AnyUp()`` that the released checkpoints
``anyup_paper.pth`` and ``anyup_multi_backbone.pth`` were saved from, so they load with
``strict=True`` (:func:`load_anyup`; checked against the fixture's state dict, the release files
themselves are not available offline).  What differs is how the attention is
computed: the official code builds a dense ``H'W' x hw`` mask and attends over all ``hw`` keys;
here the output is processed in tiles and each tile only gathers the key block its queries can
see, so memory is linear in the number of output pixels (see :meth:`AnyUp.attend`).

Architecture (shapes for ``qk_dim = D = 128``, ``num_heads = 4``)::

    image [B,3,H,W] --1x1 conv + 2 ResBlocks--> [B,D,H,W] --2-D RoPE--> enc
    q = conv3x3_zero( adaptive_avg_pool(query_encoder(enc), (H',W')) )         [B,D,H',W']
    k = aggregation( cat( adaptive_avg_pool(key_encoder(enc), (h,w)),
                          key_features_encoder( l2normalise(features) ) ) )   [B,D,h,w]
    out = sum_j mean_heads softmax_j( <Wq rms(q_i), Wk rms(k_j)> / sqrt(D/heads) + mask_ij ) v_j
          with v = the raw features [B,C,h,w]                                  [B,C,H',W']

Quirks that parity depends on (all reproduced): the feature-unification output ``[B, D*C, h, w]``
is reshaped to ``[B, D, C, h, w]`` (so its softmax mixes filters and channels), the border taps are
renormalised by the in-bounds tap count, RoPE pairs channel ``i`` with ``i + D/2`` and uses
endpoint-inclusive ``linspace(0, 1, n)`` coordinates with ``angle = coords @ freqs``, the 3x3 query
conv zero-pads while the 3x3 aggregation conv reflect-pads, per-head softmaxes are averaged
(not the logits), and the window bounds are computed in float32 (:func:`window_bounds`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.checks import check_finite, check_same_batch, check_size, check_tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AnyUp",
    "anyup",
    "load_anyup",
    "window_bounds",
]

#: ImageNet normalisation applied to a ``[0, 1]`` RGB guide before it enters AnyUp.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Default memory for one attention tile (logits, softmax, mask, tile queries and outputs).  Small
#: tiles stay cache-resident and waste fewer masked keys: 16 MiB ran ~1.5x faster than 128 MiB.
DEFAULT_TILE_BUDGET_BYTES = 16 * 2**20
#: Maximum output columns per attention tile.
TILE_COLS = 64
#: The RoPE and feature-unification row chunks may use this multiple of the tile budget.
CHUNK_BUDGET_FACTOR = 8


# --------------------------------------------------------------------------------------------------
# window arithmetic
# --------------------------------------------------------------------------------------------------
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


def _tile_biases(
    n_out: int, n_lr: int, tile: int, ratio: float, zero: torch.Tensor, neg_inf: torch.Tensor
) -> list[tuple[int, int, int, int, torch.Tensor]]:
    """Split one output axis into tiles and give each its LR key range and 1-D window bias.

    Returns ``(a, b, k0, k1, bias)`` per tile: output indices ``[a, b)``, LR range ``[k0, k1)``
    (the union of the tile's windows) and ``bias`` ``[b - a, k1 - k0]`` with 0 inside each output
    index's own window and -inf outside (dtype/device of ``zero``).
    """
    start, end = window_bounds(n_out, n_lr, ratio)
    tiles = []
    for a in range(0, n_out, tile):
        b = min(n_out, a + tile)
        k0, k1 = int(start[a:b].min()), int(end[a:b].max())
        idx = torch.arange(k0, k1)
        inside = ((idx >= start[a:b, None]) & (idx < end[a:b, None])).to(zero.device)
        tiles.append((a, b, k0, k1, torch.where(inside, zero, neg_inf)))
    return tiles


def _as_size(size: object, name: str) -> tuple[int, int]:
    if isinstance(size, torch.Size):
        size = tuple(size)
    return check_size(size, name)


# --------------------------------------------------------------------------------------------------
# building blocks (module names/parameter shapes follow the official state dict)
# --------------------------------------------------------------------------------------------------
def _conv1x1(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """1x1 convolution ``[B, I, H, W] -> [B, O, H, W]`` as one GEMM on the NCHW layout.

    About twice as fast as oneDNN's NCHW 1x1 convolution on the CPU, with no layout reorders;
    equal to ``F.conv2d`` up to float rounding (different summation order).
    """
    b, _, h, w = x.shape
    # bmm with an expanded weight: torch.matmul takes a ~5x slower path when the weight
    # requires grad, even under no_grad
    wb = weight.flatten(1).expand(b, -1, -1)
    return torch.bmm(wb, x.reshape(b, x.shape[1], h * w)).view(b, -1, h, w)


def _group_norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(y, inplace=not y.requires_grad)


class _ResBlock(nn.Module):
    """Pre-activation residual block ``x + conv(silu(gn(conv(silu(gn(x))))))`` with 1x1 convs.

    Shapes: ``[B, D, H, W] -> [B, D, H, W]``.  Parameters live in ``block`` at the official
    indices 0 (GroupNorm), 2 (conv), 3 (GroupNorm), 5 (conv); 1 and 4 are the SiLUs.
    """

    def __init__(self, channels: int, num_groups: int = 8) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(num_groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.GroupNorm(num_groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # written out (instead of Sequential) so that no more than three full-size maps are alive
        t = _group_norm_silu(self.block[0], x)
        u = _conv1x1(t, self.block[2].weight)
        del t
        t = _group_norm_silu(self.block[3], u)
        del u
        u = _conv1x1(t, self.block[5].weight)
        del t
        return u + x if u.requires_grad else u.add_(x)


class _Encoder(nn.Sequential):
    """``stem`` (conv or feature unification, index 0) followed by two :class:`_ResBlock` (1, 2)."""

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        first = self[0]
        if not isinstance(first, nn.Conv2d):
            return first(x)
        pad = first.kernel_size[0] // 2
        if pad == 0:
            return _conv1x1(x, first.weight)
        return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), first.weight)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        for block in list(self)[1:]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(x))


class _FeatureUnification(nn.Module):
    """Feature-agnostic key features: ``[B, C, h, w] -> [B, D, h, w]`` for any channel count C.

    Every input channel is convolved with each of the D learned ``k x k`` filters (zero padding,
    divided by the number of in-bounds taps), giving ``[B, C*D, h, w]`` ordered channel-major
    (``c * D + d``).  Like the official code this is *reshaped* to ``[B, D, C, h, w]`` (so the
    softmax axis mixes filters and channels whenever C does not divide D), soft-maxed over axis 1
    and averaged over axis 2.  LR rows are processed in chunks bounded by ``budget_bytes``.
    """

    def __init__(self, out_channels: int, kernel_size: int = 5) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size_lfu must be odd, got {kernel_size}")
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.basis = nn.Parameter(torch.randn(out_channels, 1, kernel_size, kernel_size))

    def _tap_count(self, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        p = self.kernel_size // 2
        i = torch.arange(n, device=device)
        return ((i + p).clamp(max=n - 1) - (i - p).clamp(min=0) + 1).to(dtype)

    def forward(self, feats: torch.Tensor, budget_bytes: int = CHUNK_BUDGET_FACTOR * DEFAULT_TILE_BUDGET_BYTES) -> torch.Tensor:
        """``feats`` ``[B, C, h, w]`` (L2-normalised over C by the caller) -> ``[B, D, h, w]``."""
        b, c, h, w = feats.shape
        n, p = self.out_channels, self.kernel_size // 2
        weight = self.basis.repeat(c, 1, 1, 1)  # [c*n, 1, k, k]: entry c*n + d is filter d
        padded = F.pad(feats, (p, p, p, p))
        denom = self._tap_count(h, feats.device, feats.dtype)[:, None] * self._tap_count(
            w, feats.device, feats.dtype
        )
        rows = max(1, min(h, budget_bytes // max(1, 3 * b * n * c * w * feats.element_size())))
        out = []
        for s in range(0, h, rows):
            e = min(h, s + rows)
            x = F.conv2d(padded[:, :, s : e + 2 * p], weight, groups=c) / denom[s:e]
            out.append(x.view(b, n, c, e - s, w).softmax(dim=1).mean(dim=2))
            del x
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)


class _RoPE2d(nn.Module):
    """2-D rotary code: ``x cos(a) + rot(x) sin(a)`` with ``a = coords @ freqs``.

    ``freqs`` ``[2, D]`` is a learned parameter used as a general matrix (both coordinates may
    feed every dimension); ``rot`` pairs channel ``i`` with ``i + D/2``: ``rot(x) = [-x2, x1]``.
    """

    def __init__(self, dim: int, theta: float = 100.0) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"qk_dim must be divisible by 4 for the 2-D rotary code, got {dim}")
        self.dim = dim
        self.theta = theta
        self.freqs = nn.Parameter(torch.empty(2, dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # row coordinate drives the first half, column coordinate the second half, each with
        # dim/4 log-spaced frequencies from 1 to 1/theta used twice
        f = self.theta ** torch.linspace(0.0, -1.0, self.dim // 4)
        f = torch.cat([f, f]) * (2 * math.pi)
        self.freqs.zero_()
        self.freqs[0, : self.dim // 2] = f
        self.freqs[1, self.dim // 2 :] = f

    @staticmethod
    def coordinates(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``[1, h*w, 2]`` (row, col) with endpoint-inclusive ``linspace(0, 1, n)`` per axis."""
        rr, cc = torch.meshgrid(
            torch.linspace(0.0, 1.0, h, device=device, dtype=dtype),
            torch.linspace(0.0, 1.0, w, device=device, dtype=dtype),
            indexing="ij",
        )
        return torch.stack((rr, cc), dim=-1).view(1, h * w, 2)

    def rotate(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, N, D]``, ``coords`` ``[1, N, 2]`` -> ``[B, N, D]`` (layout follows ``x``)."""
        angle = coords @ self.freqs
        x1, x2 = x.chunk(2, dim=-1)
        return x * angle.cos() + torch.cat((-x2, x1), dim=-1) * angle.sin()

    def forward(self, x: torch.Tensor, budget_bytes: int = CHUNK_BUDGET_FACTOR * DEFAULT_TILE_BUDGET_BYTES) -> torch.Tensor:
        """Apply to a map ``[B, D, H, W]``; returns a new ``[B, D, H, W]`` (rows in chunks)."""
        b, d, h, w = x.shape
        coords = self.coordinates(h, w, x.device, x.dtype)
        rows = max(1, min(h, budget_bytes // max(1, 8 * b * d * w * x.element_size())))
        if rows >= h:
            return self.rotate(x.permute(0, 2, 3, 1).reshape(b, h * w, d), coords).view(
                b, h, w, d
            ).permute(0, 3, 1, 2)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        for s in range(0, h, rows):
            e = min(h, s + rows)
            xs = x[:, :, s:e].permute(0, 2, 3, 1).reshape(b, (e - s) * w, d)
            ys = self.rotate(xs, coords[:, s * w : e * w])
            out[:, :, s:e] = ys.view(b, e - s, w, d).permute(0, 3, 1, 2)
        return out


class _RMSNormWeight(nn.Module):
    """RMS normalisation over the last axis with a learned scale (eps = dtype's machine epsilon)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(F, "rms_norm"):
            return F.rms_norm(x, (x.shape[-1],), self.weight, None)
        eps = torch.finfo(x.dtype).eps
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * self.weight


class _Projections(nn.Module):
    """Packed q/k/v input projection ``[3D, D]`` and the output projection.

    Only the q and k thirds are used: AnyUp keeps the head-averaged attention weights and applies
    them to the raw features.  The v third and ``out_proj`` exist so that checkpoints load strictly.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def project(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """``which`` 0 = query, 1 = key: ``[..., D] -> [..., D]``."""
        d = self.in_proj_weight.shape[1]
        sl = slice(which * d, (which + 1) * d)
        return F.linear(x, self.in_proj_weight[sl], self.in_proj_bias[sl])


class _CrossAttentionParams(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm_q = _RMSNormWeight(dim)
        self.norm_k = _RMSNormWeight(dim)
        self.attention = _Projections(dim)


class _CrossDecode(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.cross_attn = _CrossAttentionParams(dim)
        self.conv2d = nn.Conv2d(dim, dim, 3, padding=1, bias=False)


def _check_inputs(
    model: nn.Module, image: object, features: object, output_size: object, image_name: str
) -> tuple[int, int]:
    """Validate ``image [B, input_dim, H, W]`` / ``features [B, C, h, w]``; return ``(H', W')``."""
    check_tensor(image, image_name, ndim=4)
    check_tensor(features, "features", ndim=4)
    if image.shape[1] != model.input_dim:
        raise ValueError(
            f"{image_name} must have {model.input_dim} channels [B, {model.input_dim}, H, W], "
            f"got shape {tuple(image.shape)}"
        )
    check_same_batch(features, image, "features", image_name)
    if features.shape[-2] < 2 or features.shape[-1] < 2:
        raise ValueError(f"features must be at least 2x2 spatially, got shape {tuple(features.shape)}")
    if not image.is_floating_point() or image.dtype != features.dtype:
        raise ValueError(
            f"{image_name} and features must share one floating dtype, got {image.dtype} and {features.dtype}"
        )
    if image.device != features.device:
        raise ValueError(
            f"{image_name} and features must be on one device, got {image.device} and {features.device}"
        )
    param = model.rope.freqs
    if param.dtype != image.dtype or param.device != image.device:
        raise ValueError(
            f"model parameters are {param.dtype} on {param.device} but the inputs are {image.dtype} on "
            f"{image.device}; move the model with .to(...)"
        )
    check_finite(image, image_name)
    check_finite(features, "features")
    size = tuple(image.shape[-2:]) if output_size is None else output_size
    return _as_size(size, "output_size")


# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------
class AnyUp(nn.Module):
    """AnyUp feature upsampler with tiled window attention.

    Parameters
    ----------
    input_dim : int
        Guide channels (3: an ImageNet-normalised RGB image).
    qk_dim : int
        Width D of all encoders and of the attention (128 in the released checkpoints).
    kernel_size : int
        Kernel of the image encoder's first conv (1).
    kernel_size_lfu : int
        Filter size of the feature unification (5).
    window_ratio : float
        Half window, relative to the image size (0.1); not stored in checkpoints.  ``<= 0``
        means global attention.
    num_heads : int
        Attention heads (4).
    tile_budget_bytes : int
        Memory allowed for one attention tile (default 16 MiB); the RoPE and feature-unification
        row chunks may use ``CHUNK_BUDGET_FACTOR`` times as much.

    Notes
    -----
    ``forward(image, features, output_size=None, q_chunk_size=None)`` has the official call
    semantics: ``image`` is the already-normalised guide.  Use :func:`anyup` for a ``[0, 1]`` RGB
    guide.  The default configuration has 878,080 parameters.
    """

    def __init__(
        self,
        input_dim: int = 3,
        qk_dim: int = 128,
        kernel_size: int = 1,
        kernel_size_lfu: int = 5,
        window_ratio: float = 0.1,
        num_heads: int = 4,
        tile_budget_bytes: int = DEFAULT_TILE_BUDGET_BYTES,
    ) -> None:
        super().__init__()
        if qk_dim % num_heads or qk_dim % 8:
            raise ValueError(f"qk_dim={qk_dim} must be divisible by num_heads={num_heads} and by 8")
        if tile_budget_bytes <= 0:
            raise ValueError(f"tile_budget_bytes must be positive, got {tile_budget_bytes}")
        self.input_dim = input_dim
        self.qk_dim = qk_dim
        self.num_heads = num_heads
        self.window_ratio = float(window_ratio)
        self.tile_budget_bytes = int(tile_budget_bytes)

        def encoder(stem: nn.Module) -> _Encoder:
            return _Encoder(stem, _ResBlock(qk_dim), _ResBlock(qk_dim))

        def conv(cin: int, k: int) -> nn.Conv2d:
            return nn.Conv2d(cin, qk_dim, k, padding=k // 2, padding_mode="reflect", bias=False)

        self.image_encoder = encoder(conv(input_dim, kernel_size))
        self.key_encoder = encoder(conv(qk_dim, 1))
        self.query_encoder = encoder(conv(qk_dim, 1))
        self.key_features_encoder = encoder(_FeatureUnification(qk_dim, kernel_size_lfu))
        self.cross_decode = _CrossDecode(qk_dim)
        self.aggregation = encoder(conv(2 * qk_dim, 3))
        self.rope = _RoPE2d(qk_dim)

    def encode(
        self, image: torch.Tensor, features: torch.Tensor, output_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and key maps.

        Parameters
        ----------
        image : ``[B, input_dim, H, W]`` normalised guide.
        features : ``[B, C, h, w]`` raw low-resolution features.
        output_size : ``(H', W')``.

        Returns
        -------
        q : ``[B, D, H', W']`` queries after the 3x3 conv (before RMSNorm / projection).
        k : ``[B, D, h, w]`` keys after the aggregation block (before RMSNorm / projection).
        """
        budget = CHUNK_BUDGET_FACTOR * self.tile_budget_bytes
        h, w = features.shape[-2:]
        enc = self.image_encoder(image)
        enc = self.rope(enc, budget)
        # key branch first, so that the full-resolution guide encoding can be dropped afterwards
        k = F.adaptive_avg_pool2d(self.key_encoder(enc), (h, w))
        q = self.query_encoder.stem(enc)
        del enc
        q = self.query_encoder.body(q)
        if tuple(q.shape[-2:]) != tuple(output_size):
            q = F.adaptive_avg_pool2d(q, output_size)
        q = self.cross_decode.conv2d(q)

        lfu = self.key_features_encoder[0](F.normalize(features, dim=1), budget)
        lfu = self.key_features_encoder.body(lfu)
        k = self.aggregation(torch.cat([k, lfu], dim=1))
        return q, k

    def _plan_tiles(
        self, out_hw: tuple[int, int], lr_hw: tuple[int, int], batch: int, channels: int,
        budget: int, q_chunk_size: int | None, value_bytes: int = 4,
    ) -> tuple[int, int]:
        """Tile shape ``(rows, cols)`` in output pixels.

        Columns: blocks of ``TILE_COLS`` (all of ``W'`` for global attention), so that a tile's key
        block stays close to the window area.  Rows: the most that keep the tile's logits, softmax,
        mask, queries and outputs under ``budget`` bytes (at least one).  ``q_chunk_size`` caps the
        queries per tile.
        """
        (H, W), (h, w) = out_hw, lr_hw
        r = self.window_ratio
        tc = W if r <= 0 else min(W, TILE_COLS)
        span_c = w if r <= 0 else min(w, math.ceil(tc * w / W) + math.ceil(2 * r * w) + 2)
        heads = self.num_heads

        def cost(tr: int) -> int:
            span_r = h if r <= 0 else min(h, math.ceil(tr * h / H) + math.ceil(2 * r * h) + 2)
            t, s = tr * tc, span_r * span_c
            # logits + softmax [heads, t, s], head mean + additive mask [t, s], queries and outputs
            return batch * t * value_bytes * (s * (2 * heads + 2) + channels + 3 * self.qk_dim)

        lo, hi = 1, H
        while lo < hi:  # largest tr with cost(tr) <= budget (at least 1)
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid - 1)
        tr = lo
        if q_chunk_size is not None:
            if q_chunk_size < tc:
                tc, tr = q_chunk_size, 1
            else:
                tr = max(1, min(tr, q_chunk_size // tc))
        return tr, tc

    def _tile_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """Attention of one tile.

        Parameters
        ----------
        q : ``[B, D, tr, tc]`` query-map tile (before RMSNorm / projection).
        k : ``[B, heads, nr, nc, D/heads]`` projected keys of the tile's key block.
        v : ``[B, C, nr, nc]`` values of the key block.
        bias : ``[tr*tc, nr*nc]`` additive mask (0 or -inf).

        Returns
        -------
        ``[B, C, tr*tc]``: per-head softmax over the key block, averaged over heads, applied to v.
        """
        B, D, tr, tc = q.shape
        heads, hd = k.shape[1], k.shape[-1]
        n_q, n_k = tr * tc, k.shape[2] * k.shape[3]
        params = self.cross_decode.cross_attn
        qt = params.norm_q(q.permute(0, 2, 3, 1).reshape(B, n_q, D))
        qt = params.attention.project(qt, 0).view(B, n_q, heads, hd).transpose(1, 2) * math.sqrt(1.0 / hd)
        logits = torch.baddbmm(bias, qt.reshape(B * heads, n_q, hd), k.reshape(B * heads, n_k, hd).transpose(1, 2))
        attn = logits.softmax(dim=-1).view(B, heads, n_q, n_k).mean(dim=1)  # [B, n_q, n_k]
        del logits
        return torch.bmm(v.reshape(B, v.shape[1], n_k), attn.transpose(1, 2))

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_chunk_size: int | None = None,
        tile_budget_bytes: int | None = None,
    ) -> torch.Tensor:
        """Window cross-attention, computed tile by tile.

        The output is cut into tiles (a band of output rows x a block of output columns; the band
        height comes from ``tile_budget_bytes``, see :meth:`_plan_tiles`).  For a tile, the key
        block is the union of its queries' windows (rows and columns separately, from
        :func:`window_bounds`); inside it every query gets its exact window mask, its per-head
        softmax and the head average, which are then applied to the raw values.  Peak memory is
        the output plus one tile, whose size comes from ``tile_budget_bytes``.

        Parameters
        ----------
        q : ``[B, D, H', W']`` query map (after the 3x3 conv).
        k : ``[B, D, h, w]`` key map (after the aggregation block).
        v : ``[B, C, h, w]`` values (the raw features).
        q_chunk_size : optional cap on the queries per tile.
        tile_budget_bytes : memory for one tile; default ``self.tile_budget_bytes``.

        Returns
        -------
        ``[B, C, H', W']``.
        """
        check_tensor(q, "q", ndim=4)
        check_tensor(k, "k", ndim=4)
        check_tensor(v, "v", ndim=4)
        B, D, H, W = q.shape
        _, C, h, w = v.shape
        if D != self.qk_dim or k.shape != (B, D, h, w) or v.shape[0] != B:
            raise ValueError(
                f"attend needs q [B, {self.qk_dim}, H', W'], k [B, {self.qk_dim}, h, w], v [B, C, h, w]; "
                f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        heads, hd = self.num_heads, D // self.num_heads
        params = self.cross_decode.cross_attn
        budget = self.tile_budget_bytes if tile_budget_bytes is None else int(tile_budget_bytes)
        if budget <= 0:
            raise ValueError(f"tile_budget_bytes must be positive, got {budget}")
        if q_chunk_size is not None and q_chunk_size <= 0:
            raise ValueError(f"q_chunk_size must be positive, got {q_chunk_size}")

        kt = params.norm_k(k.permute(0, 2, 3, 1).reshape(B, h * w, D))
        kt = params.attention.project(kt, 1).view(B, h, w, heads, hd).permute(0, 3, 1, 2, 4)
        neg_inf = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)
        zero = torch.zeros((), dtype=q.dtype, device=q.device)

        tr, tc = self._plan_tiles((H, W), (h, w), B, C, budget, q_chunk_size, q.element_size())
        row_tiles = _tile_biases(H, h, tr, self.window_ratio, zero, neg_inf)
        col_tiles = _tile_biases(W, w, tc, self.window_ratio, zero, neg_inf)

        out = v.new_empty(B, C, H, W)
        for ra, rb, kr0, kr1, row_bias in row_tiles:
            for ca, cb, kc0, kc1, col_bias in col_tiles:
                # additive window mask [n_q, n_k]: 0 inside each query's window, -inf outside
                bias = (row_bias[:, None, :, None] + col_bias[None, :, None, :]).flatten(2).flatten(0, 1)
                res = self._tile_attention(
                    q[:, :, ra:rb, ca:cb], kt[:, :, kr0:kr1, kc0:kc1], v[:, :, kr0:kr1, kc0:kc1], bias
                )
                out[:, :, ra:rb, ca:cb] = res.view(B, C, rb - ra, cb - ca)
        return out

    def forward(
        self,
        image: torch.Tensor,
        features: torch.Tensor,
        output_size: tuple[int, int] | None = None,
        vis_attn: bool = False,
        q_chunk_size: int | None = None,
        *,
        tile_budget_bytes: int | None = None,
    ) -> torch.Tensor:
        """Upsample ``features`` guided by ``image`` (the official ``forward`` signature).

        Parameters
        ----------
        image : ``[B, input_dim, H, W]``, already ImageNet-normalised.
        features : ``[B, C, h, w]`` raw features (any C, ``h, w >= 2``), same dtype/device.
        output_size : ``(H', W')``; default ``(H, W)``.
        vis_attn : must be False (the official code plots attention maps; this model does no plotting).
        q_chunk_size : optional cap on queries per attention tile (the output does not depend on it).
        tile_budget_bytes : memory for one attention tile; default ``self.tile_budget_bytes``.

        Returns
        -------
        ``[B, C, H', W']``: every value is a convex combination of the same channel's LR values.
        """
        if vis_attn:
            raise ValueError("vis_attn=True is not supported: ua3d's AnyUp does no plotting")
        size = _check_inputs(self, image, features, output_size, "image")
        q, k = self.encode(image, features, size)
        return self.attend(q, k, features, q_chunk_size=q_chunk_size, tile_budget_bytes=tile_budget_bytes)


# --------------------------------------------------------------------------------------------------
# loading and the baseline entry point
# --------------------------------------------------------------------------------------------------
def load_anyup(path: str | Path, map_location: str | torch.device = "cpu", **kwargs) -> AnyUp:
    """Build :class:`AnyUp` and load a local checkpoint strictly (never downloads).

    Parameters
    ----------
    path : a ``.pth`` holding a bare state dict (``anyup_paper.pth``, ``anyup_multi_backbone.pth``)
        or a dict with a ``"state_dict"`` entry (e.g. the parity fixture).
    map_location : where to put the weights.
    **kwargs : passed to :class:`AnyUp` (e.g. ``window_ratio``, ``tile_budget_bytes``).

    Returns
    -------
    The model in eval mode, on ``map_location``, in the checkpoint's dtype.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"AnyUp checkpoint not found: {path} (ua3d never downloads weights; fetch anyup_paper.pth or "
            "anyup_multi_backbone.pth from the wimmerth/anyup releases yourself)"
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling/zip errors come in many types
        raise ValueError(f"could not read AnyUp checkpoint {path}: {exc}") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ValueError(f"AnyUp checkpoint {path} is not a state dict (str -> tensor), got {type(obj).__name__}")
    model = AnyUp(**kwargs)
    expected = model.state_dict()
    missing = [k for k in expected if k not in obj]
    unexpected = [k for k in obj if k not in expected]
    wrong = [f"{k} {tuple(obj[k].shape)} != {tuple(t.shape)}" for k, t in expected.items()
             if k in obj and obj[k].shape != t.shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"AnyUp checkpoint {path} does not match the architecture: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
            f" ({len(missing)}/{len(unexpected)}/{len(wrong)} in total)"
        )
    dtype = next(iter(obj.values())).dtype
    model = model.to(device=map_location, dtype=dtype)
    model.load_state_dict(obj, strict=True)
    return model.eval()


def anyup(
    guide: torch.Tensor,
    features: torch.Tensor,
    output_size: tuple[int, int] | None = None,
    *,
    model: AnyUp | None = None,
    checkpoint: str | Path | None = None,
    normalize_guide: bool = True,
) -> torch.Tensor:
    """AnyUp baseline with ua3d's baseline call shape.

    Parameters
    ----------
    guide : ``[B, 3, H, W]`` RGB in ``[0, 1]``.  With ``normalize_guide=True`` (default) it is
        normalised inside with the ImageNet statistics ``(rgb - IMAGENET_MEAN) / IMAGENET_STD``,
        as the released checkpoints expect; pass ``normalize_guide=False`` for a guide that is
        already normalised.
    features : ``[B, C, h, w]`` raw backbone features (any C; not normalised by the caller).
    output_size : ``(H', W')``; default the guide's ``(H, W)``.
    model : a loaded :class:`AnyUp` (used as is: its device and dtype must match the inputs).
    checkpoint : path of a local checkpoint, loaded with :func:`load_anyup` onto the inputs'
        device and dtype when ``model`` is not given.  There are no built-in weights.
    normalize_guide : see ``guide``.

    Returns
    -------
    ``[B, C, H', W']`` upsampled features (computed under ``torch.no_grad``).
    """
    if (model is None) == (checkpoint is None):
        raise ValueError("anyup needs exactly one of model= (an AnyUp) or checkpoint= (a local .pth path)")
    if model is None:
        check_tensor(guide, "guide", ndim=4)
        model = load_anyup(checkpoint).to(device=guide.device, dtype=guide.dtype)
    elif not isinstance(model, AnyUp):
        raise ValueError(f"model must be an AnyUp, got {type(model).__name__}")
    size = _check_inputs(model, guide, features, output_size, "guide")
    with torch.no_grad():
        if normalize_guide:
            lo, hi = float(guide.min()), float(guide.max())
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise ValueError(
                    f"guide must be RGB in [0, 1] when normalize_guide=True, got values in [{lo:.3g}, {hi:.3g}] "
                    f"(shape {tuple(guide.shape)}); pass normalize_guide=False for an already normalised guide"
                )
            mean = guide.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = guide.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
            guide = (guide - mean) / std
        return model(guide, features, size)
