"""What SDSSL's intermediate-layer self-distillation shares across methods (docs/algorithms.md §4).

- `resolve_distilled_layers`: `method.sd.layers` → 0-based blocks (never the final one: it is the target);
- `sd_weight_schedule`: λ(t) = r·(1 − cos(πt/T))/2 per iteration, as the engine's 'sd_weight' schedule;
- `DinoLayerDistillation`: SD on the DINO / global-local method (`vits16-geo-sd`), used by methods/glsd.py.

SD on DINO — choices (no published system has it; the spec's last paragraph of §4):
- Each distilled block's CLS (after the shared final norm) of each student GLOBAL view goes through
  its own MLP into the DINO bottleneck (`LayerToPrototype`: DINOHead's MLP shape), is L2-normalised
  and scored by the student head's prototype layer, giving logits over the same K prototypes.
- Target: the teacher's final-layer `P_t = softmax((g_t − c)/τ_t)` of the OTHER global view, with the
  same centre and temperature as the DINO loss, no gradient. Local views take no part (the spec names
  the "other global view(s)"), and cost nothing extra.
- The layer terms do NOT train the shared prototypes: they see the prototype weights detached.
  Why: the prototypes define the target space (the teacher's prototype layer is their EMA); in SDSSL
  the flow is one-way, intermediate ← final, and every final-layer head gets no gradient from the layer
  terms. Letting eleven weaker layers move the prototypes would let them move their own targets.
  It also keeps DINO's freezing of the prototype layer in the first epoch(s) untouched: the layer terms
  never reach it, whatever λ is.
- `L = L_dino_or_glsd + λ(t) · mean_l L_l`; with λ = 0 every gradient of the backbone and of the DINO
  heads equals the method without SD.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glsd_cli.config import Config, SDConfig
from glsd_cli.engine.schedules import sd_ramp
from glsd_cli.errors import ConfigError
from glsd_cli.losses.layerwise_dino import LayerToPrototype, LayerwiseDinoLoss


def resolve_distilled_layers(spec: Sequence[int] | str, num_blocks: int) -> list[int]:
    """'all' → every block but the last; a list → those blocks (negative counts from the end), sorted."""
    if num_blocks < 2:
        raise ConfigError(f"self-distillation needs at least 2 blocks; the backbone has {num_blocks}")
    final = num_blocks - 1
    if spec == "all":
        return list(range(final))
    layers = set()
    for i in spec:
        j = i + num_blocks if i < 0 else i
        if not 0 <= j < final:
            raise ConfigError(f"method.sd.layers: block {i} cannot be distilled; choose among 0..{final - 1} "
                              f"(block {final} is the final layer, the target)")
        layers.add(j)
    if not layers:
        raise ConfigError("method.sd.layers is empty; to train without SD set method.sd.enabled=false")
    return sorted(layers)


def sd_weight_schedule(sd: SDConfig, epochs: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
    """{'sd_weight': λ per iteration} when SD is enabled, else {} (λ is then reported as 0)."""
    if not sd.enabled:
        return {}
    return {"sd_weight": sd_ramp(sd.ratio, epochs * steps_per_epoch)}


class DinoLayerDistillation(nn.Module):
    """Per-layer projections into the DINO prototype space and their loss toward the teacher's P_t.

    Lives in the student's ModuleDict (key 'sd'), so it is trained and checkpointed with it; the
    teacher has no copy — its targets come from its final layer only.
    """

    def __init__(self, cfg: Config, embed_dim: int, num_blocks: int):
        super().__init__()
        h = cfg.head
        self.layers = resolve_distilled_layers(cfg.method.sd.layers, num_blocks)
        self.projections = nn.ModuleDict({
            str(l): LayerToPrototype(embed_dim, h.hidden_dim, h.bottleneck_dim, h.num_layers) for l in self.layers})
        self.loss = LayerwiseDinoLoss(cfg.method.loss.student_temp)

    def forward(self, layer_cls: Sequence[Sequence[Tensor]], prototypes: nn.Module,
                teacher_probs: Sequence[Tensor]) -> tuple[Tensor, dict[str, float]]:
        """λ NOT applied.

        Args:
            layer_cls: per student global view v, per distilled layer (order of `self.layers`), the (B, D)
                CLS after the final norm.
            prototypes: the student DINO head's prototype layer (`head.last_layer`); used detached.
            teacher_probs: per global view t, the teacher's final-layer P_t (B, K).
        """
        weight = prototypes.weight.detach()  # weight-normed W = g·v/‖v‖, as the head computes it

        def score(z: Tensor) -> Tensor:
            return F.linear(z, weight)

        n_views = len(layer_cls)
        logits = {}
        for i, l in enumerate(self.layers):
            # Both global views through the layer's MLP in one call (no BatchNorm: views can share a batch).
            z = self.projections[str(l)](torch.cat([v[i] for v in layer_cls]), score).float()
            logits[l] = list(z.chunk(n_views))
        return self.loss(logits, teacher_probs)


__all__ = ["DinoLayerDistillation", "resolve_distilled_layers", "sd_weight_schedule"]
