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
themselves are not available offline).

What differs is how it is computed.  The official code builds a dense ``H'W' x hw`` mask and
attends over all ``hw`` keys; here the output is processed in tiles and each tile only gathers the
key block its queries can see, so memory is linear in the number of output pixels (see
:meth:`AnyUp.attend`).  Without autograd (``torch.no_grad``, as in :func:`anyup`) the
full-resolution encoders run as fused strip passes (:meth:`AnyUp.encode`): each GroupNorm becomes
a per-channel affine map from statistics gathered in the previous pass, so every 1x1 conv, norm,
SiLU, residual add and the rotary code touch a cache-sized strip of pixels once and no
full-resolution temporaries are allocated.  With autograd the module-by-module reference path is
used (slower, differentiable).

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

One deliberate numerical difference: before every softmax, entries more than
``SOFTMAX_FLOOR = 80`` below their row maximum are raised to that floor.  Their weight becomes
``exp(-80) ~ 1.8e-35`` instead of an underflowing ``exp(< -87)``; in float32 this changes nothing
visible, but it keeps ``exp`` out of the denormal range, where it runs 10-50x slower on x86 CPUs.
Masked (out-of-window) keys get the same ``1.8e-35`` weight instead of an exact 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.checks import check_finite, check_same_batch, check_size, check_tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SOFTMAX_FLOOR",
    "AnyUp",
    "anyup",
    "anyup_depth",
    "load_anyup",
    "window_bounds",
]

#: ImageNet normalisation applied to a ``[0, 1]`` RGB guide before it enters AnyUp.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Upper bound on the memory of one attention tile (logits, softmax, mask, queries, outputs);
#: within it the tile shape comes from a cost model (:meth:`AnyUp._plan_tiles`).
DEFAULT_TILE_BUDGET_BYTES = 16 * 2**20
#: The reference (autograd) RoPE and feature-unification row chunks use this multiple of the budget.
CHUNK_BUDGET_FACTOR = 8
#: Bytes of one ``[D, n]`` strip of the fused encoder passes on the CPU (128 channels x 1024 px
#: in float32: the strip, its SiLU input and the conv output stay inside a 2 MiB L2 cache).
DEFAULT_STRIP_BYTES = 2**19
#: Bytes of one ``[pixels, C, D]`` block of the fused feature unification on the CPU.
LFU_BLOCK_BYTES = 2**21
#: Softmax inputs more than this below their row maximum are raised to it (module docstring).
SOFTMAX_FLOOR = 80.0

