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

Modules
-------
``model``      :class:`AnyUp`, its input checks and the module-by-module reference path.
``modules``    building blocks named and shaped like the official state dict.
``fused``      fused strip passes (the inference path of the full-resolution encoders).
``attention``  window bounds, the tile plan with its cost model, the tiled window attention.
``loading``    :func:`load_anyup` through :func:`ua3d.features.backbones.load_state_dict_strict`.
``baseline``   :func:`anyup` and :func:`anyup_depth`, the entry points of ``ua3d eval``.
"""

from ...features.image import IMAGENET_MEAN, IMAGENET_STD
from .attention import _floored_softmax, plan_tiles, window_attention, window_bounds
from .baseline import anyup, anyup_depth
from .constants import (
    CHUNK_BUDGET_FACTOR,
    DEFAULT_STRIP_BYTES,
    DEFAULT_TILE_BUDGET_BYTES,
    LFU_BLOCK_BYTES,
    SOFTMAX_FLOOR,
)
from .fused import _Moments
from .loading import load_anyup
from .model import AnyUp

__all__ = [
    "CHUNK_BUDGET_FACTOR",
    "DEFAULT_STRIP_BYTES",
    "DEFAULT_TILE_BUDGET_BYTES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LFU_BLOCK_BYTES",
    "SOFTMAX_FLOOR",
    "AnyUp",
    "_Moments",
    "_floored_softmax",
    "anyup",
    "anyup_depth",
    "load_anyup",
    "plan_tiles",
    "window_attention",
    "window_bounds",
]
