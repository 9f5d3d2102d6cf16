r"""Dense 3D feature volumes from a lifted kernel.

For depth bins ``z_0 < ... < z_{D-1}`` every HR pixel ``p`` is evaluated *as if* it were at
depth ``z_d``: the depth channel of the HR guide is set to ``phi(z_d)`` (and counts as valid)
while colour and position stay those of ``p``. With the lifted logits

.. math:: \ell_d(p, q) = s(p, q) + t_d(p, q), \qquad
          t_d(p, q) = -\frac{(\phi(z_d) - \mu_q(p))^2}{2 \sigma_z(q)^2}

(``s`` = spatial + colour term, the colour group being RGB and the lift's surface-normal channels,
the pixel's own at every bin; ``t_d = 0`` for LR cells without valid depth), the volume and
its mass are

* ``volume[c, d, p] = sum_q softmax_q(l_d(p, q)) f_c(q)``;
* ``mass[d, p]``: the un-normalised weight sum ``M_d(p) = sum_q exp(l_d(p, q))``, i.e. how much
  kernel mass the LR cells put at that depth along the pixel's ray (occupancy evidence). With
  ``mass_mode="normalized"`` (default) it is divided by its sum over the computed bins, so that
  ``mass[:, p]`` is a distribution over depth per pixel; ``"raw"`` returns ``M_d(p)`` itself
  (``0 < M <= K``, the window size).

Depth model (``depth_model``), i.e. the depth centre ``mu_q(p)`` of cell ``q`` seen from ``p``:

* ``"constant"``: ``mu_q = phi(z_q)``, the fitted kernel exactly: ``volume[:, d]`` equals the 2D
  render :func:`ua3d.core.ops.kernel_render` with the depth channel set to the bin depth (tested).
* ``"planar"``: ``mu_q(p) = phi(z_q) + g_q . (p - c_q)`` with ``g_q`` the cell's robust
  depth-feature slope (:func:`ua3d.rgbd.lift.cell_gradients`) and ``c_q`` its centre: each LR
  Gaussian becomes a 3D Gaussian tilted along the surface, so a slanted surface puts its mass at
  the right depth all across a cell instead of at the cell's median depth. On synthetic scenes
  (256x192, 4x grid, 16 bins) the mass peaks in the true depth bin for 96-98% of the valid pixels
  against 86-91% for ``"constant"`` (``scripts/eval_lift.py``). The fit itself (TTO) uses the
  constant model: the engine's range groups have fixed centres.
* ``"plane"`` (default): the same tilted Gaussians, but in the depth term's own feature
  ``psi(z) = z_ref / z`` (``z_ref`` the median valid depth) instead of ``phi``: on any 3D plane the
  inverse depth is *linear* in the pixel coordinates, so a cell's plane ``psi_q + g_q . (p - c_q)``
  (slopes: :func:`ua3d.rgbd.lift.cell_gradients` of ``psi``; centre value: the median over the
  cell's valid pixels of ``psi(p) - g_q . (p - c_q)``; empty cells: the nearest valid cell's
  plane) is exact at *every* pixel of the plane, not only near the cell (``phi = log z`` is
  curved along a floor, and the fitted kernel's wide spatial sigmas let a floor pixel take most
  of its mass from cells several rows away). The depth scale is the fitted ``sigma_z`` converted
  to ``psi`` units at the cell's depth (first order: a log-depth width ``s`` is ``s psi_q``; a
  metric width ``s`` is ``s psi_q^2 / z_ref``). Nothing of the fit changes (the label / 2D renders
  are the kernel's); only the volume's depth profile. On the transfer benchmark's label scenes
  after the default fit (16 bins, x14 and x16 grids) the mass peaks within one bin of the true
  depth for about 0.96-0.99 of the valid pixels per family against 0.86-0.95 for ``"planar"``
  (``docs/transfer.md``).

The HR pixels that share a nearest LR anchor (a *block*) share their neighbour set, so the code
works block by block: the spatial x colour logits of the block (the expression of
:func:`ua3d.core.kernel.pair_logits`, neighbour parameters gathered once per block) plus the
depth term for every bin give the weights ``[Db, n, K]``, and one matrix product with the
block's features ``[C, K]`` renders all its bins into the volume's ``[C, D, rows, columns]``
order. The softmax is done in log space, so no bin underflows to 0/0; ``log M`` is kept per
voxel and exponentiated at the end. Logits more than 80 below a pixel's largest are clamped to
that floor before ``exp`` (keeps ``exp`` off its slow path; changes weights below ``e^-80``).

Memory is bounded: pixels are streamed in row chunks and channels in chunks sized to
``budget_bytes``; ``band`` keeps only ``2 band + 1`` bins around each pixel's observed depth (the
kernel-rendered depth where the observation is a hole), the other voxels being 0 with mass 0;
``out_dtype=torch.float16`` halves the output; ``out="file.npy"`` writes the volume to a ``.npy``
memmap. :func:`estimate_volume_bytes` says what a call will use, and :func:`render_volume`
refuses with a ``ValueError`` when the output does not fit in the available memory (or disk).

Engines (``backend``): on CPU the fused numba engine
:func:`ua3d.core.fast_volume.kernel_render_volume` (default when numba imports): each weight is
computed once in numba in cache-sized chunks of bins, one ``torch.bmm`` per batch of blocks does the
contraction with the features, and numba scatters into the volume (float16 rounded in place, also
into a memmap), with no ``[Db, n, K]`` temporaries. The tensor code below (:func:`_stream_reference`)
is the readable reference twin (parity tests in ``tests/test_fast_volume.py``) and the path for
CUDA kernels (row chunks, memory linear in pixels). Work at 640x480, 64 channels on a 30x40 grid,
64 bins, radius 8: ``3.15e9`` (pixel, bin, neighbour) pairs; figures in ``scripts/bench_volume.py``.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ua3d.core.checks import check_number
from ua3d.core.kernel import lr_centres, nearest_anchor, spatial_colour_logits, window_offsets
from ua3d.core.memory import check_memory, check_window
from ua3d.core.ops import resolve_backend
from ua3d.core.params import decode_params
from ua3d.rgbd.lift import LiftedKernel

__all__ = [
    "DEPTH_MODELS",
    "MASS_MODES",
    "SPACINGS",
    "VolumeEstimate",
    "depth_to_bin",
    "estimate_volume_bytes",
    "make_bin_depths",
    "render_volume",
]

SPACINGS = ("uniform", "inverse")
MASS_MODES = ("normalized", "raw")
DEPTH_MODELS = ("plane", "planar", "constant")
_DEFAULT_BUDGET = 256 << 20
_EXP_FLOOR = -80.0


# ---------------------------------------------------------------------- bins
def _check_bins(bins: int, near: float, far: float, spacing: str) -> None:
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    check_number(near, "near", finite=False)
    check_number(far, "far", finite=False)
    if not (near > 0 and math.isfinite(near) and math.isfinite(far)):
        raise ValueError(f"near must be positive and near/far finite, got near={near!r}, far={far!r}")
    if not (far > near) and bins > 1:
        raise ValueError(f"far must be greater than near for bins > 1, got near={near!r}, far={far!r}")


def make_bin_depths(
    near: float, far: float, bins: int, spacing: str = "uniform", device=None
) -> torch.Tensor:
    """Depth of each bin in metres, ``[D]`` float64, strictly increasing from ``near`` to ``far``.

    ``"uniform"``: equal steps in depth. ``"inverse"``: equal steps in ``1 / z`` (finer near the camera).
    """
    _check_bins(bins, near, far, spacing)
    t = torch.linspace(0.0, 1.0, int(bins), dtype=torch.float64, device=device)
    if spacing == "uniform":
        return near + (far - near) * t
    return 1.0 / (1.0 / near + (1.0 / far - 1.0 / near) * t)


def depth_to_bin(z: torch.Tensor, bin_depths: torch.Tensor, spacing: str = "uniform") -> torch.Tensor:
    """Nearest bin index of metric depth ``z`` (any shape), measured in the spacing's own coordinate.

    Nearest in ``z`` for ``"uniform"``, in ``1 / z`` for ``"inverse"``; clamped to ``[0, D - 1]``;
    ``-1`` where ``z`` is not a positive finite number.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    D = bin_depths.numel()
    zz = z.to(torch.float64)
    ok = torch.isfinite(zz) & (zz > 0)
    zs = torch.where(ok, zz, torch.ones_like(zz))
    near, far = float(bin_depths[0]), float(bin_depths[-1])
    if D == 1:
        t = torch.zeros_like(zs)
    elif spacing == "uniform":
        t = (zs - near) / (far - near) * (D - 1)
    else:
        t = (1.0 / near - 1.0 / zs) / (1.0 / near - 1.0 / far) * (D - 1)
    idx = torch.floor(t + 0.5).clamp(0, D - 1).to(torch.int64)
    return torch.where(ok, idx, torch.full_like(idx, -1))


