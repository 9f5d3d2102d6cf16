r"""Fused CPU engine (numba) for the Upsample Anything kernel: fit loss/gradient and render.

Numerically the same functions as the ``*_reference`` twins in :mod:`ua3d.core.kernel`
(see there for the maths and the parameterisation), organised for speed:

* **Blocks.** HR pixels that share the same nearest LR anchor ``(i, j)`` form a block
  (``P`` pixels, 16 x 16 for a ViT/16 grid); they share one neighbour list (the window
  offsets around the anchor, cells outside the grid dropped: ``K <= 197`` for radius 8).
  Per LR cell one contiguous record (``cos theta, sin theta, 1 / (2 sigma_x^2),
  1 / (2 sigma_y^2), 1 / (2 sigma_r^2)``, the LR guide values) is computed once per call;
  per block the neighbours' records are gathered once. Inside a block the loops run over
  neighbours (outer) and pixels (inner, vectorised, padded to a multiple of 8), in a
  block-local frame; ``exp`` is an own vectorisable polynomial (:func:`_fexp`, < 1 ulp
  float32, ~1e-16 float64) with the max subtracted. The hot kernels ask LLVM for 512-bit
  vectors (:func:`_wide_vectors`; LLVM's default on AVX-512 CPUs is 256).
* **RGB guides** (one range group of three channels, the common case) take an *expanded*
  form (:func:`_rgb_logits`): with pixel coordinates and colours centred on the block's
  means, every logit is an affine function of ten per-pixel features (``x^2, y^2, x y, x, y,
  |c|^2, c``, validity), so a logit costs ten multiply-adds, and the gradient needs ten
  feature moments per neighbour instead of per-pixel offsets and distances.
* **Other layouts** (the RGB-D lift's colour + normals and depth groups, 1, 4, ... channel guides; no
  support cut) take the same expanded form with ``5 + sum_g (n_g + 2)`` features padded to a multiple of 8
  (:mod:`~ua3d.core.fast.expanded`). Channels of zero loss weight are in the range distance only: the
  reconstruction and its gradient skip them.
* **Fit.** Per block: logits and their max per pixel; ``exp`` fused with the reconstruction
  of the guide; then the hand-derived gradient of the L1 loss through the softmax,

  .. math:: \partial L / \partial \ell_k = w_k (s_k - \textstyle\sum_j w_j s_j),
            \quad s_k = \textstyle\sum_c e_c f_{ck},\quad e_c = m_c \lambda_c\,\mathrm{sign}(\hat g_c - g_c) / N,

  reduced over the block's pixels into four sums per neighbour
  ``sum g a^2, sum g b^2, sum g a b, sum g D_r`` (``a, b`` the rotated offsets, ``D_r`` the
  masked range distance of each group), whose products with per-cell factors are the
  parameter gradients (:func:`_chain_rule`). Nothing of size ``[K, H, W]`` is materialised.
  The sums go to a per-LR-row buffer ``[B h, 2 r + 1, w, 3 + G]`` (one writer per row: no
  races, and a fixed reduction order, so results do not depend on the thread count).
  Pixels outside ``pixel_mask`` are skipped before any work. Host-side work per call is
  numpy on small arrays: torch's threaded kernels, called between the engine's own parallel
  sections, leave OpenMP threads spinning against the engine's threads.
* **Dropped neighbours.** A neighbour whose weight is below ``e^-gap`` of the largest at *every*
  pixel of a block (``gap`` = :data:`~ua3d.core.fast.inputs.SKIP_GAP`: 20 in float32, 40 in float64)
  is dropped from that block after the logits (weight 0, no gradient): the exp, reconstruction and
  gradient passes of the fit and the render's product skip it. With fitted kernels about half of the
  (block, neighbour) pairs go (224 px); the results move by at most ``K e^-gap`` relative, below the
  dtype's resolution of the largest weight times the window size.
* **Render.** Up to :data:`SMALL_C` channels (depth) the weighted sum is fused in numba. For more,
  each block runs end to end on one thread (:func:`~ua3d.core.fast.render._render_dot`): normalised
  weights over its kept neighbours ``[K', P]``, the neighbours' features ``[K', C]`` (cell-major
  copies), their product by numba's ``np.dot`` (scipy's BLAS held at one thread per caller,
  :mod:`~ua3d.core.fast.blas`), written straight into the output (float16 rounded in numba). Without
  scipy (or ``render.DOT = False``) the weight matrix over the full window goes through ``torch.bmm``
  in tiles of rows of blocks (:data:`TILE_BYTES`), so that peak memory is the output plus a bounded
  working set. Large outputs are advised for transparent huge pages (:func:`_empty_huge`): page faults
  on fresh memory were a third of the render's time.
* **Threads.** The kernels are plain ``nogil`` numba functions over a range of block rows
  (or blocks); :func:`_parallel_for` runs chunks of that range on the calling thread and
  ``torch.get_num_threads() - 1`` pool threads (no parfors: they tripled the compile time), all with
  denormals flushed (FTZ/DAZ through the MXCSR; the caller's setting is restored).

Numba is imported when this module is imported (which :mod:`ua3d.core.ops` does lazily,
on first use) and each kernel compiles on its first call per dtype (about 20 s of CPU for
float32 or float64; ``cache=True``: later processes load it from disk in well under a
second). ``AVAILABLE`` is False when numba cannot be imported.

Modules (each numba kernel sits beside the host code that launches it):

=============  =====================================================================================
``_jit``       numba import guard (``AVAILABLE``), jit options, intrinsics, :func:`_fexp`
``blocks``     block neighbour lists, pixels, logits and weights (shared by fit and render)
``fit``        :func:`kernel_fit_loss_grad` <-> :func:`ua3d.core.kernel.kernel_fit_loss_grad_reference`
``expanded``   the fit's expanded form for any range-group layout (features, coefficients, moments)
``prefilter``  the guide pre-filter's bilateral pass <-> :func:`ua3d.core.tto._bilateral_torch`
``render``     :func:`kernel_render` <-> :func:`ua3d.core.kernel.kernel_render_reference`,
               :func:`render_working_bytes`
``inputs``     input checks, the per-call :class:`~ua3d.core.fast.inputs.Frame` (``_setup``) and the
               per-LR-cell records (parameter decoding, host side); :data:`~.inputs.SKIP_GAP`,
               :data:`~.inputs.EXPANDED`
``pool``       thread pool, cached block geometry, huge-page buffers
``blas``       scipy's BLAS (numba's ``np.dot``) held at one thread while the engine's threads call it
=============  =====================================================================================

numba's on-disk cache (``cache=True``) is keyed on each kernel's own source file: after editing
``_jit.py`` or ``blocks.py``, delete ``ua3d/core/fast/__pycache__`` so that the kernels of
``fit.py`` and ``render.py`` that inline them are recompiled.
"""

from ._jit import AVAILABLE
from .fit import kernel_fit_loss_grad
from .pool import _empty_huge as _empty_huge  # private names the tests use (patch ``pool._madvise`` itself)
from .pool import _madvise as _madvise
from .pool import _parallel_for as _parallel_for
from .pool import _pool as _pool
from .pool import num_threads
from .render import SMALL_C, TILE_BYTES, kernel_render, render_working_bytes

__all__ = [
    "AVAILABLE",
    "SMALL_C",
    "TILE_BYTES",
    "kernel_fit_loss_grad",
    "kernel_render",
    "num_threads",
    "render_working_bytes",
]
