"""Features from real foundation models, from local weights only (never a download).

Model names for :func:`extract_features`
----------------------------------------
``dinov2_vits14``, ``dinov2_vitb14``, ``dinov2_vits14_reg``, ``dinov2_vitb14_reg``
    DINOv2 through ua3d's own ViT (:mod:`ua3d.features.vit`, torch only). Weights: the official
    file (e.g. ``dinov2_vits14_pretrain.pth``) or timm's copy (``model.safetensors``), either
    naming. ``dinov2_tiny`` is the tiny test architecture (no released weights).
``timm:<name>``
    Any ``timm`` model (ConvNeXt, CLIP-style ViT, ...) when ``timm`` imports. It is created with
    ``pretrained=False`` and its weights are read from the local checkpoint file, then passed
    through timm's own ``checkpoint_filter_fn`` for that architecture (as timm does when it
    loads ``pretrained_cfg['file']``) and loaded strictly.
``random``
    :func:`ua3d.features.random_net.random_features` (no weights; meaningless features).

Where weights are looked for, in order
--------------------------------------
1. ``checkpoint`` (``--checkpoint PATH``): must exist.
2. ``$UA3D_WEIGHTS_DIR/<file name>``.
3. torch's hub cache ``<torch.hub.get_dir()>/checkpoints/<file name>`` (where
   ``torch.hub.load("facebookresearch/dinov2", ...)`` or timm's URL downloads put them;
   ``$TORCH_HOME`` moves it).
4. the Hugging Face cache ``<$HF_HUB_CACHE or $HF_HOME/hub or ~/.cache/huggingface/hub>/
   models--timm--<name>/snapshots/*/model.safetensors`` (or ``pytorch_model.bin``).

Nothing is fetched: when none exists, :class:`CheckpointNotFoundError` says which file to get
and where to put it.

Preprocessing and the guide convention
--------------------------------------
The image (``[H, W, 3]`` uint8, or float in [0, 1]) is resized (bicubic, antialiased, clamped to
[0, 1]) to ``(H', W')``, each side a multiple of the model stride ``p`` (see
:func:`model_input_size`), then normalised with the model's mean/std (ImageNet's for DINOv2).
The features have the grid ``(h, w) = (H'/p, W'/p)``. **The guide for upsampling is the original
image**, not the resized one: the grid is mapped onto the full-resolution ``H x W`` image, cell
``(i, j)`` covering rows ``[i H/h, (i+1) H/h)`` and columns ``[j W/w, (j+1) W/w)`` (a per-axis
scale ``H/h``, ``W/w`` that need not be an integer; ``ua3d.fit`` accepts any ratio). This is the
same cell-centre mapping (``align_corners=False``) that the resize itself used, so no pixel of the
original is lost. ``info["scale"]`` holds ``(H/h, W/w)``.
"""

from __future__ import annotations

import glob
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .image import IMAGENET_MEAN, IMAGENET_STD, as_image_tensor, model_input_size, preprocess
from .random_net import random_features
from .vit import CONFIGS, VisionTransformer, ViTConfig, detect_naming, timm_to_dinov2

__all__ = [
    "DINOV2_MODELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_NAMES",
    "CheckpointNotFoundError",
    "DinoSpec",
    "as_image_tensor",
    "extract_features",
    "find_checkpoint",
    "load_dinov2",
    "load_state_dict_strict",
    "model_input_size",
    "preprocess",
    "read_state_dict",
]

_RELEASE_URL = "https://dl.fbaipublicfiles.com/dinov2"


class CheckpointNotFoundError(FileNotFoundError):
    """No local weights for a model; the message says how to obtain them."""


@dataclass(frozen=True)
class DinoSpec:
    """A DINOv2 model: its architecture, the official file name and timm's Hugging Face repo."""

    arch: str
    file: str
    hf_repo: str | None


