"""SDSSL on the DINO / global-local method (docs/algorithms.md §4, last paragraph): the per-layer terms.

No published system combines the two, so this follows the spec literally and keeps the choices
explicit (methods/layerwise.py says why each was made):

- Each distilled block's CLS feature (after the backbone's final norm) goes through its own MLP of
  DINOHead's shape into the DINO head's bottleneck (`LayerToPrototype`), is L2-normalised, and is
  scored by the student DINO head's prototype layer, so every layer predicts over the same K
  prototypes as the final layer. The prototype weights are used DETACHED: the layer terms train the
  per-layer MLPs and the backbone, never the shared prototypes (methods/layerwise.py).
- Target: the teacher's final-layer global distributions P_t (the same targets as the DINO loss of
  this step, no gradient), paired as in DINO: teacher global view t with student global view s != t.
  Local views are not used for the layer terms, since the spec names the "other global view(s)".
- Loss of layer l = `dino_cross_entropy` of its logits / tau_s against P_t; the module returns the
  mean over layers; the caller multiplies by lambda(t) (same ramp as §4).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glsd_cli.losses.dino import dino_cross_entropy
from glsd_cli.models.heads import dino_mlp


class LayerToPrototype(nn.Module):
    """Per-layer MLP into the DINO bottleneck (DINOHead's MLP), then the given prototype scorer.
    ``forward(x, last_layer)``: x (B, embed_dim) -> logits (B, K)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3) -> None:
        super().__init__()
        self.mlp = dino_mlp(in_dim, hidden_dim, bottleneck_dim, num_layers)

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
        log_p = [F.log_softmax(z / self.student_temp, dim=-1) for z in student_logits]
        return dino_cross_entropy(log_p, [p.detach() for p in teacher_probs])

    def forward(self, layer_logits: Mapping[int, Sequence[Tensor]],
                teacher_probs: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The layer-wise term (lambda NOT applied) and its statistics.

        Args:
            layer_logits: {block index l: [z_s^l for each student GLOBAL view s]}, each (B, K),
                local batch, with gradient.
            teacher_probs: [P_t for each global view t], (B, K), the teacher's final-layer targets.

        Returns:
            (mean over layers, stats) — stats: ``loss_layers`` and ``loss_layer{l}``, detached 0-d tensors.
        """
        if not layer_logits:
            raise ValueError("layer_logits is empty: no distilled layers")
        layers = sorted(layer_logits)
        losses = torch.stack([self.layer_loss(layer_logits[l], teacher_probs) for l in layers])
        loss = losses.mean()
        stats = {f"loss_layer{l}": v for l, v in zip(layers, losses.detach().unbind())}
        stats["loss_layers"] = loss.detach()
        return loss, stats


__all__ = ["LayerToPrototype", "LayerwiseDinoLoss"]