# Tile cost model: seconds of fixed cost per tile, and sustained flop/s, per device type.
_TILE_OVERHEAD_S = {"cpu": 6e-5}
_TILE_OVERHEAD_S_OTHER = 3e-4
_FLOPS = {"cpu": 4e10}
_FLOPS_OTHER = 1e13


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

    def forward(
        self, feats: torch.Tensor, budget_bytes: int = CHUNK_BUDGET_FACTOR * DEFAULT_TILE_BUDGET_BYTES
    ) -> torch.Tensor:
        """Reference path: ``feats`` ``[B, C, h, w]`` (L2-normalised over C by the caller) -> ``[B, D, h, w]``."""
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

    @torch.no_grad()
    def fused(self, feats: torch.Tensor, block_bytes: int = LFU_BLOCK_BYTES) -> torch.Tensor:
        """Inference path of :meth:`forward` as one GEMM per block of pixels (no autograd).

        For a block of ``m`` pixels the ``k x k`` patches of every channel, ``[m * C, k*k]``, are
        multiplied by the filters ``[k*k, D]``, giving ``[m, C, D]``: per pixel exactly the
        channel-major ``C*D`` vector of the official conv output, so the same reshape to
        ``[m, D, C]``, softmax over D (floored, see :data:`SOFTMAX_FLOOR`; written out in place,
        since torch's softmax over a non-innermost axis is slow on a CPU) and mean over C follow.
        Blocks hold about ``block_bytes``; 3x faster than the grouped convolution of
        :meth:`forward` on a CPU.

        Parameters
        ----------
        feats : ``[B, C, h, w]`` L2-normalised features.
        block_bytes : memory of one ``[m, C, D]`` block.

        Returns
        -------
        ``[B, D, h, w]``.
        """
        b, c, h, w = feats.shape
        n, k = self.out_channels, self.kernel_size
        p = k // 2
        item = feats.element_size()
        basis_t = self.basis.view(n, k * k).t()  # [k*k, D]
        denom = self._tap_count(h, feats.device, feats.dtype)[:, None] * self._tap_count(
            w, feats.device, feats.dtype
        )
        denom = denom.view(h * w, 1, 1)
        padded = F.pad(feats, (p, p, p, p))
        out = feats.new_empty(b, n, h * w)
        block = max(1, block_bytes // (c * n * item))  # pixels per GEMM block
        rows = max(1, min(h, (4 * block_bytes) // (c * k * k * w * item)))  # rows per unfold
        for bi in range(b):
            for r0 in range(0, h, rows):
                r1 = min(h, r0 + rows)
                win = padded[bi, :, r0 : r1 + 2 * p].unsqueeze(1)  # [C, 1, rows + 2p, w + 2p]
                patches = F.unfold(win, k).permute(2, 0, 1).contiguous()  # [rows*w, C, k*k]
                for q0 in range(0, patches.shape[0], block):
                    q1 = min(patches.shape[0], q0 + block)
                    m, g0 = q1 - q0, r0 * w + q0
                    y = torch.mm(patches[q0:q1].view(m * c, k * k), basis_t).view(m, c, n)
                    y.div_(denom[g0 : g0 + m])
                    z = y.view(m, n, c)  # the official reshape; softmax over n, mean over c:
                    top = z.amax(1, keepdim=True)
                    z.sub_(top).clamp_(min=-SOFTMAX_FLOOR).exp_()  # floored (module docstring)
                    z.div_(z.sum(1, keepdim=True))
                    out[bi, :, g0 : g0 + m] = z.mean(dim=2).t()
        return out.view(b, n, h, w)


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

    def forward(
        self, x: torch.Tensor, budget_bytes: int = CHUNK_BUDGET_FACTOR * DEFAULT_TILE_BUDGET_BYTES
    ) -> torch.Tensor:
        """Reference path: apply to a map ``[B, D, H, W]``; returns a new ``[B, D, H, W]`` (rows in chunks)."""
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
# fused strip passes (inference path of the full-resolution encoders)
# --------------------------------------------------------------------------------------------------
class _Moments:
    """Per-group mean and variance of a ``[D, N]`` map, gathered strip by strip.

    Each strip contributes exact per-channel means and centred sums of squares (two passes over a
    cache-resident strip); :meth:`finalize` merges them in float64 (Chan et al.'s pairwise update),
    so there is no ``E[x^2] - E[x]^2`` cancellation.
    """

    def __init__(self, groups: int) -> None:
        self.groups = groups
        self.counts: list[int] = []
        self.means: list[torch.Tensor] = []
        self.m2s: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, ones: torch.Tensor, scratch: torch.Tensor) -> None:
        """Add a strip ``x`` ``[D, m]`` (any row stride); ``ones`` ``[>= m]``, ``scratch`` ``[D, m]``."""
        m = x.shape[1]
        mean = torch.mv(x, ones[:m]).div_(m)
        dev = torch.sub(x, mean[:, None], out=scratch)
        self.counts.append(m)
        self.means.append(mean)
        self.m2s.append(torch.linalg.vector_norm(dev, dim=1).square_())

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Group mean and (biased) variance, float64 ``[groups]`` each."""
        means = torch.stack(self.means).double()  # [S, D]
        m2s = torch.stack(self.m2s).double()
        s, d = means.shape
        cnt = torch.tensor(self.counts, dtype=torch.float64, device=means.device).view(s, 1, 1)
        means, m2s = means.view(s, self.groups, d // self.groups), m2s.view(s, self.groups, d // self.groups)
        total = cnt.sum() * (d // self.groups)
        mean = (cnt * means).sum((0, 2)) / total
        m2 = (m2s + cnt * (means - mean[None, :, None]).square()).sum((0, 2))
        return mean, m2 / total


def _gn_affine(norm: nn.GroupNorm, moments: _Moments, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm with given statistics as a per-channel affine map: ``gn(x) = x * scale + shift`` (``[D, 1]`` each)."""
    mean, var = moments.finalize()
    per = norm.num_channels // norm.num_groups
    rstd = torch.rsqrt(var + norm.eps).repeat_interleave(per)
    mean = mean.repeat_interleave(per)
    scale = rstd if norm.weight is None else rstd * norm.weight.double()
    shift = -mean * scale if norm.bias is None else norm.bias.double() - mean * scale
    return scale.to(dtype)[:, None], shift.to(dtype)[:, None]


class _StripBuffers:
    """Reusable contiguous ``[D, m]`` work buffers for strips of at most ``n`` pixels."""

    def __init__(self, rows: int, n: int, like: torch.Tensor) -> None:
        self.rows, self.n, self.like = rows, n, like
        self.flat: dict[str, torch.Tensor] = {}
        self.ones = like.new_ones(n)

    def get(self, name: str, m: int) -> torch.Tensor:
        if name not in self.flat:
            self.flat[name] = self.like.new_empty(self.rows * self.n)
        return self.flat[name][: self.rows * m].view(self.rows, m)


def _silu_gn_strip(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, buf: _StripBuffers
) -> torch.Tensor:
    """``silu(x * scale + shift)`` of a strip into the ``"t"`` buffer."""
    t = torch.mul(x, scale, out=buf.get("t", x.shape[1])).add_(shift)
    return F.silu(t, inplace=True)


def _pass_expand(
    block: _ResBlock, x: torch.Tensor, u: torch.Tensor, strips: list[tuple[int, int]],
    moments: _Moments, buf: _StripBuffers,
) -> _Moments:
    """First half of a residual block: ``u = W1 silu(gn0(x))`` strip by strip; returns stats of ``u``."""
    scale, shift = _gn_affine(block.block[0], moments, x.dtype)
    weight = block.block[2].weight.flatten(1)
    out = _Moments(block.block[3].num_groups)
    for s, e in strips:
        us = torch.mm(weight, _silu_gn_strip(x[:, s:e], scale, shift, buf), out=u[:, s:e])
        out.add(us, buf.ones, buf.get("scratch", e - s))
    return out


def _pass_residual(
    block: _ResBlock, x: torch.Tensor, u: torch.Tensor, strips: list[tuple[int, int]],
    moments: _Moments, buf: _StripBuffers, *, stats: bool = True,
    finish: Callable[[int, int, torch.Tensor], None] | None = None,
) -> _Moments | None:
    """Second half: ``x += W2 silu(gn1(u))`` in place; then ``finish(s, e, x_strip)`` or stats of ``x``."""
    scale, shift = _gn_affine(block.block[3], moments, x.dtype)
    weight = block.block[5].weight.flatten(1)
    out = _Moments(block.block[0].num_groups) if stats else None
    for s, e in strips:
        xs = x[:, s:e]
        xs.addmm_(weight, _silu_gn_strip(u[:, s:e], scale, shift, buf))
        if finish is not None:
            finish(s, e, xs)
        if out is not None:
            out.add(xs, buf.ones, buf.get("scratch", e - s))
    return out


def _run_encoder_body(
    enc: _Encoder, x: torch.Tensor, tmp: torch.Tensor, strips: list[tuple[int, int]],
    moments: _Moments, buf: _StripBuffers,
    finish: Callable[[int, int, torch.Tensor], None] | None = None,
) -> None:
    """Both residual blocks of ``enc`` on the map ``x`` ``[D, N]`` in place (``tmp``: scratch map)."""
    blocks = list(enc)[1:]
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        moments = _pass_expand(block, x, tmp, strips, moments, buf)
        moments = _pass_residual(block, x, tmp, strips, moments, buf, stats=not last, finish=finish if last else None)


def _rope_and_stems(
    s: int, e: int, xs: torch.Tensor, *, freqs_t: torch.Tensor, coords_t: torch.Tensor,
    w_key: torch.Tensor, w_query: torch.Tensor, keys: torch.Tensor, queries: torch.Tensor,
    mom_k: _Moments, mom_q: _Moments, buf: _StripBuffers,
) -> None:
    """Rotary code of a finished image-encoder strip ``xs`` ``[D, m]``, then both 1x1 stems.

    ``angle = freqs^T coords`` (the same fused products as ``coords @ freqs``), ``enc = xs cos +
    rot(xs) sin`` with ``rot(x) = [-x2, x1]``; ``keys[:, s:e] = W_key enc`` and ``queries[:, s:e] =
    W_query enc``, with their statistics added to ``mom_k`` / ``mom_q``.
    """
    m, half = e - s, xs.shape[0] // 2
    angle = torch.mm(freqs_t, coords_t[:, s:e], out=buf.get("angle", m))
    cos = torch.cos(angle, out=buf.get("cos", m))
    sin = torch.sin(angle, out=angle)
    enc = torch.mul(xs, cos, out=buf.get("t", m))
    enc[:half].addcmul_(xs[half:], sin[:half], value=-1.0)
    enc[half:].addcmul_(xs[:half], sin[half:])
    mom_k.add(torch.mm(w_key, enc, out=keys[:, s:e]), buf.ones, buf.get("scratch", m))
    mom_q.add(torch.mm(w_query, enc, out=queries[:, s:e]), buf.ones, buf.get("scratch", m))


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
        Upper bound on the memory of one attention tile (default 16 MiB); the tile shape inside it
        comes from a cost model.  The reference (autograd) RoPE and feature-unification row chunks
        may use ``CHUNK_BUDGET_FACTOR`` times as much.
    strip_bytes : int
        Size of one ``[D, n]`` strip of the fused encoder passes on a CPU (default 512 KiB, i.e.
        1024 pixels of 128 float32 channels); other devices use strips of up to 2**20 pixels.

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
        strip_bytes: int = DEFAULT_STRIP_BYTES,
    ) -> None:
        super().__init__()
        if qk_dim % num_heads or qk_dim % 8:
            raise ValueError(f"qk_dim={qk_dim} must be divisible by num_heads={num_heads} and by 8")
        if tile_budget_bytes <= 0:
            raise ValueError(f"tile_budget_bytes must be positive, got {tile_budget_bytes}")
        if strip_bytes <= 0:
            raise ValueError(f"strip_bytes must be positive, got {strip_bytes}")
        self.input_dim = input_dim
        self.qk_dim = qk_dim
        self.num_heads = num_heads
        self.window_ratio = float(window_ratio)
        self.tile_budget_bytes = int(tile_budget_bytes)
        self.strip_bytes = int(strip_bytes)

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

    # ---------------------------------------------------------------------------------- encoders
    def _use_autograd(self, *tensors: torch.Tensor) -> bool:
        """Whether this call must be differentiable (then the reference path runs)."""
        if not torch.is_grad_enabled():
            return False
        return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in self.parameters())

    def encode(
        self, image: torch.Tensor, features: torch.Tensor, output_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and key maps.

        Without autograd this runs the fused strip passes (:meth:`_encode_fused`), otherwise the
        module-by-module reference (:meth:`_encode_reference`); both compute the same function.

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
        if self._use_autograd(image, features):
            return self._encode_reference(image, features, output_size)
        with torch.no_grad():
            return self._encode_fused(image, features, output_size, project=False)

    def _attention_inputs(
        self, image: torch.Tensor, features: torch.Tensor, output_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected queries ``[B, H', W', D]`` (:meth:`_project_queries`) and the key map ``[B, D, h, w]``."""
        if self._use_autograd(image, features):
            q, k = self._encode_reference(image, features, output_size)
            return self._project_queries(q), k
        with torch.no_grad():
            return self._encode_fused(image, features, output_size, project=True)

    def _encode_reference(
        self, image: torch.Tensor, features: torch.Tensor, output_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Module-by-module :meth:`encode` (differentiable; full-resolution temporaries)."""
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

    def _strip_pixels(self, n_pixels: int, device: torch.device, item: int) -> int:
        """Pixels per strip: ``strip_bytes`` worth on a CPU (cache-sized), up to 2**20 elsewhere."""
        if device.type != "cpu":
            return min(n_pixels, 2**20)
        return max(16, min(n_pixels, self.strip_bytes // (self.qk_dim * item)))

    def _encode_fused(
        self, image: torch.Tensor, features: torch.Tensor, output_size: tuple[int, int], project: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference :meth:`encode` with the full-resolution encoders as fused strip passes.

        Per batch element, three ``[D, H*W]`` maps are kept: the image stream (later the scratch
        map of the key/query encoders), the residual blocks' inner activations (overwritten strip
        by strip with the key stream once consumed, later reused for the output) and the query
        stream.  A residual block is two passes,
        ``u = W1 silu(gn0(x))`` and ``x += W2 silu(gn1(u))``, each GroupNorm applied as the
        per-channel affine map of the statistics gathered while the previous pass wrote its
        input (:class:`_Moments`).  The last pass of the image encoder also applies the rotary
        code and both 1x1 stems of the key and query encoders to each strip (the rotated encoding
        is never stored).  The 3x3 query conv is the oneDNN convolution of the reference path; if
        ``project``, it runs in bands of rows, each followed by the attention's query RMSNorm and
        projection (:func:`_conv_project_bands`).  The low-resolution key branch uses
        :meth:`_FeatureUnification.fused`.

        Returns
        -------
        q : ``[B, H', W', D]`` projected queries if ``project`` (:meth:`_project_queries`), else
            ``[B, D, H', W']`` queries after the 3x3 conv.
        k : ``[B, D, h, w]``.
        """
        b_size, _, height, width = image.shape
        h, w = features.shape[-2:]
        d, n_pix = self.qk_dim, height * width
        out_h, out_w = output_size
        step = self._strip_pixels(n_pix, image.device, image.element_size())
        strips = [(s, min(n_pix, s + step)) for s in range(0, n_pix, step)]
        groups = self.image_encoder[1].block[0].num_groups
        coords_t = self.rope.coordinates(height, width, image.device, image.dtype)[0].t()  # [2, N]
        freqs_t = self.rope.freqs.t()  # [D, 2]
        w_key = self.key_encoder[0].weight.flatten(1)
        w_query = self.query_encoder[0].weight.flatten(1)
        stem = self.image_encoder[0]
        batched_out = None
        if b_size > 1:
            shape = (b_size, out_h, out_w, d) if project else (b_size, d, out_h, out_w)
            batched_out = image.new_empty(shape)

        qs, ks = [], []
        for bi in range(b_size):
            buf = _StripBuffers(d, step, image)
            moments = _Moments(groups)
            x = image.new_empty(d, n_pix)
            if stem.kernel_size == (1, 1):
                pixels = image[bi].reshape(self.input_dim, n_pix)
                w_stem = stem.weight.flatten(1)
                for s, e in strips:
                    xs = torch.mm(w_stem, pixels[:, s:e], out=x[:, s:e])
                    moments.add(xs, buf.ones, buf.get("scratch", e - s))
            else:
                x.copy_(self.image_encoder.stem(image[bi : bi + 1]).reshape(d, n_pix))
                for s, e in strips:
                    moments.add(x[:, s:e], buf.ones, buf.get("scratch", e - s))
            # residual blocks' inner activations; overwritten by the key stream strip by strip
            inner = image.new_empty(d, n_pix)
            queries = image.new_empty(d, n_pix)
            mom_k, mom_q = _Moments(groups), _Moments(groups)
            finish = partial(
                _rope_and_stems, freqs_t=freqs_t, coords_t=coords_t, w_key=w_key, w_query=w_query,
                keys=inner, queries=queries, mom_k=mom_k, mom_q=mom_q, buf=buf,
            )
            _run_encoder_body(self.image_encoder, x, inner, strips, moments, buf, finish=finish)
            del finish
            _run_encoder_body(self.key_encoder, inner, x, strips, mom_k, buf)
            ks.append(F.adaptive_avg_pool2d(inner.view(1, d, height, width), (h, w)))
            _run_encoder_body(self.query_encoder, queries, x, strips, mom_q, buf)
            del x, buf
            q_src = queries.view(d, height, width)
            if (height, width) != (out_h, out_w):
                q_src = F.adaptive_avg_pool2d(q_src[None], output_size)[0]
            if not project:
                dest = self.cross_decode.conv2d(q_src[None])[0]  # oneDNN, as in the reference path
                if batched_out is not None:
                    dest = batched_out[bi].copy_(dest)
            else:
                if batched_out is not None:
                    dest = batched_out[bi]
                elif inner.numel() >= out_h * out_w * d:  # reuse the key map's pages
                    dest = inner.view(-1)[: out_h * out_w * d].view(out_h, out_w, d)
                else:
                    dest = image.new_empty(out_h, out_w, d)
                _conv_project_bands(self, q_src, dest, max(1, (16 * step) // out_w))
            del q_src, queries, inner
            qs.append(dest)

        lfu = self.key_features_encoder[0].fused(F.normalize(features, dim=1))
        lfu = self.key_features_encoder.body(lfu)
        k = self.aggregation(torch.cat([ks[0] if b_size == 1 else torch.cat(ks), lfu], dim=1))
        return (qs[0][None] if batched_out is None else batched_out), k

    # --------------------------------------------------------------------------------- attention
    def _project_queries(self, q: torch.Tensor) -> torch.Tensor:
        """Attention queries ``(Wq rms(q) + bq) / sqrt(D / heads)`` per pixel.

        ``q`` ``[B, D, H', W']`` (after the 3x3 conv) -> ``[B, H', W', D]`` (channels last, so an
        attention tile's queries are a few contiguous runs).  Without autograd strip by strip.
        """
        att = self.cross_decode.cross_attn
        d = self.qk_dim
        w_q, b_q = att.attention.in_proj_weight[:d], att.attention.in_proj_bias[:d]
        scale = math.sqrt(1.0 / (d // self.num_heads))
        if self._use_autograd(q):
            return F.linear(att.norm_q(q.permute(0, 2, 3, 1)), w_q, b_q) * scale
        b_size, _, height, width = q.shape
        out = q.new_empty(b_size, height, width, d)
        rows = max(1, self._strip_pixels(height * width, q.device, q.element_size()) // width)
        with torch.no_grad():
            for bi in range(b_size):
                for r0 in range(0, height, rows):
                    r1 = min(height, r0 + rows)
                    _project_rows(att, q[bi, :, r0:r1], out[bi, r0:r1], scale)
        return out

    def _project_keys(self, k: torch.Tensor) -> torch.Tensor:
        """Attention keys ``Wk rms(k) + bk``: ``[B, D, h, w] -> [B, h, w, D]``."""
        att = self.cross_decode.cross_attn
        return att.attention.project(att.norm_k(k.permute(0, 2, 3, 1)), 1).contiguous()

    def _plan_tiles(
        self, out_hw: tuple[int, int], lr_hw: tuple[int, int], batch: int, channels: int,
        budget: int, q_chunk_size: int | None, value_bytes: int = 4, device: torch.device | None = None,
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
        heads, d = self.num_heads, self.qk_dim
        pair_s = (2 * channels + 2 * d + heads * 24) / flops

        def candidates(n: int) -> list[int]:
            return sorted({*range(1, min(n, 64) + 1), *range(64, min(n, 512) + 1, 16), n})

        def axis(n_out: int, n_lr: int) -> list[tuple[int, int, int, int]]:
            start, end = window_bounds(n_out, n_lr, self.window_ratio)
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

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_chunk_size: int | None = None,
        tile_budget_bytes: int | None = None,
    ) -> torch.Tensor:
        """Window cross-attention, computed tile by tile.

        The output is cut into tiles of a few output rows x a few output columns (shape from
        :meth:`_plan_tiles`).  For a tile, the key block is the union of its queries' windows (rows
        and columns separately, from :func:`window_bounds`); inside it every query gets its exact
        window mask, its per-head softmax and the head average, which are then applied to the raw
        values.  Peak memory is the output, the projected queries and one tile.

        Parameters
        ----------
        q : ``[B, D, H', W']`` query map (after the 3x3 conv).
        k : ``[B, D, h, w]`` key map (after the aggregation block).
        v : ``[B, C, h, w]`` values (the raw features).
        q_chunk_size : optional cap on the queries per tile.
        tile_budget_bytes : memory bound for one tile; default ``self.tile_budget_bytes``.

        Returns
        -------
        ``[B, C, H', W']``.
        """
        check_tensor(q, "q", ndim=4)
        check_tensor(k, "k", ndim=4)
        check_tensor(v, "v", ndim=4)
        B, D = q.shape[:2]
        h, w = v.shape[-2:]
        if D != self.qk_dim or k.shape != (B, D, h, w) or v.shape[0] != B:
            raise ValueError(
                f"attend needs q [B, {self.qk_dim}, H', W'], k [B, {self.qk_dim}, h, w], v [B, C, h, w]; "
                f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        return self._attend_projected(self._project_queries(q), k, v, q_chunk_size, tile_budget_bytes)

    def _attend_projected(
        self, qp: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        q_chunk_size: int | None, tile_budget_bytes: int | None,
    ) -> torch.Tensor:
        """:meth:`attend` for projected queries ``qp`` ``[B, H', W', D]`` (:meth:`_project_queries`)."""
        B, H, W, D = qp.shape
        _, C, h, w = v.shape
        heads, hd = self.num_heads, D // self.num_heads
        budget = self.tile_budget_bytes if tile_budget_bytes is None else int(tile_budget_bytes)
        if budget <= 0:
            raise ValueError(f"tile_budget_bytes must be positive, got {budget}")
        if q_chunk_size is not None and q_chunk_size <= 0:
            raise ValueError(f"q_chunk_size must be positive, got {q_chunk_size}")
        grad = self._use_autograd(qp, k, v)
        with torch.set_grad_enabled(grad):
            kp = self._project_keys(k)  # [B, h, w, D]
            vt = v.permute(0, 2, 3, 1)  # [B, h, w, C]: a key block's values are a few runs
            vt = vt if grad else vt.contiguous()
        neg_inf = torch.tensor(float("-inf"), dtype=qp.dtype, device=qp.device)
        zero = torch.zeros((), dtype=qp.dtype, device=qp.device)
        tr, tc = self._plan_tiles(
            (H, W), (h, w), 1, C, budget, q_chunk_size, qp.element_size(), qp.device
        )
        row_tiles = _tile_biases(H, h, tr, self.window_ratio, zero, neg_inf)
        col_tiles = _tile_biases(W, w, tc, self.window_ratio, zero, neg_inf)

        out = v.new_empty(B, C, H, W)
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
        tile_budget_bytes : memory bound for one attention tile; default ``self.tile_budget_bytes``.

        Returns
        -------
        ``[B, C, H', W']``: every value is a convex combination of the same channel's LR values.
        """
        if vis_attn:
            raise ValueError("vis_attn=True is not supported: ua3d's AnyUp does no plotting")
        size = _check_inputs(self, image, features, output_size, "image")
        if q_chunk_size is not None and q_chunk_size <= 0:
            raise ValueError(f"q_chunk_size must be positive, got {q_chunk_size}")
        qp, k = self._attention_inputs(image, features, size)
        return self._attend_projected(qp, k, features, q_chunk_size, tile_budget_bytes)


def _conv_project_bands(model: AnyUp, q_src: torch.Tensor, dest: torch.Tensor, rows: int) -> None:
    """3x3 query conv, then the query projection, in bands of ``rows`` output rows.

    ``q_src`` ``[D, H', W']`` -> ``dest`` ``[H', W', D]``.  Each band is convolved with the same
    oneDNN convolution as the whole map (one halo row above and below, zero rows at the image
    border; bitwise the same result), so no full-resolution conv output or oneDNN work copy exists.
    """
    conv = model.cross_decode.conv2d
    att = model.cross_decode.cross_attn
    scale = math.sqrt(1.0 / (model.qk_dim // model.num_heads))
    height = q_src.shape[1]
    for r0 in range(0, height, rows):
        r1 = min(height, r0 + rows)
        a, b = max(0, r0 - 1), min(height, r1 + 1)
        band = q_src[None, :, a:b]
        if a == r0 or b == r1:  # image border: zero padding rows
            band = F.pad(band, (0, 0, 1 if a == r0 else 0, 1 if b == r1 else 0))
        out = F.conv2d(band, conv.weight, conv.bias, padding=(0, 1))
        _project_rows(att, out[0], dest[r0:r1], scale)


def _project_rows(att: _CrossAttentionParams, q_rows: torch.Tensor, dest: torch.Tensor, scale: float) -> None:
    """``dest`` ``[r, W, D]`` = ``(Wq rms(q) + bq) * scale`` of ``q_rows`` ``[D, r, W]`` (the official ops)."""
    d = q_rows.shape[0]
    x = att.norm_q(q_rows.permute(1, 2, 0).reshape(-1, d))
    w_q, b_q = att.attention.in_proj_weight[:d], att.attention.in_proj_bias[:d]
    flat = dest.view(-1, d)
    torch.addmm(b_q, x, w_q.t(), out=flat)  # = F.linear(x, w_q, b_q)
    flat.mul_(scale)


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


def _normalised_guide(guide: torch.Tensor, normalize_guide: bool) -> torch.Tensor:
    """ImageNet-normalise a ``[0, 1]`` RGB guide (checked), or return it as is."""
    if not normalize_guide:
        return guide
    lo, hi = float(guide.min()), float(guide.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"guide must be RGB in [0, 1] when normalize_guide=True, got values in [{lo:.3g}, {hi:.3g}] "
            f"(shape {tuple(guide.shape)}); pass normalize_guide=False for an already normalised guide"
        )
    mean = guide.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = guide.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (guide - mean) / std


def _resolve_model(model: AnyUp | None, checkpoint: str | Path | None, guide: object) -> AnyUp:
    if (model is None) == (checkpoint is None):
        raise ValueError("anyup needs exactly one of model= (an AnyUp) or checkpoint= (a local .pth path)")
    if model is None:
        check_tensor(guide, "guide", ndim=4)
        model = load_anyup(checkpoint).to(device=guide.device, dtype=guide.dtype)
    elif not isinstance(model, AnyUp):
        raise ValueError(f"model must be an AnyUp, got {type(model).__name__}")
    return model


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

    Notes
    -----
    The output is positively homogeneous in the features: ``anyup(g, s * f) = s * anyup(g, f)``
    for any ``s > 0`` (up to float rounding), because the features reach the attention weights only
    through their L2 normalisation over channels, and the output is a convex combination of them.
    """
    model = _resolve_model(model, checkpoint, guide)
    size = _check_inputs(model, guide, features, output_size, "guide")
    with torch.no_grad():
        return model(_normalised_guide(guide, normalize_guide), features, size)


def anyup_depth(
    depth_lr: torch.Tensor,
    guide: torch.Tensor,
    *,
    model: AnyUp | None = None,
    checkpoint: str | Path | None = None,
    mask_lr: torch.Tensor | None = None,
    output_size: tuple[int, int] | None = None,
    min_weight: float = 1e-3,
    normalize_guide: bool = True,
) -> torch.Tensor:
    """Guided depth upsampling with AnyUp, holes excluded (the ``anyup`` method of ``ua3d eval``).

    Depth is treated as a one-channel feature.  An LR pixel is valid where it is finite, ``> 0``
    and ``mask_lr`` is True.  The attention weights come from the guide and the one-channel key
    feature ``valid`` (exactly what AnyUp's L2 normalisation over channels makes of the depth map
    with its holes set to 0: 1 at valid pixels, 0 at holes), so they do not depend on the depth
    values at all.  They are applied to the two value channels ``[depth * valid, valid]``
    (normalised convolution): the output is ``num / den``, a convex combination of valid LR depths
    only, and NaN where the attention mass ``den`` on valid pixels is ``<= min_weight``.

    Consequences: without holes the result equals ``anyup(guide, depth_lr)`` (up to float
    rounding; ``den = 1``), and it is scale- and shift-equivariant in the depth,
    ``f(s * d + t) = s * f(d) + t`` for ``s > 0`` and positive ``d, s * d + t``, so depth in metres
    or millimetres needs no per-image normalisation.

    Parameters
    ----------
    depth_lr : ``[B, 1, h, w]`` low-resolution depth (NaN / 0 / negative = hole), any units.
    guide : ``[B, 3, H, W]`` RGB in ``[0, 1]`` (see :func:`anyup` for ``normalize_guide``).
    model : a loaded :class:`AnyUp` on the inputs' device and dtype ...
    checkpoint : ... or a local checkpoint path (loaded on each call; pass ``model`` to reuse).
    mask_lr : optional ``[B, 1, h, w]`` bool, False = hole.
    output_size : ``(H', W')``; default the guide's ``(H, W)``.
    min_weight : smallest attention mass on valid pixels for an output value (else NaN).
    normalize_guide : see :func:`anyup`.

    Returns
    -------
    ``[B, 1, H', W']`` depth in the units of ``depth_lr``, NaN where there is no valid support.
    """
    model = _resolve_model(model, checkpoint, guide)
    check_tensor(depth_lr, "depth_lr", ndim=4)
    if depth_lr.shape[1] != 1 or not depth_lr.is_floating_point():
        raise ValueError(f"depth_lr must be a floating [B, 1, h, w] tensor, got {depth_lr.dtype} {tuple(depth_lr.shape)}")
    valid = torch.isfinite(depth_lr) & (depth_lr > 0)
    if mask_lr is not None:
        if not isinstance(mask_lr, torch.Tensor) or mask_lr.shape != depth_lr.shape:
            got = tuple(mask_lr.shape) if isinstance(mask_lr, torch.Tensor) else type(mask_lr).__name__
            raise ValueError(f"mask_lr must have the shape of depth_lr {tuple(depth_lr.shape)}, got {got}")
        valid &= mask_lr.to(device=depth_lr.device, dtype=torch.bool)
    if not min_weight >= 0:
        raise ValueError(f"min_weight must be >= 0, got {min_weight}")
    key_feature = valid.to(depth_lr.dtype)
    size = _check_inputs(model, guide, key_feature, output_size, "guide")
    values = torch.cat([torch.where(valid, depth_lr, torch.zeros_like(depth_lr)), key_feature], dim=1)
    with torch.no_grad():
        qp, k = model._attention_inputs(_normalised_guide(guide, normalize_guide), key_feature, size)
        both = model._attend_projected(qp, k, values, None, None)
    num, den = both[:, :1], both[:, 1:]
    out = num / den.clamp_min(torch.finfo(den.dtype).tiny)
    return torch.where(den > min_weight, out, torch.full_like(out, math.nan))