DINOV2_MODELS: dict[str, DinoSpec] = {
    "dinov2_vits14": DinoSpec(
        "vits14", "dinov2_vits14_pretrain.pth", "timm/vit_small_patch14_dinov2.lvd142m"
    ),
    "dinov2_vitb14": DinoSpec("vitb14", "dinov2_vitb14_pretrain.pth", "timm/vit_base_patch14_dinov2.lvd142m"),
    "dinov2_vits14_reg": DinoSpec(
        "vits14_reg", "dinov2_vits14_reg4_pretrain.pth", "timm/vit_small_patch14_reg4_dinov2.lvd142m"
    ),
    "dinov2_vitb14_reg": DinoSpec(
        "vitb14_reg", "dinov2_vitb14_reg4_pretrain.pth", "timm/vit_base_patch14_reg4_dinov2.lvd142m"
    ),
    "dinov2_tiny": DinoSpec("tiny", "dinov2_tiny_pretrain.pth", None),  # test architecture
}
MODEL_NAMES = (*DINOV2_MODELS, "timm:<name>", "random")


# --------------------------------------------------------------------------- checkpoints
def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: ``.safetensors`` (needs the ``safetensors`` package) or a
    torch file (``.pth``, ``.pt``, ``.bin``, ... read with ``weights_only=True``). A top-level
    ``"state_dict"`` or ``"model"`` entry holding the tensors is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise ValueError(
                    f"{path}: reading .safetensors needs the 'safetensors' package (pip install safetensors)"
                ) from None
            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ValueError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # noqa: BLE001 - pickle.UnpicklingError, safetensors' own error, ...
        raise ValueError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a state dict of tensors (found {type(sd).__name__})")
    return sd