# ---------------------------------------------------------------------- memory
@dataclass(frozen=True)
class VolumeEstimate:
    """What :func:`render_volume` will allocate, in bytes.

    ``volume``: the ``[C, D, H, W]`` output (on disk when ``on_disk``); ``mass``: ``log M`` plus the
    returned mass (float32 ``[D, H, W]`` each); ``working``: the per-block buffers (at most the budget,
    unless one row alone exceeds it); ``rows_per_chunk`` / ``channel_chunk``: the chunking used.
    """

    volume: int
    mass: int
    working: int
    rows_per_chunk: int
    channel_chunk: int
    on_disk: bool

    @property
    def memory(self) -> int:
        """Bytes of RAM (the volume counts only when it is not a memmap)."""
        return self.mass + self.working + (0 if self.on_disk else self.volume)

    def __str__(self) -> str:
        gib = 2.0**30
        where = "on disk (memmap)" if self.on_disk else "in memory"
        return (
            f"volume {self.volume / gib:.2f} GiB {where}, mass {self.mass / gib:.3f} GiB, working "
            f"{self.working / gib:.3f} GiB ({self.rows_per_chunk} rows x {self.channel_chunk} channels per "
            f"chunk); RAM total {self.memory / gib:.2f} GiB"
        )


def _per_row_floats(block_w: int, K: int, n_bins: int, cc: int) -> int:
    """Working floats per HR row of a block: spatial/colour temporaries ``~8 [nx, K]``, the weights
    ``[Db, nx, K]`` (two buffers) and the matrix product's output ``[Cc, Db, nx]``."""
    return block_w * (K * (8 + 2 * n_bins) + cc * n_bins)


