"""DINO's global self-distillation loss with centring and sharpening (docs/algorithms.md §3).

For every pair (teacher view t global, student view s ≠ t):
    CE = -Σ_k softmax((g_t - c) / τ_t)_k · log_softmax(g_s / τ_s)_k,
averaged over the batch, then over pairs. The centre c follows an EMA of the teacher's mean output
(all-reduced over processes) and is updated after the loss is computed (Caron et al. 2021).

`centering="sinkhorn"` replaces the centre by Sinkhorn-Knopp normalisation of the teacher's outputs
over the batch (SwAV, Caron et al. 2020; DINOv2, Oquab et al. 2023 §4): the targets of every batch
use each prototype equally, so neither collapse (one prototype, or uniform) can set in, whatever the
lag of an EMA centre. The tiny presets use it: with the EMA centre their teacher sat near one
prototype for whole runs (README "What the demo shows").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glsd_cli.engine.distributed import all_reduce_max, all_reduce_mean, all_reduce_sum


def teacher_probabilities(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    return F.softmax((logits.float() - center) / temp, dim=-1)


# exp(x) for x below about -87.3 gives a subnormal float32 or 0, and x86 CPUs compute those many times
# slower than normal results (measured here: exp of an 8192 x 1024 table of teacher logits / 0.02,
# shifted by its maximum, 47 ms; clamped first, 4 ms). What the clamp changes is below float32's
# smallest normal number (1.2e-38), next to terms of 1 after the shift by the maximum: nothing.
EXP_FLOOR = -87.0


def _shifted_exp(x: torch.Tensor, peak: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """exp(x - peak) into `out`, with x - peak clamped at EXP_FLOOR (see there). One buffer for every
    use: a fresh (N, K) tensor per pass costs a CPU its page faults (10 ms per 32 MiB here)."""
    return torch.sub(x, peak, out=out).clamp_min_(EXP_FLOOR).exp_()


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets (N, K) from logits (N, K): Q = exp(logits / temp), alternately rescaled so that
    each prototype gets the same total mass over the batch (on all processes) and each image's row
    sums to 1 (the last step, so the result is a distribution per image).

    The algorithm of DINOv2's `sinkhorn_knopp_teacher` (rows to 1/K, columns to 1/N, `iterations`
    times), written in the log domain: exp(l / 0.04) under- and overflows float32 for |l| ≳ 4.
    """
    log_q = logits.float() / temp
    work = torch.empty_like(log_q)
    for _ in range(iterations):
        # Every prototype the same mass: subtract its log-sum over the images of every process.
        peak = all_reduce_max(log_q.amax(dim=0))
        log_q -= peak + all_reduce_sum(_shifted_exp(log_q, peak, work).sum(dim=0)).log_()
        # Every image a distribution over the prototypes.
        peak = log_q.amax(dim=1, keepdim=True)
        log_q -= peak + _shifted_exp(log_q, peak, work).sum(dim=1, keepdim=True).log_()
    return log_q.clamp_min_(EXP_FLOOR).exp_()


class DINOLoss(nn.Module):
    """DINO's cross-entropy between the student's views and the teacher's targets, and the centre
    those targets are made with. The method computes the targets once per step (`teacher_targets`)
    and hands the same ones to this loss, to SD's layer terms and to its collapse statistics
    (DINOv2's shape: `ssl_meta_arch.py` computes them once and passes them to every loss)."""

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

    @torch.no_grad()
    def teacher_targets(self, teacher_logits: list[torch.Tensor], teacher_temp: float) -> list[torch.Tensor]:
        """The teacher's target distribution for each global view: centred and sharpened (DINO) or
        Sinkhorn-Knopp normalised over all views of the batch together (DINOv2)."""
        if self.centering == "ema":
            return [teacher_probabilities(t, self.center, teacher_temp) for t in teacher_logits]
        q = sinkhorn_knopp(torch.cat(teacher_logits), teacher_temp, self.sinkhorn_iterations)
        return list(q.split([len(t) for t in teacher_logits]))

    def forward(self, student_logits: list[torch.Tensor], teacher_targets: list[torch.Tensor]) -> torch.Tensor:
        """student_logits: one (B, K) per view (globals first); teacher_targets: one distribution (B, K)
        per global view, from `teacher_targets`."""
        return dino_cross_entropy([F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_logits],
                                  teacher_targets)

    @torch.no_grad()
    def update_center(self, teacher_logits: list[torch.Tensor]) -> None:
        if self.centering == "sinkhorn":  # no centre to move (and no all-reduce to pay for)
            return
        batch_mean = torch.cat(teacher_logits).float().mean(0, keepdim=True)
        batch_mean = all_reduce_mean(batch_mean)
        self.center.mul_(self.center_momentum).add_(batch_mean * (1 - self.center_momentum))


def dino_cross_entropy(student_log_probs: list[torch.Tensor], teacher_targets: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the pairs (teacher view t, student view s != t) of the batch-mean cross-entropy
    -sum_k P_t log p_s; the first len(teacher_targets) student views are the same views as the teacher's
    (DINO: the same view is not its own target). Shared by the global loss and SD's layer terms."""
    total, pairs = 0.0, 0
    for t, target in enumerate(teacher_targets):
        for s, log_p in enumerate(student_log_probs):
            if s == t:
                continue
            total = total + torch.sum(-target * log_p, dim=-1).mean()
            pairs += 1
    if pairs == 0:
        raise ValueError("no (teacher, student) pair: need a student view other than the teacher's")
    return total / pairs