def _key_list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, assign: bool = False
) -> None:
    """``model.load_state_dict(state_dict, strict=True, assign=assign)`` with one readable error.

    ``assign=True`` makes the model's parameters *be* the checkpoint tensors (for a model built
    on the ``meta`` device, which skips the random initialisation).

    Raises
    ------
    ValueError
        Listing the missing keys, the unexpected keys and the shape mismatches (``source``
        names the checkpoint in the message).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_key_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_key_list(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {_key_list(shapes, 4)}")
    if problems:
        raise ValueError(
            f"{source}: the checkpoint does not match the {type(model).__name__}; " + "; ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True, assign=assign)


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "huggingface" / "hub"


def _candidates(file_name: str | None, hf_repo: str | None) -> list[str]:
    """Places (files or glob patterns) where a local copy of the weights may lie, in order."""
    places = []
    if file_name:
        if os.environ.get("UA3D_WEIGHTS_DIR"):
            places.append(str(Path(os.environ["UA3D_WEIGHTS_DIR"]) / file_name))
        places.append(str(Path(torch.hub.get_dir()) / "checkpoints" / file_name))
    if hf_repo:
        snap = _hf_cache_dir() / ("models--" + hf_repo.replace("/", "--")) / "snapshots" / "*"
        places += [str(snap / "model.safetensors"), str(snap / "pytorch_model.bin")]
    return places


def find_checkpoint(
    checkpoint: str | os.PathLike | None, file_name: str | None, hf_repo: str | None, how_to: str
) -> Path:
    """The explicit ``checkpoint`` if given (it must exist), else the first local copy found.

    Raises
    ------
    CheckpointNotFoundError
        With ``how_to`` and the places searched.
    """
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if path.is_file():
            return path
        state = "is not a file" if path.exists() else "does not exist"
        raise CheckpointNotFoundError(f"checkpoint {str(path)!r} {state}. {how_to}")
    places = _candidates(file_name, hf_repo)
    for place in places:
        found = sorted(glob.glob(place))
        if found:
            return Path(found[-1])
    raise CheckpointNotFoundError(
        f"{how_to} Searched: {'; '.join(places) or 'nowhere (no file name known)'}."
    )


def _dinov2_how_to(name: str, spec: DinoSpec) -> str:
    where = Path(torch.hub.get_dir()) / "checkpoints"
    if spec.hf_repo is None:
        return (
            f"No weights for {name} (a test architecture with no released weights): pass a checkpoint "
            f"with --checkpoint PATH (checkpoint=... in Python)."
        )
    folder = spec.file.removesuffix("_pretrain.pth")
    return (
        f"No local weights for {name}; ua3d never downloads. Get the official file {spec.file} from the "
        f"DINOv2 release ({_RELEASE_URL}/{folder}/{spec.file}) on a machine with network access, then "
        f"pass it with --checkpoint PATH (checkpoint=... in Python), or put it in {where} (torch's hub "
        f"cache) or in $UA3D_WEIGHTS_DIR. timm's copy (Hugging Face repo {spec.hf_repo}, "
        f"model.safetensors) works too."
    )


def load_dinov2(
    name: str, checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> tuple[VisionTransformer, dict]:
    """Build a DINOv2 model of :data:`DINOV2_MODELS` and load local weights strictly.

    Either key naming is accepted (``"dinov2"`` official or ``"timm"``); the positional grid of
    the model follows the checkpoint's ``pos_embed``. Returns the model (eval mode, on
    ``device``) and ``{"checkpoint": path, "key_naming": ..., "num_params": ...}``.
    """
    if name not in DINOV2_MODELS:
        raise ValueError(f"unknown DINOv2 model {name!r}; choose one of {sorted(DINOV2_MODELS)}")
    spec = DINOV2_MODELS[name]
    path = find_checkpoint(checkpoint, spec.file, spec.hf_repo, _dinov2_how_to(name, spec))
    raw = read_state_dict(path)
    naming = detect_naming(raw)
    sd = timm_to_dinov2(raw) if naming == "timm" else raw
    cfg: ViTConfig = CONFIGS[spec.arch]
    pos = sd.get("pos_embed")
    if (
        pos is not None
        and pos.ndim == 3
        and pos.shape[1] > 1
        and math.isqrt(pos.shape[1] - 1) ** 2 == pos.shape[1] - 1
    ):
        grid = math.isqrt(pos.shape[1] - 1)
        cfg = replace(cfg, img_size=grid * cfg.patch_size)
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model = VisionTransformer(cfg)
    sd = {k: v.to(torch.float32) for k, v in sd.items()}
    load_state_dict_strict(model, sd, f"{path} ({naming} naming) for {name}", assign=True)
    model = model.to(device).eval()
    n = sum(p.numel() for p in model.parameters())
    return model, {"checkpoint": str(path), "key_naming": naming, "num_params": n}


# --------------------------------------------------------------------------- timm
def _import_timm():
    try:
        import timm
    except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision failing inside timm's import
        raise ImportError(
            f"timm models need the optional package 'timm' (and torchvision), which cannot be imported "
            f"here ({type(exc).__name__}: {exc}); install them (pip install 'ua3d[models]' torchvision) or use "
            f"{', '.join(n for n in DINOV2_MODELS if n != 'dinov2_tiny')}, which ua3d runs with its own ViT"
        ) from None
    return timm


def _load_timm(name: str, checkpoint, device) -> tuple[nn.Module, dict]:
    timm = _import_timm()
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
    except TypeError:  # not a ViT: no dynamic_img_size argument
        model = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as exc:  # unknown model name
        raise ValueError(f"timm:{name}: {exc}") from None
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    url_file = Path(str(cfg.get("url") or "")).name or None
    how_to = (
        f"No local weights for timm:{name}; ua3d never downloads. Pass the model's weight file with "
        f"--checkpoint PATH (checkpoint=... in Python), e.g. model.safetensors from the Hugging Face "
        f"repo {cfg.get('hf_hub_id') or '(see timm)'}, or populate the Hugging Face / torch hub cache."
    )
    path = find_checkpoint(checkpoint, url_file, cfg.get("hf_hub_id"), how_to)
    sd = read_state_dict(path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    own = model.state_dict()
    classifier = cfg.get("classifier")
    for head in [classifier] if isinstance(classifier, str) else list(classifier or []):
        for k in (f"{head}.weight", f"{head}.bias"):  # num_classes=0: the checkpoint's head is unused
            if k in sd and k not in own:
                del sd[k]
    load_state_dict_strict(model, sd, f"{path} for timm:{name}")
    model = model.to(device).eval()
    info = {
        "checkpoint": str(path),
        "key_naming": "timm",
        "num_params": sum(p.numel() for p in model.parameters()),
    }
    return model, info


def _timm_stride(model: nn.Module) -> int:
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "patch_size", None) is not None:
        ps = pe.patch_size
        return int(ps[0] if isinstance(ps, (tuple, list)) else ps)
    info = getattr(model, "feature_info", None)
    if info:
        last = info[-1] if isinstance(info, list) else info.info[-1]
        return int(last["reduction"])
    return 32


def _timm_grid(model: nn.Module, out: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``forward_features`` output -> ``[1, C, h, w]`` (tokens or a channels-first/last map)."""
    h, w = grid
    if out.ndim == 3:  # tokens [B, N, C]: drop cls/register tokens
        n_prefix = out.shape[1] - h * w
        expected = getattr(model, "num_prefix_tokens", n_prefix)
        if n_prefix != expected or n_prefix < 0:
            raise ValueError(f"timm model returned {out.shape[1]} tokens, expected {expected} + {h}*{w}")
        return out[:, n_prefix:].transpose(1, 2).reshape(out.shape[0], -1, h, w)
    if out.ndim == 4:
        nf = getattr(model, "num_features", out.shape[1])
        if out.shape[1] != nf and out.shape[-1] == nf:  # channels-last models
            out = out.permute(0, 3, 1, 2)
        return out
    raise ValueError(f"unexpected timm forward_features output shape {tuple(out.shape)}")


