"""Fused strip passes: the inference path of AnyUp's full-resolution encoders (no autograd).

Each GroupNorm becomes a per-channel affine map from statistics gathered in the previous pass
(:class:`_Moments`), so every 1x1 conv, norm, SiLU, residual add and the rotary code touch a
cache-sized strip of pixels once and no full-resolution temporaries are allocated
(:func:`encode_fused`); the 3x3 query conv and the query projection run in bands of rows
(:func:`_conv_project_bands`).  :meth:`AnyUp._encode_reference` is the module-by-module reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .modules import _CrossAttentionParams, _Encoder, _ResBlock

if TYPE_CHECKING:
    from .model import AnyUp


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


def _gn_affine(
    norm: nn.GroupNorm, moments: _Moments, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
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
    block: _ResBlock,
    x: torch.Tensor,
    u: torch.Tensor,
    strips: list[tuple[int, int]],
    moments: _Moments,
    buf: _StripBuffers,
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
    block: _ResBlock,
    x: torch.Tensor,
    u: torch.Tensor,
    strips: list[tuple[int, int]],
    moments: _Moments,
    buf: _StripBuffers,
    *,
    stats: bool = True,
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
    enc: _Encoder,
    x: torch.Tensor,
    tmp: torch.Tensor,
    strips: list[tuple[int, int]],
    moments: _Moments,
    buf: _StripBuffers,
    finish: Callable[[int, int, torch.Tensor], None] | None = None,
) -> None:
    """Both residual blocks of ``enc`` on the map ``x`` ``[D, N]`` in place (``tmp``: scratch map)."""
    blocks = list(enc)[1:]
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        moments = _pass_expand(block, x, tmp, strips, moments, buf)
        moments = _pass_residual(
            block, x, tmp, strips, moments, buf, stats=not last, finish=finish if last else None
        )


def _rope_and_stems(
    s: int,
    e: int,
    xs: torch.Tensor,
    *,
    freqs_t: torch.Tensor,
    coords_t: torch.Tensor,
    w_key: torch.Tensor,
    w_query: torch.Tensor,
    keys: torch.Tensor,
    queries: torch.Tensor,
    mom_k: _Moments,
    mom_q: _Moments,
    buf: _StripBuffers,
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


def encode_fused(
    model: AnyUp, image: torch.Tensor, features: torch.Tensor, output_size: tuple[int, int], project: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference :meth:`AnyUp.encode` with the full-resolution encoders as fused strip passes.

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
    d, n_pix = model.qk_dim, height * width
    out_h, out_w = output_size
    step = model._strip_pixels(n_pix, image.device, image.element_size())
    strips = [(s, min(n_pix, s + step)) for s in range(0, n_pix, step)]
    groups = model.image_encoder[1].block[0].num_groups
    coords_t = model.rope.coordinates(height, width, image.device, image.dtype)[0].t()  # [2, N]
    freqs_t = model.rope.freqs.t()  # [D, 2]
    w_key = model.key_encoder[0].weight.flatten(1)
    w_query = model.query_encoder[0].weight.flatten(1)
    stem = model.image_encoder[0]
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
            pixels = image[bi].reshape(model.input_dim, n_pix)
            w_stem = stem.weight.flatten(1)
            for s, e in strips:
                xs = torch.mm(w_stem, pixels[:, s:e], out=x[:, s:e])
                moments.add(xs, buf.ones, buf.get("scratch", e - s))
        else:
            x.copy_(model.image_encoder.stem(image[bi : bi + 1]).reshape(d, n_pix))
            for s, e in strips:
                moments.add(x[:, s:e], buf.ones, buf.get("scratch", e - s))
        # residual blocks' inner activations; overwritten by the key stream strip by strip
        inner = image.new_empty(d, n_pix)
        queries = image.new_empty(d, n_pix)
        mom_k, mom_q = _Moments(groups), _Moments(groups)
        finish = partial(
            _rope_and_stems,
            freqs_t=freqs_t,
            coords_t=coords_t,
            w_key=w_key,
            w_query=w_query,
            keys=inner,
            queries=queries,
            mom_k=mom_k,
            mom_q=mom_q,
            buf=buf,
        )
        _run_encoder_body(model.image_encoder, x, inner, strips, moments, buf, finish=finish)
        del finish
        _run_encoder_body(model.key_encoder, inner, x, strips, mom_k, buf)
        ks.append(F.adaptive_avg_pool2d(inner.view(1, d, height, width), (h, w)))
        _run_encoder_body(model.query_encoder, queries, x, strips, mom_q, buf)
        del x, buf
        q_src = queries.view(d, height, width)
        if (height, width) != (out_h, out_w):
            q_src = F.adaptive_avg_pool2d(q_src[None], output_size)[0]
        if not project:
            dest = model.cross_decode.conv2d(q_src[None])[0]  # oneDNN, as in the reference path
            if batched_out is not None:
                dest = batched_out[bi].copy_(dest)
        else:
            if batched_out is not None:
                dest = batched_out[bi]
            elif inner.numel() >= out_h * out_w * d:  # reuse the key map's pages
                dest = inner.view(-1)[: out_h * out_w * d].view(out_h, out_w, d)
            else:
                dest = image.new_empty(out_h, out_w, d)
            _conv_project_bands(model, q_src, dest, max(1, (16 * step) // out_w))
        del q_src, queries, inner
        qs.append(dest)

    lfu = model.key_features_encoder[0].fused(F.normalize(features, dim=1))
    lfu = model.key_features_encoder.body(lfu)
    k = model.aggregation(torch.cat([ks[0] if b_size == 1 else torch.cat(ks), lfu], dim=1))
    return (qs[0][None] if batched_out is None else batched_out), k


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
