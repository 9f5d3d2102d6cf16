"""Loading AnyUp checkpoints (local files only; never a download)."""

from __future__ import annotations

from pathlib import Path

import torch

from ...features.backbones import load_state_dict_strict, read_state_dict
from .model import AnyUp

__all__ = ["load_anyup"]


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

    Raises
    ------
    FileNotFoundError
        No such file (the message says where the weights come from).
    ValueError
        An unreadable file or not a state dict (:func:`ua3d.features.backbones.read_state_dict`), or
        keys / shapes that do not match the architecture
        (:func:`ua3d.features.backbones.load_state_dict_strict`, which lists them).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"AnyUp checkpoint not found: {path} (ua3d never downloads weights; fetch anyup_paper.pth or "
            "anyup_multi_backbone.pth from the wimmerth/anyup releases yourself)"
        )
    state = read_state_dict(path)
    model = AnyUp(**kwargs)
    first = next(iter(state.values()), None)
    if first is not None:  # the checkpoint's dtype; an empty one fails the strict check below
        model = model.to(device=map_location, dtype=first.dtype)
    load_state_dict_strict(model, state, f"AnyUp checkpoint {path}")
    return model.eval()
