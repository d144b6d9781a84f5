"""DINO's global self-distillation loss with centring and sharpening (ALGORITHMS.md §3).

For every pair (teacher view t global, student view s ≠ t):
    CE = -Σ_k softmax((g_t - c) / τ_t)_k · log_softmax(g_s / τ_s)_k,
averaged over the batch, then over pairs. The centre c follows an EMA of the teacher's mean output
(all-reduced over processes) and is updated after the loss is computed (Caron et al. 2021).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glsd_cli.engine.distributed import all_reduce_mean


def teacher_probabilities(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    return F.softmax((logits.float() - center) / temp, dim=-1)


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_logits: list[torch.Tensor], teacher_logits: list[torch.Tensor],
                teacher_temp: float) -> torch.Tensor:
        """student_logits: one (B, K) per view (globals first); teacher_logits: one per global view."""
        log_p = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_logits]
        targets = [teacher_probabilities(t, self.center, teacher_temp).detach() for t in teacher_logits]
        total, pairs = 0.0, 0
        for t, target in enumerate(targets):
            for s, lp in enumerate(log_p):
                if s == t:  # the same view is not its own target (DINO)
                    continue
                total = total + torch.sum(-target * lp, dim=-1).mean()
                pairs += 1
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_logits: list[torch.Tensor]) -> None:
        batch_mean = torch.cat(teacher_logits).float().mean(0, keepdim=True)
        batch_mean = all_reduce_mean(batch_mean)
        self.center.mul_(self.center_momentum).add_(batch_mean * (1 - self.center_momentum))