def estimate_volume_bytes(
    channels: int,
    bins: int,
    out_size: tuple[int, int],
    out_dtype: torch.dtype = torch.float32,
    *,
    band: int | None = None,
    radius: float = 8.0,
    lr_size: tuple[int, int] | None = None,
    work_dtype: torch.dtype = torch.float32,
    channel_chunk: int | None = None,
    budget_bytes: int = _DEFAULT_BUDGET,
    on_disk: bool = False,
    backend: str = "auto",
) -> VolumeEstimate:
    """Bytes a :func:`render_volume` call needs, before anything is allocated.

    Parameters
    ----------
    channels, bins : ``C`` and ``D``.
    out_size : ``(H, W)``.
    out_dtype : dtype of the volume (float16 halves it).
    band : half-width of the bin band, or None for all bins.
    radius : kernel window radius in LR cells (sets ``K``).
    lr_size : ``(h, w)`` of the feature grid (sets the block width; None: a conservative bound).
    work_dtype : dtype of the computation (the kernel parameters' dtype).
    channel_chunk : channels per chunk (default: all, capped at 64).
    budget_bytes : target size of the streaming buffers.
    on_disk : True when the volume goes to a memmap.
    backend : the engine (``"auto"``: the fused CPU engine when numba imports): its working set is
        a batch of blocks' weights (:func:`ua3d.core.fast_volume.volume_working_bytes`), the
        reference's the row chunks below.
    """
    H, W = out_size
    n_bins = bins if band is None else min(bins, 2 * int(band) + 1)
    K = check_window(radius, lr_size or (H, W))
    cc = max(1, min(channels, 64 if channel_chunk is None else int(channel_chunk)))
    fsize = torch.empty((), dtype=work_dtype).element_size()
    block_w = W if lr_size is None else -(-W // lr_size[1]) + 1
    per_row = _per_row_floats(block_w, K, n_bins, cc) * fsize
    block_h = H if lr_size is None else -(-H // lr_size[0]) + 1  # a chunk never spans two anchor rows
    rows = int(max(1, min(block_h, budget_bytes // max(per_row, 1))))
    working = rows * per_row
    if _engine(backend, torch.device("cpu"), out_dtype) == "fast":
        from ua3d.core.fast_volume import volume_working_bytes

        _, _, working = volume_working_bytes(
            (H, W), lr_size or (H, W), channels, n_bins, radius, fsize, budget_bytes
        )
    osize = torch.empty((), dtype=out_dtype).element_size()
    return VolumeEstimate(
        volume=channels * bins * H * W * osize,
        mass=2 * bins * H * W * 4,
        working=working,
        rows_per_chunk=rows,
        channel_chunk=cc,
        on_disk=on_disk,
    )


def _engine(backend: str, device: torch.device, out_dtype: torch.dtype) -> str:
    """``"fast"`` (the fused numba engine :mod:`ua3d.core.fast_volume`: CPU, float16/32/64 volumes) or
    ``"reference"`` (the tensor code below, any device; CUDA inputs use it) for ``backend``."""
    which = resolve_backend(backend, device)
    if which == "fast" and out_dtype not in (torch.float16, torch.float32, torch.float64):
        if backend == "fast":
            raise ValueError(f"backend='fast' writes float16/32/64 volumes, got out_dtype={out_dtype}")
        which = "reference"
    return which


def _check_fits(est: VolumeEstimate, out: Path | None, device: torch.device) -> None:
    hint = "" if est.on_disk else ", pass out='volume.npy' (memmap)"
    check_memory(
        est.memory,
        f"render_volume ({est})",
        f"use fewer bins or channels, a band{hint}, or out_dtype=torch.float16",
        device=device,
    )
    if out is not None:
        free = shutil.disk_usage(out.parent).free
        if est.volume > 0.95 * free:
            raise ValueError(
                f"the volume needs {est.volume / 2**30:.2f} GiB on disk but only {free / 2**30:.2f} GiB is free "
                f"at {str(out.parent)!r}"
            )


# ---------------------------------------------------------------------- rendering
@dataclass(frozen=True)
class _DepthInputs:
    """What the depth term of the volume is computed from (both engines take exactly these).

    ``params [1, 5, h, w]``: the kernel's, with the depth group's ``log sigma`` in the model's feature
    units; ``phi_lr [1, 1, h, w]``: each cell's depth centre; ``slopes [1, 2, h, w]`` or None;
    ``phi_bins [D]``: the bins in the same feature.
    """

    params: torch.Tensor
    phi_lr: torch.Tensor
    slopes: torch.Tensor | None
    phi_bins: torch.Tensor


def _plane_fit(psi: torch.Tensor, valid: torch.Tensor, lr_size: tuple[int, int]):
    """Per-cell plane of an HR map ``psi [1, 1, H, W]``: slopes ``[1, 2, h, w]`` (the robust in-cell
    finite differences of :func:`~ua3d.rgbd.lift.cell_gradients`) and the value at the cell's centre
    ``[1, 1, h, w]`` (median over the cell's valid pixels of ``psi(p) - slope . (p - c_q)``; cells
    without valid depth: the nearest valid cell's plane, extended to this cell's centre)."""
    from ua3d.rgbd.lift import _batched_cells, _segment_median, cell_gradients, fill_nearest

    H, W = psi.shape[-2:]
    h, w = lr_size
    dt, dev = psi.dtype, psi.device
    g = cell_gradients(psi, valid, lr_size)  # [1, 2, h, w]
    cell = _batched_cells(1, H, W, lr_size, dev)[0]
    cy = lr_centres(h, H, dev, dt)[cell // w]
    cx = lr_centres(w, W, dev, dt)[cell % w]
    yy = torch.arange(H, device=dev, dtype=dt)[:, None]
    xx = torch.arange(W, device=dev, dtype=dt)[None, :]
    gy, gx = g[0, 0].reshape(-1)[cell], g[0, 1].reshape(-1)[cell]
    at_centre = psi[0, 0] - gy * (yy - cy) - gx * (xx - cx)
    v = valid[0, 0]
    med, has = _segment_median(at_centre[v], cell[v], h * w)
    if not bool(has.all()):
        # an empty cell takes the nearest valid cell's plane, evaluated at its own centre
        ccy = lr_centres(h, H, dev, dt)[:, None].expand(h, w)
        ccx = lr_centres(w, W, dev, dt)[None, :].expand(h, w)
        stack = torch.stack([med.reshape(h, w), g[0, 0], g[0, 1], ccy, ccx])[None]
        filled = fill_nearest(stack, has.reshape(1, 1, h, w))[0]
        med = (filled[0] + filled[1] * (ccy - filled[3]) + filled[2] * (ccx - filled[4])).reshape(-1)
        g = filled[None, 1:3]
    return med.reshape(1, 1, h, w), g


def _depth_inputs(lifted: LiftedKernel, depth_model: str, bin_depths: torch.Tensor, dtype) -> _DepthInputs:
    """The depth term's inputs for ``depth_model`` (see the module docstring)."""
    k = lifted.kernel
    params = k.params.to(dtype)
    phi_bins = lifted.depth_feature(bin_depths).to(dtype)
    if depth_model == "constant":
        return _DepthInputs(params, k.guide_lr[:, -1:].to(dtype), None, phi_bins)
    if depth_model == "planar":
        return _DepthInputs(params, k.guide_lr[:, -1:].to(dtype), lifted.depth_lr_grad.to(dtype), phi_bins)
    # "plane": psi = z_ref / z, linear in pixel coordinates on any 3D plane
    v = lifted.depth_valid
    z = lifted.depth.to(torch.float64)
    z_ref = float(z[v].median())
    psi_hr = torch.where(v, z_ref / z.clamp_min(1e-300), torch.zeros((), dtype=z.dtype, device=z.device))
    psi_lr, slopes = _plane_fit(psi_hr, v, lifted.lr_size)
    # the fitted depth scale, converted to psi units at the cell's depth (first order): a
    # log-depth width s (relative mode) is a psi width s psi; a metric width s is s psi^2 / z_ref
    lsz = decode_params(k.params[:1].to(torch.float64)).log_sigma_r[:, -1:]  # [1, 1, h, w]
    s = lsz.exp() * lifted.depth_spread
    centre = psi_lr.clamp_min(1e-12)
    s_psi = s * centre if lifted.depth_mode == "relative" else s * centre.square() / z_ref
    params = params.clone()
    params[:, -1:] = s_psi.clamp_min(1e-300).log().to(dtype)
    psi_bins = (z_ref / bin_depths.to(torch.float64)).to(dtype)
    return _DepthInputs(params, psi_lr.to(dtype), slopes.to(dtype), psi_bins)


def _cell_terms(lifted: LiftedKernel, di: _DepthInputs, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per-LR-cell quantities ``[Q]`` of the depth term: centre, precision, slope and HR centre."""
    k = lifted.kernel
    h, w = lifted.lr_size
    H, W = lifted.out_size
    lsz = decode_params(di.params[:1]).log_sigma_r[0, -1].reshape(-1).to(dtype)  # the depth group
    ok = k.valid_lr[0, -1].reshape(-1)
    terms = {
        "phi": di.phi_lr[0, 0].reshape(-1).to(dtype),
        "prec": torch.where(ok, 0.5 * torch.exp(-2 * lsz), torch.zeros((), dtype=dtype, device=lsz.device)),
    }
    if di.slopes is not None:
        dev = lsz.device
        terms["gy"] = di.slopes[0, 0].reshape(-1).to(dtype)
        terms["gx"] = di.slopes[0, 1].reshape(-1).to(dtype)
        terms["cy"] = lr_centres(h, H, dev, dtype)[:, None].expand(h, w).reshape(-1)
        terms["cx"] = lr_centres(w, W, dev, dtype)[None, :].expand(h, w).reshape(-1)
    return terms


def _colour_terms(lifted: LiftedKernel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per-LR-cell quantities ``[Q]`` of the spatial and colour terms (see :func:`pair_logits`)."""
    k = lifted.kernel
    h, w = lifted.lr_size
    H, W = lifted.out_size
    d = decode_params(k.params[:1].to(dtype))  # [1, ...] maps
    th = d.theta[0].reshape(-1)
    dev = th.device
    return {
        "cos": torch.cos(th),
        "sin": torch.sin(th),
        "px": 0.5 * torch.exp(-2 * d.log_sigma_x[0].reshape(-1)),
        "py": 0.5 * torch.exp(-2 * d.log_sigma_y[0].reshape(-1)),
        "pr": 0.5 * torch.exp(-2 * d.log_sigma_r[0, 0].reshape(-1)),
        "cy": lr_centres(h, H, dev, dtype)[:, None].expand(h, w).reshape(-1),
        "cx": lr_centres(w, W, dev, dtype)[None, :].expand(h, w).reshape(-1),
        "g": k.guide_lr[0, :-1].reshape(k.guide_lr.shape[1] - 1, -1).to(dtype),  # [Cc, Q]
    }


def _block_base(
    ct: dict, g_hr: torch.Tensor, yy: torch.Tensor, xx: torch.Tensor, nb: torch.Tensor
) -> torch.Tensor:
    """Spatial + colour log-weights ``[R, nx, K]`` of a block of pixels and its neighbours ``nb [K]``.

    :func:`ua3d.core.kernel.spatial_colour_logits` (as :func:`ua3d.core.kernel.pair_logits`) for one
    range group, with the neighbour parameters gathered once per block. ``g_hr [Cc, R, nx]``,
    ``yy [R]``, ``xx [nx]``.
    """
    dy = (yy[:, None] - ct["cy"][nb])[:, None, :]  # [R, 1, K]
    dx = (xx[:, None] - ct["cx"][nb])[None, :, :]  # [1, nx, K]
    diff = g_hr.new_zeros(g_hr.shape[1], g_hr.shape[2], nb.numel())
    for ch in range(g_hr.shape[0]):
        diff.add_((g_hr[ch][:, :, None] - ct["g"][ch, nb]).square_())
    terms = ct["cos"][nb], ct["sin"][nb], ct["px"][nb], ct["py"][nb]
    return spatial_colour_logits(dx, dy, *terms, [(diff, ct["pr"][nb], None)])


def _band_start(lifted: LiftedKernel, bin_depths, spacing: str, band: int | None) -> tuple[torch.Tensor, int]:
    """First computed bin per pixel ``[H, W]`` int64 and the number of computed bins ``Db``."""
    H, W = lifted.out_size
    D = bin_depths.numel()
    dev = lifted.params.device
    if band is None or 2 * band + 1 >= D:
        return torch.zeros(H, W, dtype=torch.int64, device=dev), D
    n = 2 * band + 1
    z = lifted.depth[0, 0]
    if not bool(lifted.depth_valid.all()):
        z = torch.where(lifted.depth_valid[0, 0], z, lifted.render_depth()[0, 0].to(z.dtype))
    centre = depth_to_bin(z, bin_depths, spacing)
    centre = torch.where(centre < 0, torch.zeros_like(centre), centre)
    return (centre - band).clamp(0, D - n), n


def _allocate(shape, out_dtype: torch.dtype, out: Path | None, zero: bool, device):
    """The volume tensor and, for a file output, the numpy memmap behind it (else None)."""
    if out is None:
        return (torch.zeros if zero else torch.empty)(shape, dtype=out_dtype, device=device), None
    if torch.device(device).type != "cpu":
        raise ValueError(f"out (a memmap) needs a CPU kernel, got device {device}")
    np_dtype = torch.empty((), dtype=out_dtype).numpy().dtype
    mm = np.lib.format.open_memmap(out, mode="w+", dtype=np_dtype, shape=tuple(shape))  # zero-filled
    return torch.from_numpy(mm), mm


def render_volume(
    lifted: LiftedKernel,
    features: Any,
    bins: int = 64,
    near: float | None = None,
    far: float | None = None,
    spacing: str = "uniform",
    band: int | None = None,
    out: str | Path | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    depth_model: str = "plane",
    mass_mode: str = "normalized",
    channel_chunk: int | None = None,
    budget_bytes: int = _DEFAULT_BUDGET,
    verbose: bool = False,
    progress: Any = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render LR features into a dense feature volume over depth bins.

    Parameters
    ----------
    lifted : a fitted :class:`~ua3d.rgbd.lift.LiftedKernel` (one frame).
    features : ``[1, C, h, w]`` or ``[C, h, w]`` on the kernel's LR grid, finite.
    bins : number of depth bins ``D``.
    near, far : metres; default: the 1st / 99th percentile of the valid observed depth.
    spacing : ``"uniform"`` in depth or ``"inverse"`` (uniform in 1/z).
    band : keep only ``2 band + 1`` bins around each pixel's depth bin (others: volume 0, mass 0).
    out : path of a ``.npy`` file to write the volume to as a memmap (the returned tensor shares it).
    out_dtype : volume dtype (default: the features' floating dtype; ``torch.float16`` halves it).
    depth_model : ``"plane"`` (default: per-cell 3D planes, exact on planar surfaces), ``"planar"``
        (per-cell planes in the fit's depth feature) or ``"constant"`` (the fitted kernel exactly); see
        the module docstring.
    mass_mode : ``"normalized"`` (per-pixel distribution over bins, default) or ``"raw"`` (weight sums).
    channel_chunk : channels rendered per pass (default: all, capped at 64).
    budget_bytes : size of the streaming buffers (default 256 MiB).
    verbose : print the memory estimate before allocating.
    progress : optional ``progress(rows_done, rows_total)`` called as HR rows are finished (progress bars).
    backend : ``"auto"`` (the fused CPU engine :func:`ua3d.core.fast_volume.kernel_render_volume` for CPU
        kernels when numba imports, else the tensor reference, e.g. for CUDA), ``"fast"`` or ``"reference"``.

    Returns
    -------
    volume : ``[C, D, H, W]`` in ``out_dtype`` (memmap-backed when ``out`` is given)
    mass : ``[D, H, W]`` float32
    bin_depths : ``[D]`` float64 metres

    Raises
    ------
    ValueError
        bad features, bins, near/far, spacing, band or mass_mode; or the output does not fit.
    """
    if not isinstance(lifted, LiftedKernel):
        raise ValueError(f"lifted must be a LiftedKernel, got {type(lifted).__name__}")
    f = lifted.check_features(features)
    if not bool(torch.isfinite(f).all()):
        raise ValueError(f"features contain NaN/Inf (shape {tuple(f.shape)})")
    if depth_model not in DEPTH_MODELS:
        raise ValueError(f"depth_model must be one of {DEPTH_MODELS}, got {depth_model!r}")
    if mass_mode not in MASS_MODES:
        raise ValueError(f"mass_mode must be one of {MASS_MODES}, got {mass_mode!r}")
    if band is not None and (isinstance(band, bool) or not isinstance(band, (int, np.integer)) or band < 0):
        raise ValueError(f"band must be None or an integer >= 0, got {band!r}")
    if near is None or far is None:
        zv = lifted.depth[lifted.depth_valid].to(torch.float64)
        q = torch.quantile(zv[:: max(1, zv.numel() // 1_000_000)], torch.tensor([0.01, 0.99], dtype=zv.dtype))
        near = float(q[0]) if near is None else near
        far = float(q[1]) if far is None else far
    _check_bins(bins, near, far, spacing)
    out_path = None if out is None else Path(out)
    if out_path is not None and out_path.suffix != ".npy":
        raise ValueError(f"out must be a path ending in .npy, got {str(out)!r}")
    work = lifted.params.dtype
    out_dtype = out_dtype or f.dtype
    which = _engine(backend, lifted.params.device, out_dtype)
    C = f.shape[1]
    H, W = lifted.out_size
    D = int(bins)
    est = estimate_volume_bytes(
        C,
        D,
        (H, W),
        out_dtype,
        band=band,
        radius=lifted.kernel.radius,
        lr_size=lifted.lr_size,
        work_dtype=work,
        channel_chunk=channel_chunk,
        budget_bytes=budget_bytes,
        on_disk=out_path is not None,
        backend=which,
    )
    if verbose:
        print(f"render_volume: C={C} D={D} H={H} W={W}: {est}")
    _check_fits(est, out_path, lifted.params.device)

    dev = lifted.params.device
    bin_depths = make_bin_depths(near, far, D, spacing, device=dev)
    di = _depth_inputs(lifted, depth_model, bin_depths, work)
    terms = _cell_terms(lifted, di, work)
    phi_bins = di.phi_bins  # [D]
    d0, n_bins = _band_start(lifted, bin_depths, spacing, band)
    volume, mm = _allocate((C, D, H, W), out_dtype, out_path, n_bins < D, dev)
    log_mass = torch.full((D, H, W), float("-inf"), dtype=torch.float32, device=dev)
    if which == "fast":
        from ua3d.core.fast_volume import kernel_render_volume

        k = lifted.kernel
        kernel_render_volume(
            di.params,
            k.guide_hr,
            torch.cat([k.guide_lr[:, :-1].to(work), di.phi_lr], 1),
            k.valid_lr,
            f.to(work),
            k.radius,
            di.slopes,
            phi_bins,
            d0,
            n_bins,
            volume if mm is None else mm,
            log_mass,
            budget_bytes=budget_bytes,
            progress=progress,
        )
    else:
        _stream_reference(
            lifted, f.to(device=dev, dtype=work), terms, phi_bins, d0, n_bins, est, volume, log_mass, progress
        )
    if mm is not None:
        mm.flush()
    if mass_mode == "normalized":
        mass = torch.softmax(log_mass, dim=0)
    else:
        mass = log_mass.exp()
    return volume, mass, bin_depths


def _anchor_runs(n_hr: int, n_lr: int, device) -> list[tuple[int, int, int]]:
    """``(start, stop, anchor)`` runs of consecutive HR indices that share a nearest LR anchor."""
    a = nearest_anchor(n_hr, n_lr, device).tolist()
    runs, s = [], 0
    for i in range(1, n_hr + 1):
        if i == n_hr or a[i] != a[s]:
            runs.append((s, i, a[s]))
            s = i
    return runs


def _block_weights(base, centre, prec, phi_b):
    """Normalised weights ``[Db, R, nx, K]`` and log-mass ``[Db, R, nx]`` of one block (in place where possible).

    ``base [R, nx, K]`` spatial + colour logits, ``centre [R, nx, K]`` depth-feature centre of each
    neighbour as seen from each pixel, ``prec [K]`` ``1 / (2 sigma_z^2)`` (0 where the cell has no
    depth), ``phi_b [Db, R, nx]`` bin depth features. Logits more than ``-_EXP_FLOOR`` below a
    pixel's maximum are clamped there before ``exp`` (weights below ``e^-80`` of the largest one;
    this keeps ``exp`` off its slow path for huge negative arguments).
    """
    lg = phi_b[..., None] - centre  # [Db, R, nx, K]
    lg.square_()
    lg = torch.addcmul(base, lg, prec, value=-1.0)
    mx = lg.amax(dim=-1, keepdim=True)
    lg.sub_(mx).clamp_(min=_EXP_FLOOR).exp_()
    tot = lg.sum(dim=-1, keepdim=True)
    lg.div_(tot)
    return lg, (mx + tot.log()).squeeze(-1)


def _stream_reference(
    lifted, f, terms, phi_bins, d0, n_bins, est: VolumeEstimate, volume, log_mass, progress=None
) -> None:
    """Fill ``volume [C, D, H, W]`` and ``log_mass [D, H, W]``.

    Rows are processed in chunks inside one LR anchor row; inside a chunk the pixels of one anchor
    column (a *block*) share their neighbour set (cells outside the grid dropped), so the block's
    features ``[C, K]`` meet its weights ``[K, Db * n]`` in one matrix product whose result is
    already in the volume's ``[C, D, rows, columns]`` order.
    """
    k = lifted.kernel
    g_hr = k.guide_hr[0, :-1].to(f.dtype)  # [Cc, H, W] colour
    ct = _colour_terms(lifted, f.dtype)
    offs = window_offsets(k.radius, f.device)
    C = f.shape[1]
    H, W = lifted.out_size
    h, w = lifted.lr_size
    dev, dt = f.device, f.dtype
    fq = f[0].reshape(C, -1)  # [C, Q]
    steps = torch.arange(n_bins, device=dev)
    col_runs = _anchor_runs(W, w, dev)
    planar = "gy" in terms
    full = n_bins == volume.shape[1]
    for ys, ye, i in _anchor_runs(H, h, dev):
        ny = i + offs[:, 0]
        for y0 in range(ys, ye, est.rows_per_chunk):
            y1 = min(ye, y0 + est.rows_per_chunk)
            R = y1 - y0
            yy = torch.arange(y0, y1, device=dev, dtype=dt)
            dd = d0[None, y0:y1, :] + steps[:, None, None]  # [Db, R, W] bin indices
            if not full:
                yi = torch.arange(y0, y1, device=dev)[None, :, None].expand_as(dd)
                xi = torch.arange(W, device=dev)[None, None, :].expand_as(dd)
            for xs, xe, j in col_runs:
                nxc = j + offs[:, 1]
                keep = (ny >= 0) & (ny < h) & (nxc >= 0) & (nxc < w)
                nb = ny[keep] * w + nxc[keep]  # [K] the block's neighbours inside the grid
                nx, K = xe - xs, nb.numel()
                xx = torch.arange(xs, xe, device=dev, dtype=dt)
                base = _block_base(ct, g_hr[:, y0:y1, xs:xe], yy, xx, nb)
                centre = terms["phi"][nb].expand(R, nx, K)
                if planar:
                    oy = (yy[:, None] - terms["cy"][nb])[:, None, :]  # [R, 1, K]
                    ox = (xx[:, None] - terms["cx"][nb])[None, :, :]  # [1, nx, K]
                    centre = centre + terms["gy"][nb] * oy + terms["gx"][nb] * ox
                wts, lse = _block_weights(base, centre, terms["prec"][nb], phi_bins[dd[:, :, xs:xe]])
                wt = wts.reshape(n_bins * R * nx, K).T  # [K, Db * R * nx]
                if full:
                    log_mass[:, y0:y1, xs:xe] = lse.to(log_mass.dtype)
                else:
                    sel = (dd[:, :, xs:xe], yi[:, :, xs:xe], xi[:, :, xs:xe])
                    log_mass[sel] = lse.to(log_mass.dtype)
                for c0 in range(0, C, est.channel_chunk):
                    c1 = min(C, c0 + est.channel_chunk)
                    o = (
                        (fq[c0:c1, nb] @ wt).reshape(c1 - c0, n_bins, R, nx).to(volume.dtype)
                    )  # [Cc, Db, R, nx]
                    if full:
                        volume[c0:c1, :, y0:y1, xs:xe] = o
                    else:
                        volume[(slice(c0, c1), *sel)] = o
        if progress is not None:
            progress(ye, H)
