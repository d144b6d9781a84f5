"""What every pre-training method shares: a student, an EMA teacher and a loss (solo-learn's shape).

A Method declares its modules; the engine owns the loop, the optimiser and the schedules, and calls
`training_step(batch, ctx)` then `after_step(ctx)` (EMA, centres) once per iteration.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from glsd_cli.config import Config
from glsd_cli.models.backbone import Backbone


@dataclass
class StepContext:
    """Where training is and the scheduled values for this iteration."""

    epoch: int
    step: int                 # global iteration, 0-based
    total_steps: int
    values: dict[str, float] = field(default_factory=dict)  # lr, weight_decay, momentum, teacher_temp, ...


class Method(nn.Module):
    """Base class. Subclasses build `self.student` and `self.teacher` (nn.ModuleDict with a 'backbone')."""

    student: nn.ModuleDict
    teacher: nn.ModuleDict

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg

    # -- training
    def training_step(self, batch: dict, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self, ctx: StepContext) -> None:
        """Called after the optimiser step: EMA of the teacher by default."""
        self.update_teacher(ctx.values.get("momentum", 0.996))

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """θ_t ← m·θ_t + (1 − m)·θ_s over every parameter the teacher shares with the student."""
        student = dict(self.student.named_parameters())
        pairs = [(student[name], p_t) for name, p_t in self.teacher.named_parameters() if name in student]
        t_params = [t for _, t in pairs]
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, [s.detach() for s, _ in pairs], alpha=1 - momentum)

    def frozen_parameters(self, ctx: StepContext) -> list[nn.Parameter]:
        """Parameters whose gradients are dropped this step (e.g. DINO's prototype layer in epoch 0)."""
        return []

    def schedules(self, epochs: int, steps_per_epoch: int) -> dict:
        """Extra per-iteration schedules this method needs (beyond lr, weight decay and momentum)."""
        return {}

    def epoch_metrics(self) -> dict[str, float]:
        return {}

    # -- evaluation
    def backbone(self, which: str = "teacher") -> Backbone:
        return (self.teacher if which == "teacher" else self.student)["backbone"]

    def trainable_modules(self) -> nn.Module:
        return self.student


def copy_as_teacher(student: nn.ModuleDict, teacher: nn.ModuleDict) -> nn.ModuleDict:
    """Start the teacher equal to the student, and exclude it from gradients."""
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
