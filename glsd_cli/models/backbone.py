"""A thin wrapper over timm backbones that exposes what the methods need.

- `forward(x)`: the CLS representation (last block, after the final norm) — what k-NN uses;
- `forward_tokens(x)`: CLS plus the patch tokens (after the final norm) and their grid;
- `forward_layers(x, layers)`: the CLS of several blocks, each through the shared final norm, and
  the final CLS/patch tokens — from one forward pass (timm's `forward_intermediates`).
Backbones without a CLS token (Swin) use the mean of their final tokens as the image representation.
"""
from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn

from glsd_cli.config import ModelConfig
from glsd_cli.errors import ConfigError


@dataclass
class TokenOutput:
    cls: torch.Tensor                 # (B, D)
    patches: torch.Tensor             # (B, R*C, D), row-major
    grid: tuple[int, int]             # (R, C)
    layer_cls: list[torch.Tensor] | None = None  # per requested block, (B, D)


def timm_kwargs(cfg: ModelConfig, img_size: int) -> dict:
    """The keyword arguments of `timm.create_model` for a config (shared with the timm export)."""
    kwargs: dict = {"num_classes": 0, "img_size": img_size}
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        if getattr(cfg, key) is not None:
            kwargs[key] = getattr(cfg, key)
    if cfg.arch.startswith("swin"):
        kwargs["strict_img_size"] = False  # 96-px local views on a 224-px model (docs/algorithms.md §1)
    else:
        kwargs["dynamic_img_size"] = True  # interpolate position embeddings for any view size
    return kwargs


def create_timm_model(cfg: ModelConfig, img_size: int, drop_path_rate: float = 0.0) -> nn.Module:
    """The timm model of a config; `pretrained=False` always (no hub access, ever)."""
    try:
        return timm.create_model(cfg.arch, pretrained=False, drop_path_rate=drop_path_rate,
                                 **timm_kwargs(cfg, img_size))
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:  # timm asserts on bad shapes
        raise ConfigError(f"cannot build timm model '{cfg.arch}': {e}") from None


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, img_size: int, drop_path_rate: float = 0.0):
        super().__init__()
        self.model = create_timm_model(cfg, img_size, drop_path_rate)
        self.embed_dim: int = self.model.num_features
        self.has_cls = getattr(self.model, "cls_token", None) is not None
        self.num_prefix = getattr(self.model, "num_prefix_tokens", 0)
        blocks = getattr(self.model, "blocks", None)
        self.num_blocks: int = len(blocks) if blocks is not None else len(getattr(self.model, "layers", []))

    @property
    def patch_size(self) -> int:
        pe = self.model.patch_embed
        p = pe.patch_size
        return int(p[0] if isinstance(p, (tuple, list)) else p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x).cls

    def forward_tokens(self, x: torch.Tensor) -> TokenOutput:
        feats = self.model.forward_features(x)
        return self._split(feats)

    def _split(self, feats: torch.Tensor) -> TokenOutput:
        if feats.dim() == 4:  # Swin: (B, H, W, C), already normed
            b, h, w, c = feats.shape
            patches = feats.reshape(b, h * w, c)
            return TokenOutput(patches.mean(1), patches, (h, w))
        patches = feats[:, self.num_prefix:]
        n = patches.shape[1]
        grid = self._grid(n)
        cls = feats[:, 0] if self.has_cls else patches.mean(1)
        return TokenOutput(cls, patches, grid)

    def _grid(self, num_patches: int) -> tuple[int, int]:
        side = int(round(num_patches ** 0.5))
        if side * side != num_patches:
            raise ValueError(f"non-square token count {num_patches}; pass square views")
        return side, side

    def resolve_layers(self, layers: list[int] | str | None) -> list[int]:
        """'all' → every block; negative indices count from the end."""
        if layers is None or layers == "all":
            return list(range(self.num_blocks))
        out = []
        for i in layers:
            j = i + self.num_blocks if i < 0 else i
            if not 0 <= j < self.num_blocks:
                raise ConfigError(f"layer {i} does not exist: the backbone has blocks 0..{self.num_blocks - 1}")
            out.append(j)
        return out

    def forward_layers(self, x: torch.Tensor, layers: list[int]) -> TokenOutput:
        """CLS of each block in `layers` after the shared final norm, plus the final tokens."""
        if not self.has_cls:
            raise ConfigError("per-layer representations need a ViT with a CLS token")
        final, inter = self.model.forward_intermediates(
            x, indices=list(layers), norm=True, output_fmt="NLC", return_prefix_tokens=True)
        out = self._split(final)
        out.layer_cls = [prefix[:, 0] for _, prefix in inter]
        return out

    def forward_layer_patches(self, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """The patch tokens (B, R*C, D) of each block in `layers`, each after the shared final norm."""
        if getattr(self.model, "blocks", None) is None:
            raise ConfigError("per-block patch tokens need a ViT (this backbone has stages, not blocks)")
        _, inter = self.model.forward_intermediates(x, indices=list(layers), norm=True, output_fmt="NLC")
        return list(inter)
