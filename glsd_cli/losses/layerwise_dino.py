"""SDSSL on the DINO / global-local method (docs/algorithms.md §4, last paragraph).

No published system combines the two, so this follows the spec literally and keeps the choices
explicit:

- Each distilled block's CLS feature (after the backbone's final norm) goes through its own small
  MLP into the DINO head's bottleneck (``LayerToPrototype``), is L2-normalised, and is scored by the
  SHARED weight-normalised prototype layer of the student's DINO head (``last_layer``), so every
  layer predicts over the same K prototypes as the final layer. This mirrors DINOHead (Caron et al.
  2021, ``vision_transformer.py``: mlp -> normalize -> last_layer) with only the MLP duplicated per
  layer, which keeps the per-layer parameter cost small (no extra K x 256 prototype matrices).
  Gradient of the layer terms does flow into the shared prototypes (scaled by lambda); the method
  can pass a frozen copy of ``last_layer`` if it wants to stop that.
- Target: the teacher's final-layer global probabilities ``P_t`` (already centred and sharpened by
  the DINO loss, no gradient), paired as in DINO: teacher global view t with student global view
  s != t (with 2 globals: 2 pairs). Local views are not used for the layer terms, since the spec
  names the "other global view(s)".
- Loss of layer l = mean over pairs of mean over batch of ``sum_k -P_t log_softmax(z_s^l / tau_s)``;
  the module returns the mean over layers; the caller multiplies by lambda(t) (same ramp as §4).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerToPrototype(nn.Module):
    """Per-layer MLP into the DINO bottleneck, then the shared prototype layer.

    Same shape as DINOHead's MLP (Linear + GELU between, biases, no BN), default 3 layers with hidden
    2048 and bottleneck 256. ``forward(x, last_layer)``: x (B, embed_dim) -> logits (B, K).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        for i in range(num_layers):
            d_in = in_dim if i == 0 else hidden_dim
            d_out = bottleneck_dim if i == num_layers - 1 else hidden_dim
            layers.append(nn.Linear(d_in, d_out))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # DINOHead's init: truncated normal std 0.02, zero bias.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, last_layer: Callable[[Tensor], Tensor]) -> Tensor:
        return last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class LayerwiseDinoLoss(nn.Module):
    """Mean over distilled layers of the DINO cross-entropy toward the teacher's final globals.

    Args:
        student_temp: tau_s applied to the layer logits (DINO's 0.1).
    """

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        self.student_temp = student_temp

    def layer_loss(self, student_logits: Sequence[Tensor], teacher_probs: Sequence[Tensor]) -> Tensor:
        """One layer. student_logits[s]: (B, K) for student global view s; teacher_probs[t]: (B, K)."""
        if len(student_logits) != len(teacher_probs):
            raise ValueError("need one teacher distribution per student global view, got "
                             f"{len(teacher_probs)} and {len(student_logits)}")
        if len(student_logits) < 2:
            raise ValueError("need at least 2 global views (pairs are t != s)")
        total, n_pairs = student_logits[0].new_zeros(()), 0
        for s, z in enumerate(student_logits):
            log_p = F.log_softmax(z / self.student_temp, dim=-1)
            for t, p_t in enumerate(teacher_probs):
                if t == s:
                    continue
                total = total + torch.sum(-p_t.detach() * log_p, dim=-1).mean()
                n_pairs += 1
        return total / n_pairs

    def forward(self, layer_logits: Mapping[int, Sequence[Tensor]],
                teacher_probs: Sequence[Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Compute the layer-wise term (lambda NOT applied).

        Args:
            layer_logits: {block index l: [z_s^l for each student GLOBAL view s]}, each (B, K),
                local batch, with gradient.
            teacher_probs: [P_t for each global view t], (B, K), the teacher's final-layer
                centred + sharpened softmax (no gradient; detached here anyway).

        Returns:
            (mean over layers, stats) — stats: ``loss_layers`` and ``loss_layer{l}`` floats.
        """
        if not layer_logits:
            raise ValueError("layer_logits is empty: no distilled layers")
        layers = sorted(layer_logits)
        losses = torch.stack([self.layer_loss(layer_logits[l], teacher_probs) for l in layers])
        loss = losses.mean()
        values = torch.cat([losses.detach(), loss.detach()[None]]).tolist()
        stats = {f"loss_layer{l}": v for l, v in zip(layers, values[:-1])}
        stats["loss_layers"] = values[-1]
        return loss, stats


__all__ = ["LayerToPrototype", "LayerwiseDinoLoss"]
