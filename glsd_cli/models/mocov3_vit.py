"""MoCo v3's two ViT changes for stability: a frozen random patch embedding and fixed 2-D sin-cos
position embeddings (Chen, Xie & He, "An Empirical Study of Training Self-Supervised Vision
Transformers", ICCV 2021, §4.2 and §5; facebookresearch/moco-v3 ``vits.py``,
``VisionTransformerMoCo.build_2d_sincos_position_embedding`` and the ``stop_grad_conv1`` branch of
its ``__init__``).

Both are applied to an existing timm ViT in place, so the model keeps timm's forward, including
``dynamic_img_size``: for a view size other than the build size timm resamples ``pos_embed``
(bicubic) and leaves the prefix (CLS) row alone, which is zero here as in MoCo v3.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from glsd_cli.errors import ConfigError


def sincos_2d_position_embedding(rows: int, cols: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(rows * cols, dim) table; token (r, c) at flat index r * cols + c (row-major, as timm).

    With ``k = dim // 4`` and ``omega_d = temperature ** (-d / k)`` for d = 0..k-1:
        emb(r, c) = [sin(r omega), cos(r omega), sin(c omega), cos(c omega)].
    MoCo v3 builds ``meshgrid(arange(w), arange(h))`` (matrix indexing) and flattens it, so on its
    square grids the first half ("out_w") varies with the ROW of the token and the second half with
    the column; the formula above reproduces those values exactly for square grids and stays
    well-defined for rectangular ones.
    """
    if dim % 4:
        raise ConfigError(f"2-D sin-cos position embeddings need an embedding width divisible by 4 (got {dim}); "
                          "set method.contrastive.sincos_pos_embed=false or change model.embed_dim")
    k = dim // 4
    omega = 1.0 / temperature ** (torch.arange(k, dtype=torch.float64) / k)
    r = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)   # row of each flat index
    c = torch.arange(cols, dtype=torch.float64).repeat(rows)              # column of each flat index
    out_r, out_c = r[:, None] * omega[None], c[:, None] * omega[None]
    table = torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1)
    return table.float()


def _grid_size(model: nn.Module) -> tuple[int, int]:
    grid = getattr(model.patch_embed, "grid_size", None)
    if grid is None:
        raise ConfigError("sin-cos position embeddings need a ViT patch embedding with a fixed grid")
    return int(grid[0]), int(grid[1])


@torch.no_grad()
def use_sincos_pos_embed(model: nn.Module) -> None:
    """Overwrite a timm ViT's learned ``pos_embed`` with the fixed sin-cos table (CLS row zero), frozen."""
    pos = getattr(model, "pos_embed", None)
    if not isinstance(pos, nn.Parameter) or getattr(model, "patch_embed", None) is None:
        raise ConfigError("method.contrastive.sincos_pos_embed needs a ViT with absolute position embeddings "
                          "(timm vit_*); this architecture has none")
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
    rows, cols = _grid_size(model)
    if pos.shape[1] != prefix + rows * cols:
        raise ConfigError(f"unexpected pos_embed shape {tuple(pos.shape)} for a {rows}x{cols} grid")
    pos.zero_()  # the CLS (prefix) positions stay zero, as MoCo v3's pe_token
    pos[0, prefix:] = sincos_2d_position_embedding(rows, cols, pos.shape[-1]).to(pos.dtype)
    pos.requires_grad_(False)


@torch.no_grad()
def freeze_random_patch_embed(model: nn.Module) -> None:
    """MoCo v3's random patch projection: Xavier-uniform init of the patch conv (fan_in = channels x
    patch area, fan_out = width), zero bias, then no gradient for either — the trick that removes the
    loss spikes of self-supervised ViT training (MoCo v3 §4.2)."""
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if not isinstance(proj, nn.Conv2d):
        raise ConfigError("method.contrastive.freeze_patch_embed needs a ViT whose patch embedding is a convolution")
    fan_in = proj.weight.shape[1] * proj.weight.shape[2] * proj.weight.shape[3]
    bound = math.sqrt(6.0 / float(fan_in + proj.weight.shape[0]))
    nn.init.uniform_(proj.weight, -bound, bound)
    proj.weight.requires_grad_(False)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)
        proj.bias.requires_grad_(False)


__all__ = ["freeze_random_patch_embed", "sincos_2d_position_embedding", "use_sincos_pos_embed"]
