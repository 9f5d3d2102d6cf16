"""Building blocks of AnyUp whose module names and parameter shapes follow the official state dict.

Encoders (:class:`_Encoder`: a stem and two :class:`_ResBlock`), the feature unification
(:class:`_FeatureUnification`, with its reference and fused paths), the 2-D rotary code
(:class:`_RoPE2d`) and the attention's parameters (RMSNorm weights, packed projections).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .constants import CHUNK_BUDGET_FACTOR, DEFAULT_TILE_BUDGET_BYTES, LFU_BLOCK_BYTES, SOFTMAX_FLOOR


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
            return (
                self.rotate(x.permute(0, 2, 3, 1).reshape(b, h * w, d), coords)
                .view(b, h, w, d)
                .permute(0, 3, 1, 2)
            )
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
