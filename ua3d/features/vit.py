"""A small, plain-PyTorch Vision Transformer that loads the official DINOv2 checkpoints.

Why our own: ``timm`` imports ``torchvision``, which cannot always be installed beside a given
torch build, and ``torch.hub`` would fetch code from the network. This module needs torch only.

Architecture (the DINOv2 release: ``dinov2_vits14_pretrain.pth`` and friends)
------------------------------------------------------------------------------
* ``patch_embed.proj``: ``Conv2d(3, D, kernel=p, stride=p)``, tokens in row-major order.
* ``cls_token [1, 1, D]``, learned ``pos_embed [1, 1 + M*M, D]`` (``M = img_size / p``, 37 for
  the released 518-pixel models) added to ``[cls, patches]``; the patch part is resized with
  bicubic interpolation to any patch grid exactly as the DINOv2 code does (``interpolate_offset``
  and ``interpolate_antialias`` below).
* optional ``register_tokens [1, R, D]`` inserted after the cls token (after the positional
  embedding, so they have none).
* ``blocks.{i}``: pre-norm ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))`` with
  ``attn.qkv``/``attn.proj`` (fused qkv, ``F.scaled_dot_product_attention``), ``mlp.fc1``/``mlp.fc2``
  (exact GELU, ratio 4), LayerScale ``ls1.gamma``/``ls2.gamma``; LayerNorm eps ``1e-6``.
* final ``norm``; ``mask_token [1, D]`` (used only by DINOv2's masked training, kept so that the
  official file loads strictly; it does not affect :meth:`VisionTransformer.forward_features`).

State-dict namings
------------------
``"dinov2"`` (the official release, what :class:`VisionTransformer` uses) and ``"timm"``
(``vit_*_patch14_dinov2`` / ``vit_*_patch14_reg4_dinov2`` in ``timm``): the same tensors except
that timm has no ``mask_token``, calls the registers ``reg_token`` and, for the register models,
folds the cls position into ``cls_token`` and stores ``pos_embed`` without the cls entry.
:func:`timm_to_dinov2` and :func:`dinov2_to_timm` convert exactly both ways.

Shapes of ``vits14`` (D=384, 12 blocks, 6 heads, p=14, M=37)
-------------------------------------------------------------
``cls_token [1,1,384]``, ``pos_embed [1,1370,384]``, ``mask_token [1,384]``,
``patch_embed.proj.weight [384,3,14,14]``, ``.bias [384]``; per block: ``norm1.weight/bias [384]``,
``attn.qkv.weight [1152,384]``, ``attn.qkv.bias [1152]``, ``attn.proj.weight [384,384]``,
``attn.proj.bias [384]``, ``ls1.gamma [384]``, ``norm2.weight/bias [384]``,
``mlp.fc1.weight [1536,384]``, ``mlp.fc1.bias [1536]``, ``mlp.fc2.weight [384,1536]``,
``mlp.fc2.bias [384]``, ``ls2.gamma [384]``; ``norm.weight/bias [384]``. 175 tensors,
22,056,576 parameters with the mask token, 22,056,192 without (the DINOv2 paper rounds it to 21 M).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CONFIGS",
    "ViTConfig",
    "VisionTransformer",
    "detect_naming",
    "dinov2_to_timm",
    "timm_to_dinov2",
]


@dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of :class:`VisionTransformer`.

    Attributes
    ----------
    embed_dim, depth, num_heads : token width D, number of blocks, attention heads.
    patch_size : p, the stride of the patch grid in pixels.
    img_size : training resolution; ``pos_embed`` holds ``(img_size // p) ** 2`` patch positions.
    mlp_ratio : hidden width of the MLP over D.
    num_register_tokens : R extra learned tokens (DINOv2 "with registers": 4).
    layerscale : whether blocks have LayerScale (``ls1.gamma``, ``ls2.gamma``).
    interpolate_offset, interpolate_antialias : how ``pos_embed`` is resized to another grid,
        as in DINOv2 (0.1 / False for the original models, 0.0 / True for the register models).
    """

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 14
    img_size: int = 518
    mlp_ratio: float = 4.0
    num_register_tokens: int = 0
    layerscale: bool = True
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False

    def __post_init__(self) -> None:
        for name in ("embed_dim", "num_heads", "patch_size", "img_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ViTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.depth < 0 or self.num_register_tokens < 0:
            raise ValueError(f"ViTConfig depth and num_register_tokens must be >= 0, got {self}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"ViTConfig.embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.img_size < self.patch_size:
            raise ValueError(
                f"ViTConfig.img_size {self.img_size} is smaller than patch_size {self.patch_size}"
            )

    @property
    def pos_grid(self) -> int:
        """M, the side of the square grid of positions in ``pos_embed``."""
        return self.img_size // self.patch_size


_REG = {"num_register_tokens": 4, "interpolate_offset": 0.0, "interpolate_antialias": True}

#: Architectures: the two released DINOv2 sizes (with and without registers) and a tiny test model.
CONFIGS: dict[str, ViTConfig] = {
    "vits14": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vitb14": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vits14_reg": ViTConfig(embed_dim=384, depth=12, num_heads=6, **_REG),
    "vitb14_reg": ViTConfig(embed_dim=768, depth=12, num_heads=12, **_REG),
    "tiny": ViTConfig(embed_dim=32, depth=2, num_heads=2, img_size=56),  # tests only: 4 x 4 positions
}


class PatchEmbed(nn.Module):
    """``[B, 3, H, W] -> [B, (H/p)*(W/p), D]`` tokens in row-major grid order."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection: ``[B, N, D] -> [B, N, D]``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, heads, N, D/heads]
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2``: ``[B, N, D] -> [B, N, D]``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel scale ``gamma [D]`` (initialised to 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, cfg.num_heads)
        self.ls1 = LayerScale(dim) if cfg.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.ls2 = LayerScale(dim) if cfg.layerscale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """DINOv2-style ViT with the official state-dict keys (see the module docstring).

    Parameters
    ----------
    config : a :class:`ViTConfig`, or a name in :data:`CONFIGS` (``"vits14"``, ``"vitb14"``,
        ``"vits14_reg"``, ``"vitb14_reg"``, ``"tiny"``).

    Weights are initialised randomly (truncated normal, std 0.02, as in DINOv2); load real
    weights with ``load_state_dict`` (convert timm-named ones with :func:`timm_to_dinov2`).
    """

    def __init__(self, config: ViTConfig | str) -> None:
        super().__init__()
        if isinstance(config, str):
            if config not in CONFIGS:
                raise ValueError(f"unknown ViT config {config!r}; choose one of {sorted(CONFIGS)}")
            config = CONFIGS[config]
        self.config = cfg = config
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid**2, dim))
        if cfg.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, dim))
        else:
            self.register_tokens = None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.reset_parameters()

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: the cls token and the registers."""
        return 1 + self.config.num_register_tokens

    def reset_parameters(self) -> None:
        """Random initialisation: linear layers and ``pos_embed`` N(0, 0.02) truncated, tokens ~1e-6."""
        if self.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """Positional embedding for a ``grid = (h, w)`` of patches: ``[1, 1 + h*w, D]``.

        The stored ``M x M`` patch positions are resized bicubically, as the DINOv2 code does:
        with ``interpolate_offset > 0`` through ``scale_factor = (h + offset) / M`` (the original
        models), otherwise to ``size = (h, w)``, with antialiasing when ``interpolate_antialias``.
        """
        h, w = grid
        M = self.config.pos_grid
        pos = self.pos_embed
        if (h, w) == (M, M):
            return pos
        dim = pos.shape[-1]
        patch_pos = pos[:, 1:].float().reshape(1, M, M, dim).permute(0, 3, 1, 2)
        off = self.config.interpolate_offset
        if off:
            kw = {"scale_factor": ((h + off) / M, (w + off) / M)}
        else:
            kw = {"size": (h, w)}
        patch_pos = F.interpolate(
            patch_pos, mode="bicubic", antialias=self.config.interpolate_antialias, **kw
        )
        if tuple(patch_pos.shape[-2:]) != (h, w):  # pragma: no cover - guarded by the offset < 1
            raise RuntimeError(f"pos_embed resized to {tuple(patch_pos.shape[-2:])}, expected {(h, w)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, dim)
        return torch.cat([pos[:, :1], patch_pos.to(pos.dtype)], dim=1)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All normalised output tokens ``[B, 1 + R + h*w, D]`` for images ``x [B, 3, H, W]``.

        ``H`` and ``W`` must be multiples of the patch size (``h = H / p``, ``w = W / p``).
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be [B, 3, H, W], got shape {tuple(x.shape)}")
        p = self.patch_size
        H, W = x.shape[-2:]
        if H % p or W % p or H == 0 or W == 0:
            raise ValueError(f"image size {(H, W)} must be a positive multiple of the patch size {p}")
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_embed((H // p, W // p))
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(x.shape[0], -1, -1)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Patch-token feature grid ``[B, D, H/p, W/p]`` for images ``x [B, 3, H, W]``.

        The cls and register tokens are dropped after the final norm, and the patch tokens
        (row-major) are reshaped to the grid: output cell ``(i, j)`` is the token of the patch
        covering pixels ``[i*p, (i+1)*p) x [j*p, (j+1)*p)``.
        """
        tokens = self.forward_tokens(x)[:, self.num_prefix_tokens :]
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    forward = forward_features


# --------------------------------------------------------------------------- key namings
def detect_naming(state_dict: dict[str, torch.Tensor]) -> str:
    """``"dinov2"`` (has ``mask_token`` or ``register_tokens``) or ``"timm"``."""
    return "dinov2" if ("mask_token" in state_dict or "register_tokens" in state_dict) else "timm"


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def timm_to_dinov2(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a timm ``vit_*_dinov2`` state dict to the official DINOv2 naming (new dict).

    * ``reg_token`` -> ``register_tokens``;
    * a ``pos_embed`` without the cls entry (``M*M`` rows, timm's register models) gets a zero
      cls row: timm already added that position to ``cls_token``, so the result is exact;
    * ``mask_token`` (absent in timm) is added as zeros; it does not affect the features.
    """
    out = dict(state_dict)
    if "reg_token" in out:
        out["register_tokens"] = out.pop("reg_token")
    pos = out.get("pos_embed")
    if pos is not None and _is_square(pos.shape[1]):
        out["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
    if "mask_token" not in out and "cls_token" in out:
        out["mask_token"] = out["cls_token"].new_zeros(1, out["cls_token"].shape[-1])
    return out


def dinov2_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an official DINOv2 state dict to timm's naming (new dict), as timm does on load.

    Drops ``mask_token``; for register models renames ``register_tokens`` -> ``reg_token``, adds the
    cls position to ``cls_token`` and removes it from ``pos_embed``.
    """
    out = dict(state_dict)
    out.pop("mask_token", None)
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out