# --------------------------------------------------------------------------- entry point
def extract_features(
    image: object,
    model_name: str,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    image_size: int | tuple[int, int] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Low-resolution features of an RGB image from a local foundation model.

    Parameters
    ----------
    image : ``[H, W, 3]`` numpy array or tensor, uint8 or float in [0, 1].
    model_name : ``dinov2_vits14``, ``dinov2_vitb14``, ``dinov2_vits14_reg``, ``dinov2_vitb14_reg``,
        ``timm:<name>`` or ``random`` (see the module docstring).
    checkpoint : local weight file; None searches the local caches (never the network).
    device : where the model runs.
    image_size : the model's input size (see :func:`model_input_size`); None keeps the image's
        resolution, rounded to the patch multiple.

    Returns
    -------
    features : float32 ``[1, C, h, w]`` on ``device``.
    info : dict with ``model``, ``checkpoint``, ``key_naming``, ``num_params``, ``stride``,
        ``image_size (H, W)``, ``input_size (H', W')``, ``grid (h, w)``, ``scale (H/h, W/w)``,
        ``mean``, ``std``, ``guide`` (the convention: the original image) and ``description``.

    Raises
    ------
    CheckpointNotFoundError
        No local weights (the message says how to get them).
    ImportError
        ``timm:`` model but ``timm`` does not import.
    ValueError
        Bad image, unknown model name, unreadable or mismatching checkpoint.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a valid torch device ({exc})") from None
    x = as_image_tensor(image, device)
    H, W = x.shape[-2:]
    if model_name == "random":
        feats, description = random_features(image, device=device)
        h, w = feats.shape[-2:]
        info = {
            "model": "random",
            "checkpoint": None,
            "key_naming": None,
            "num_params": 0,
            "stride": None,
            "input_size": (H, W),
            "mean": None,
            "std": None,
            "description": description,
        }
        return feats, _finish(info, (H, W), (h, w))
    if model_name in DINOV2_MODELS:
        model, info = load_dinov2(model_name, checkpoint, device)
        stride, mean, std = model.patch_size, IMAGENET_MEAN, IMAGENET_STD
        description = f"DINOv2 {DINOV2_MODELS[model_name].arch} patch tokens (after the final norm)"
    elif model_name.startswith("timm:") and len(model_name) > 5:
        model, info = _load_timm(model_name[5:], checkpoint, device)
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        stride = _timm_stride(model)
        mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        description = f"timm {model_name[5:]} forward_features (prefix tokens dropped)"
    else:
        raise ValueError(f"unknown model_name {model_name!r}; choose one of {MODEL_NAMES}")
    input_size = model_input_size((H, W), stride, image_size)
    grid = (input_size[0] // stride, input_size[1] // stride)
    with torch.no_grad():
        inp = preprocess(x, input_size, mean, std)
        out = model.forward_features(inp)
        feats = out if model_name in DINOV2_MODELS else _timm_grid(model, out, grid)
    feats = feats.float().contiguous()
    info.update(
        model=model_name, stride=stride, input_size=input_size, mean=mean, std=std, description=description
    )
    return feats, _finish(info, (H, W), tuple(feats.shape[-2:]))


def _finish(info: dict, size: tuple[int, int], grid: tuple[int, int]) -> dict:
    H, W = size
    h, w = grid
    info.update(
        image_size=(H, W),
        grid=(h, w),
        scale=(H / h, W / w),
        guide=(
            f"original image {H}x{W}: the {h}x{w} feature grid is mapped onto it, each cell covering "
            f"{H / h:.3g}x{W / w:.3g} pixels (cell centres at ((i+0.5)*H/h, (j+0.5)*W/w))"
        ),
    )
    return info
