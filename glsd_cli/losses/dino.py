"""DINO's global self-distillation loss with centring and sharpening (docs/algorithms.md §3).

For every pair (teacher view t global, student view s ≠ t):
    CE = -Σ_k softmax((g_t - c) / τ_t)_k · log_softmax(g_s / τ_s)_k,
averaged over the batch, then over pairs. The centre c follows an EMA of the teacher's mean output
(all-reduced over processes) and is updated after the loss is computed (Caron et al. 2021).

`centering="sinkhorn"` replaces the centre by Sinkhorn-Knopp normalisation of the teacher's outputs
over the batch (SwAV, Caron et al. 2020; DINOv2, Oquab et al. 2023 §4): the targets of every batch
use each prototype equally, so neither collapse (one prototype, or uniform) can set in, whatever the
lag of an EMA centre. (On the 5-epoch built-in demo it did not lift k-NN: the targets stayed
balanced but flat; README "What the demo shows".)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glsd_cli.engine.distributed import all_reduce_max, all_reduce_mean, all_reduce_sum


def teacher_probabilities(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    return F.softmax((logits.float() - center) / temp, dim=-1)


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets (N, K) from logits (N, K): Q = exp(logits / temp), alternately rescaled so that
    each prototype gets the same total mass over the batch (on all processes) and each image's row
    sums to 1 (the last step, so the result is a distribution per image).

    The algorithm of DINOv2's `sinkhorn_knopp_teacher` (rows to 1/K, columns to 1/N, `iterations`
    times), written in the log domain: exp(l / 0.04) under- and overflows float32 for |l| ≳ 4.
    """
    log_q = logits.float() / temp
    for _ in range(iterations):
        # Every prototype the same mass: subtract its log-sum over the images of every process.
        peak = all_reduce_max(log_q.max(dim=0).values)
        log_q = log_q - (peak + all_reduce_sum(torch.exp(log_q - peak).sum(dim=0)).log())
        # Every image a distribution over the prototypes.
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
    return torch.exp(log_q)


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "ema", sinkhorn_iterations: int = 3):
        super().__init__()
        if centering not in ("ema", "sinkhorn"):
            raise ValueError(f"centering must be 'ema' or 'sinkhorn', got {centering!r}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        # With centering = "sinkhorn" the centre is unused: kept (zero) so checkpoints have one layout.
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._sinkhorn_memo: tuple | None = None  # (key, targets, the logits they came from)

    @torch.no_grad()
    def teacher_targets(self, teacher_logits: list[torch.Tensor], teacher_temp: float) -> list[torch.Tensor]:
        """The teacher's target distribution for each global view: centred and sharpened (DINO) or
        Sinkhorn-Knopp normalised over all views of the batch together (DINOv2)."""
        if self.centering == "ema":
            return [teacher_probabilities(t, self.center, teacher_temp) for t in teacher_logits]
        # The loss, the collapse monitor and SD's layer targets all ask for this step's targets:
        # Sinkhorn-Knopp (and its all-reduces) runs once per step. The memo holds the last targets, so
        # equal storage pointers and versions mean the same, unmodified logits.
        if any(t.is_inference() for t in teacher_logits):  # no version counter to key on: no memo
            return self._sinkhorn_targets(teacher_logits, teacher_temp)
        key = (teacher_temp, *((t.data_ptr(), t.shape, t._version) for t in teacher_logits))
        if self._sinkhorn_memo is None or self._sinkhorn_memo[0] != key:
            self._sinkhorn_memo = (key, self._sinkhorn_targets(teacher_logits, teacher_temp), teacher_logits)
        return self._sinkhorn_memo[1]

    def _sinkhorn_targets(self, teacher_logits: list[torch.Tensor], teacher_temp: float) -> list[torch.Tensor]:
        q = sinkhorn_knopp(torch.cat(teacher_logits), teacher_temp, self.sinkhorn_iterations)
        return list(q.split([len(t) for t in teacher_logits]))

    def forward(self, student_logits: list[torch.Tensor], teacher_logits: list[torch.Tensor],
                teacher_temp: float) -> torch.Tensor:
        """student_logits: one (B, K) per view (globals first); teacher_logits: one per global view."""
        log_p = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_logits]
        targets = self.teacher_targets(teacher_logits, teacher_temp)
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
        if self.centering == "sinkhorn":  # no centre to move (and no all-reduce to pay for)
            return
        batch_mean = torch.cat(teacher_logits).float().mean(0, keepdim=True)
        batch_mean = all_reduce_mean(batch_mean)
        self.center.mul_(self.center_momentum).add_(batch_mean * (1 - self.center_momentum))
