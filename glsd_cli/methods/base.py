"""What every pre-training method shares: a student, an EMA teacher and a loss (solo-learn's shape).

A Method is a `TrainingTask` (engine/task.py): it declares its modules and implements
`training_step(batch, ctx) -> StepOutput`; the engine owns the loop, the optimiser and the schedules,
and calls `after_step(ctx, outputs)` (EMA of the teacher, centres) after each optimiser step.
"""
from __future__ import annotations

import torch
from torch import nn

from glsd_cli.config import Config
from glsd_cli.engine.task import StepContext, StepOutput, TrainingTask
from glsd_cli.models.backbone import Backbone


class Method(TrainingTask):
    """Base class. Subclasses build `self.student` and `self.teacher` (nn.ModuleDict with a 'backbone')."""

    student: nn.ModuleDict
    teacher: nn.ModuleDict

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg

    def after_step(self, ctx: StepContext, outputs: list[StepOutput]) -> None:
        """After the optimiser step: EMA of the teacher."""
        self.update_teacher(ctx.values.momentum)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """θ_t ← m·θ_t + (1 − m)·θ_s over the student's TRAINABLE parameters that the teacher shares:
        frozen ones (DINO's fixed prototype norm, MoCo v3's random patch embedding) stay bit-identical
        in the teacher instead of drifting by rounding."""
        student = {name: p for name, p in self.student.named_parameters() if p.requires_grad}
        pairs = [(student[name], p_t) for name, p_t in self.teacher.named_parameters() if name in student]
        t_params = [t for _, t in pairs]
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, [s.detach() for s, _ in pairs], alpha=1 - momentum)

    def schedules(self, epochs: int, steps_per_epoch: int) -> dict:
        """Extra per-iteration schedules this method needs (beyond lr, weight decay and momentum)."""
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
