"""The AnyUp model: :class:`AnyUp` with its input checks, encoders and attention entry points."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.checks import check_finite, check_same_batch, check_size, check_tensor
from .attention import plan_tiles, window_attention
from .constants import CHUNK_BUDGET_FACTOR, DEFAULT_STRIP_BYTES, DEFAULT_TILE_BUDGET_BYTES
from .fused import _project_rows, encode_fused
from .modules import _CrossDecode, _Encoder, _FeatureUnification, _ResBlock, _RoPE2d

__all__ = ["AnyUp"]


def _as_size(size: object, name: str) -> tuple[int, int]:
    if isinstance(size, torch.Size):
        size = tuple(size)
    return check_size(size, name)


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
        """Inference :meth:`encode` as fused strip passes (:func:`~.fused.encode_fused`)."""
        return encode_fused(self, image, features, output_size, project)

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

    def _plan_tiles(self, *args: object, **kwargs: object) -> tuple[int, int]:
        """Tile shape ``(rows, cols)`` in output pixels for this model: :func:`~.attention.plan_tiles`
        ``(out_hw, lr_hw, batch, channels, budget, q_chunk_size, value_bytes=4, device=None)`` with this
        model's heads, width and window."""
        model = {"num_heads": self.num_heads, "qk_dim": self.qk_dim, "window_ratio": self.window_ratio}
        return plan_tiles(*args, **kwargs, **model)  # type: ignore[arg-type]

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
        self,
        qp: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_chunk_size: int | None,
        tile_budget_bytes: int | None,
    ) -> torch.Tensor:
        """:meth:`attend` for projected queries ``qp`` ``[B, H', W', D]`` (:meth:`_project_queries`)."""
        _, H, W, _ = qp.shape
        _, C, h, w = v.shape
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
        tile = self._plan_tiles((H, W), (h, w), 1, C, budget, q_chunk_size, qp.element_size(), qp.device)
        return window_attention(
            qp, kp, vt, tile, window_ratio=self.window_ratio, num_heads=self.num_heads, grad=grad
        )

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
