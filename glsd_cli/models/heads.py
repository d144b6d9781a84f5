"""DINO's projection head (Caron et al. 2021, `vision_transformer.DINOHead`).

MLP (in → hidden → ... → bottleneck, GELU) → L2 normalisation → weight-normalised linear layer to
K prototypes without bias. `forward_bottleneck` and `last_layer` are exposed separately so that the
dense (local) loss can push patch tokens through the prototype layer in chunks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def dino_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> nn.Module:
    """DINOHead's MLP: Linear layers with biases and GELU between them (one Linear when num_layers is
    1), truncated-normal init (std 0.02) and zero biases, as DINO's `vision_transformer.DINOHead`."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_layers == 1:
        mlp: nn.Module = nn.Linear(in_dim, out_dim)
    else:
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(num_layers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, out_dim))
        mlp = nn.Sequential(*layers)
    mlp.apply(_init_linear)
    return mlp


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        self.mlp = dino_mlp(in_dim, hidden_dim, bottleneck_dim, num_layers)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        # norm_last_layer: the prototypes stay unit-norm (the gain is not learned), DINO's default.
        gain.requires_grad_(not norm_last_layer)

    def forward_bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.forward_bottleneck(x))

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the prototype layer (frozen during the first epoch(s))."""
        return [p for p in self.last_layer.parameters() if p.requires_grad]
