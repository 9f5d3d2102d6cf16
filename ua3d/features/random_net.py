"""Stand-in "features" for demos without weights: a tiny fixed-seed random conv net.

These are honest but meaningless: the net is never trained, so its channels are random
non-linear mixtures of local colour and edge statistics. They are smooth where the image is
smooth and change at image edges, which is enough to *show* guided upsampling at work, but they
carry no semantics and must never be reported as foundation-model features. The returned
``description`` says so, for the demo's output.

Net: ImageNet-normalised RGB -> 3x3 conv (3 -> C) -> GELU -> 3x3 conv with dilation 2
(C -> C) -> GELU -> average pooling onto the ``(round(H/stride), round(W/stride))`` grid ->
per-channel standardisation over the grid. Weights are drawn from ``N(0, 1/fan_in)`` with a
private ``torch.Generator(seed)``, so the output depends on ``seed`` only, never on the global RNG.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .image import as_image_tensor, normalize_image

__all__ = ["random_features"]


def _weights(channels: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Conv weights and biases of the two layers, drawn on the CPU from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for c_in in (3, channels):
        fan_in = c_in * 9
        w = torch.randn(channels, c_in, 3, 3, generator=g) / fan_in**0.5
        b = 0.1 * torch.randn(channels, generator=g)
        out.append((w, b))
    return out


def random_features(
    image: object,
    stride: int = 16,
    channels: int = 32,
    seed: int = 0,
    *,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, str]:
    """Meaningless but deterministic low-resolution "features" of an RGB image.

    Parameters
    ----------
    image : ``[H, W, 3]`` numpy array or tensor, uint8 or float in [0, 1].
    stride : HR pixels per feature cell; the grid is ``(max(1, round(H/stride)), max(1, round(W/stride)))``.
    channels : C, the number of feature channels.
    seed : seed of the random weights.
    device : where to compute (default: the image tensor's device, else the CPU).

    Returns
    -------
    features : float32 ``[1, C, h, w]``, each channel with zero mean and unit std over the grid.
    description : a sentence labelling them as random-net features (for summaries and plots).
    """
    for name, v in (("stride", stride), ("channels", channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if device is None:
        device = image.device if isinstance(image, torch.Tensor) else "cpu"
    x = as_image_tensor(image, device)
    H, W = x.shape[-2:]
    x = normalize_image(x)
    (w1, b1), (w2, b2) = [(w.to(x.device), b.to(x.device)) for w, b in _weights(channels, seed)]
    with torch.no_grad():
        y = F.gelu(F.conv2d(x, w1, b1, padding=1))
        y = F.gelu(F.conv2d(y, w2, b2, padding=2, dilation=2))
        grid = (max(1, round(H / stride)), max(1, round(W / stride)))
        y = F.adaptive_avg_pool2d(y, grid)
        y = (y - y.mean(dim=(2, 3), keepdim=True)) / y.std(
            dim=(2, 3), keepdim=True, unbiased=False
        ).clamp_min(1e-6)
    description = (
        f"RANDOM features (not a trained model): a fixed-seed (seed={seed}) 2-layer random conv net, "
        f"{channels} channels on a {grid[0]}x{grid[1]} grid (stride {stride}); they follow local colour "
        f"and edges but mean nothing semantically"
    )
    return y.contiguous(), description
