"""The contract between the training loop and what it trains (a pre-training method, linear probes,
a fine-tuned classifier): the loop calls exactly these, in this order, once per optimiser step.

    ctx = StepContext(epoch, step, total_steps, ScheduledValues(...))
    outputs = [task.training_step(micro_batch, ctx) for each micro-batch]   # forward + loss
    ... backward, gradient average, clipping ...
    for p in task.frozen_parameters(ctx): p.grad = None
    optimizer.step()
    task.after_step(ctx, outputs)                                            # EMA teacher, centres
and `task.epoch_metrics()` once per epoch end.

Metrics are 0-d tensors on the training device: the loop reads them to the host only when it writes
a log line, so a step costs no host synchronisation beyond its one finiteness check (GPU-step issue).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ScheduledValues:
    """The per-iteration schedules' values at one step (engine/schedules.py). A schedule without a
    field here is refused when the loop starts: a misspelt name cannot pass unnoticed."""

    lr: float
    weight_decay: float | None = None
    momentum: float | None = None       # EMA momentum of the teacher
    teacher_temp: float | None = None   # DINO's τ_t (warm-up schedule)
    sd_weight: float | None = None      # SDSSL's λ(t) (None when self-distillation is off)

    def logged(self) -> dict[str, float]:
        """The values that are scheduled in this run, for metrics.jsonl."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class StepContext:
    """Where training is and the scheduled values for this iteration."""

    epoch: int
    step: int                 # global iteration, 0-based
    total_steps: int
    values: ScheduledValues = field(default_factory=lambda: ScheduledValues(lr=0.0))


@dataclass
class StepOutput:
    """What one micro-batch's `training_step` hands back to the loop.

    loss: the scalar to differentiate; metrics: detached 0-d tensors on the device (the loop averages
    them over micro-batches and processes and reads them at log lines only; make constants with
    `tensor.new_full`, since copying a Python number to a GPU waits for the GPU); teacher: what
    `after_step` needs from this micro-batch (e.g. the teacher outputs that move DINO's centres), handed
    back to the task instead of being parked on it between the two calls.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    teacher: Any = None


class TrainingTask(nn.Module):
    """Base of everything the loop trains; the defaults are "nothing to do"."""

    # K of the distribution whose collapse the loop watches (teacher_entropy / teacher_kl_uniform in
    # the step metrics, judged against log K at epoch ends); None: the task reports no such statistics.
    num_prototypes: int | None = None
    # Likewise for a dense (patch-token) head, whose statistics carry engine/monitors.DENSE's prefix.
    dense_prototypes: int | None = None
    # The watched targets come from Sinkhorn-Knopp: a collapse warning then does not advise it.
    sinkhorn_targets: bool = False

    def training_step(self, batch: dict, ctx: StepContext) -> StepOutput:
        raise NotImplementedError

    def frozen_parameters(self, ctx: StepContext) -> list[nn.Parameter]:
        """Parameters whose gradients are dropped this step (e.g. DINO's prototype layer in epoch 0)."""
        return []

    def after_step(self, ctx: StepContext, outputs: list[StepOutput]) -> None:
        """Called after the optimiser step, under no_grad, with the step's micro-batch outputs."""

    def epoch_metrics(self) -> dict[str, float]:
        return {}

