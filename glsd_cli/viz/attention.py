"""The last block's CLS -> patch attention of every head (DINO's attention-map figure).

timm computes attention with fused `scaled_dot_product_attention`, which never materialises the
probabilities. So the last block is recomputed from its input with the block's own modules
(norm1, qkv, q_norm/k_norm, scale, softmax, proj, layer scale, MLP), and the recomputed block
output is compared with the block's own forward: if they differ (a block layout this code does not
know), the command stops instead of drawing attention that is not the model's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from glsd_cli.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from glsd_cli.errors import GlsdError
from glsd_cli.models.backbone import Backbone
from glsd_cli.viz.drawing import montage, normalise01, overlay, save_png, uint8_image, upsample_nearest

__all__ = ["CLSAttention", "check_attention_model", "prepare_image", "last_block_cls_attention", "render_attention"]


@dataclass
class CLSAttention:
    probs: torch.Tensor    # (B, heads, N): softmax of the CLS query over ALL N tokens (CLS and registers included)
    grid: tuple[int, int]  # (R, C) patch grid, row-major
    num_prefix: int        # CLS (+ register) tokens before the patches
    tokens: torch.Tensor   # (B, N, D): the recomputed last-block output, before the final norm

    def patch_maps(self) -> torch.Tensor:
        """(B, heads, R, C): the CLS row restricted to the patch tokens (not renormalised)."""
        b, h, _ = self.probs.shape
        return self.probs[:, :, self.num_prefix:].reshape(b, h, *self.grid)


def check_attention_model(backbone: Backbone, arch: str) -> None:
    """A clear error for backbones without a CLS token or with blocks of another kind."""
    model = backbone.model
    if not backbone.has_cls:
        raise GlsdError(f"{arch} has no CLS token (its representation pools the tokens), so there is no CLS attention to draw; "
                        "use a ViT checkpoint")
    blocks = getattr(model, "blocks", None)
    last = blocks[-1] if blocks is not None and len(blocks) else None
    attn = getattr(last, "attn", None)
    needed = ("qkv", "num_heads", "scale", "proj")
    if attn is None or not all(hasattr(attn, n) for n in needed) or not hasattr(last, "norm1"):
        raise GlsdError(f"{arch}: its last block is not a timm ViT block with a qkv attention; "
                        "attention maps are only drawn for ViTs")


def prepare_image(image: torch.Tensor, size: int, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (3, H, W) -> (uint8 (3, h, w), normalised float (1, 3, h, w)): shorter side resized to
    `size` (bicubic), then centre-cropped to whole patches. The aspect ratio is kept, as in DINO's
    visualize_attention, because the model takes any grid (dynamic position embeddings)."""
    if size < patch:
        raise GlsdError(f"--size {size} is smaller than one {patch}-px patch")
    resized = F.resize(image, [size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    h, w = resized.shape[-2:]
    crop = F.center_crop(resized, [h - h % patch, w - w % patch])
    x = F.normalize(crop.float() / 255.0, IMAGENET_MEAN, IMAGENET_STD)
    return crop, x[None]


def _tokens_before_last_block(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # The steps of timm's VisionTransformer.forward_features up to its last block.
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    for block in model.blocks[:-1]:
        x = block(x)
    return x


def _block_with_attention(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(block output, attention probabilities (B, heads, N, N)) computed step by step as timm's
    Block / Attention do, with the softmax made explicit."""
    attn = block.attn
    h = block.norm1(x)
    b, n, _ = h.shape
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    y = (probs @ v).transpose(1, 2).reshape(b, n, -1)
    y = getattr(attn, "norm", nn.Identity())(y)  # timm >= 1.0.15: optional norm before proj
    gate = getattr(attn, "gate", None)
    if gate is not None:
        y = y * gate(h).sigmoid()
    y = attn.proj_drop(attn.proj(y))
    x = x + block.drop_path1(block.ls1(y))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, probs


@torch.no_grad()
def last_block_cls_attention(backbone: Backbone, images: torch.Tensor, arch: str = "backbone") -> CLSAttention:
    """The last block's CLS-query attention of every head for a batch of images (3, H, W) whose
    sides are multiples of the patch size."""
    check_attention_model(backbone, arch)
    model = backbone.model
    was_training = model.training
    model.eval()  # no dropout / drop path: the block forward is deterministic and comparable
    try:
        x = _tokens_before_last_block(model, images)
        last = model.blocks[-1]
        try:
            ours, probs = _block_with_attention(last, x)
        except (AttributeError, RuntimeError) as e:  # a block of another layout: name it, no traceback
            raise GlsdError(f"{arch}: cannot recompute its last block's attention ({e})") from None
        theirs = last(x)
    finally:
        model.train(was_training)
    scale = float(theirs.abs().max().clamp_min(1.0))
    if not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * scale):
        raise GlsdError(f"{arch}: recomputing its last block does not reproduce the block's output "
                        "(an unknown block layout), so its attention cannot be drawn faithfully")
    num_prefix = int(getattr(model, "num_prefix_tokens", 1))
    patch = backbone.patch_size
    grid = (images.shape[-2] // patch, images.shape[-1] // patch)
    if grid[0] * grid[1] != x.shape[1] - num_prefix:
        raise GlsdError(f"{arch}: {x.shape[1] - num_prefix} patch tokens do not form the {grid[0]}x{grid[1]} grid "
                        f"of a {images.shape[-2]}x{images.shape[-1]} image")
    return CLSAttention(probs=probs[:, :, 0, :], grid=grid, num_prefix=num_prefix, tokens=theirs)


def render_attention(image: torch.Tensor, attention: CLSAttention, out_dir: Path, alpha: float = 0.6) -> list[Path]:
    """PNG files for one image: the input as the model saw it, each head's map, their mean, and an
    overview sheet. Every map is min-max normalised on its own for display (heads differ in
    sharpness; shared scaling would leave the flat ones black)."""
    rgb = uint8_image(image)
    height, width = rgb.shape[:2]
    maps = attention.patch_maps()[0].double().cpu().numpy()  # (heads, R, C)
    named = [(f"head {i + 1}", f"attention-head{i + 1:02d}.png", m) for i, m in enumerate(maps)]
    named.append(("mean of heads", "attention-mean.png", maps.mean(axis=0)))
    paths = [save_png(rgb, out_dir / "image.png")]
    tiles: list[tuple[np.ndarray, str]] = [(rgb, "image")]
    for caption, name, grid_map in named:
        heat = upsample_nearest(normalise01(grid_map), height, width)
        picture = overlay(rgb, heat, alpha)
        paths.append(save_png(picture, out_dir / name))
        tiles.append((picture, caption))
    # The overview keeps the input, the mean and the heads together, DINO-figure style.
    tiles = [tiles[0], tiles[-1], *tiles[1:-1]]
    paths.append(save_png(montage(tiles, columns=min(len(tiles), 4)), out_dir / "attention.png"))
    return paths
