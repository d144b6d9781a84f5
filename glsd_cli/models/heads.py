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


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        if num_layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(num_layers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear)
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
