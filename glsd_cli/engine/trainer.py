"""The one training loop: pre-training, linear evaluation and fine-tuning all run through it.

Per iteration: scheduled lr / weight decay → forward under autocast → backward → per-parameter
gradient clipping (DINO) → drop frozen gradients → optimiser step → `task.after_step` (EMA, centres).
Logs to metrics.jsonl every N steps and results.csv every epoch; checkpoints atomically at epoch
ends, every N steps and on SIGINT/SIGTERM; resumes from the last checkpoint exactly.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from glsd_cli.engine import distributed as dist
from glsd_cli.engine.checkpoint import (CHECKPOINT_NAME, load_optimizer, load_state_strict, optimizer_tensors,
                                        read_checkpoint, restore_rng, rng_tensors, save_tensors, sub_dict)
from glsd_cli.engine.metrics import MetricsLog, progress_bar
from glsd_cli.errors import GlsdError
from glsd_cli.methods.base import StepContext


class NonFiniteLoss(GlsdError):
    pass


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GlsdError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") or
                    torch._C._cpu._is_amx_tile_supported() or torch._C._cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None for fp32; bf16 where the hardware has it (AMX/AVX512-BF16 CPUs, Ampere+ GPUs); else fp16 on GPU."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise GlsdError("precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def param_groups(module: nn.Module) -> list[dict]:
    """Weight decay on weights only: none on biases and 1-D parameters (norms, tokens) — DINO."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0,
                                                   "fixed_weight_decay": True}]


def clip_per_parameter(params: list[nn.Parameter], clip: float) -> float:
    """DINO's `clip_gradients`: each parameter's gradient norm is clipped separately. Returns the mean norm."""
    norms = []
    for p in params:
        if p.grad is None:
            continue
        norm = p.grad.detach().norm(2)
        norms.append(norm)
        coef = clip / (norm + 1e-6)
        p.grad.mul_(torch.clamp(coef, max=1.0))
    return float(torch.stack(norms).mean()) if norms else 0.0


@dataclass
class TrainState:
    epoch: int = 0          # epoch to run next (or the one in progress)
    step_in_epoch: int = 0  # steps of `epoch` already done
    global_step: int = 0

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


@dataclass
class Trainer:
    """Runs `task.training_step` over epochs. `task` is a Method-like nn.Module (see methods/base.py)."""

    task: nn.Module
    optimizer: torch.optim.Optimizer
    schedules: dict[str, np.ndarray]
    epochs: int
    steps_per_epoch: int
    run_dir: Path | None
    device: torch.device
    config_json: str
    kind: str = "pretrain"
    precision: str = "fp32"
    clip_grad: float = 0.0
    checkpoint_every_steps: int = 0
    log_every_steps: int = 10
    epoch_end_hook: Callable[[int], dict[str, float]] | None = None
    state: TrainState = field(default_factory=TrainState)
    quiet: bool = False

    def __post_init__(self):
        self.dtype = autocast_dtype(self.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.log = MetricsLog(self.run_dir) if (self.run_dir and dist.is_main_process()) else None
        self._stop_signal: int | None = None
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / CHECKPOINT_NAME if self.run_dir else None

    def save_checkpoint(self) -> None:
        if self.run_dir is None or not dist.is_main_process():
            return
        tensors = {f"model/{k}": v for k, v in self.task.state_dict().items()}
        opt_tensors, groups = optimizer_tensors(self.optimizer)
        tensors.update(opt_tensors)
        tensors.update(rng_tensors())
        save_tensors(self.checkpoint_path, tensors, {"kind": self.kind, "config": self.config_json,
                                                     "position": self.state.to_json(), "optim_groups": groups})

    def resume(self, path: Path) -> None:
        tensors, meta = read_checkpoint(path, device="cpu")
        load_state_strict(self.task, sub_dict(tensors, "model/"), f"checkpoint {path}")
        load_optimizer(self.optimizer, tensors, meta["optim_groups"])
        restore_rng(tensors)
        self.state = TrainState(**json.loads(meta["position"]))

    # ------------------------------------------------------------------ the loop
    def _set_schedule(self, step: int) -> dict[str, float]:
        values = {k: float(v[min(step, len(v) - 1)]) for k, v in self.schedules.items()}
        for group in self.optimizer.param_groups:
            if "lr" in values:
                group["lr"] = values["lr"] * group.get("lr_scale", 1.0)
            if "weight_decay" in values and not group.get("fixed_weight_decay", False):
                group["weight_decay"] = values["weight_decay"]
        return values

    def _to_device(self, batch):
        if torch.is_tensor(batch):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(v) for v in batch)
        return batch

    def _handle_signal(self, signum, frame):  # noqa: ARG002
        self._stop_signal = signum

    def fit(self, make_loader: Callable[[int, int], object]) -> TrainState:
        """`make_loader(epoch, start_step)` returns the iterable of batches for that epoch."""
        total = self.epochs * self.steps_per_epoch
        old_handlers = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with progress_bar(total, disabled=self.quiet or not dist.is_main_process()) as bar:
                bar.advance(self.state.global_step)
                while self.state.epoch < self.epochs:
                    self._run_epoch(make_loader(self.state.epoch, self.state.step_in_epoch), bar, total)
                    if self._stop_signal is not None:
                        break
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
        if self._stop_signal is not None:
            self.save_checkpoint()
            raise KeyboardInterrupt(f"stopped by signal {self._stop_signal}; checkpoint saved")
        return self.state

    def _run_epoch(self, loader, bar, total: int) -> None:
        epoch = self.state.epoch
        self.task.train()
        sums: dict[str, float] = {}
        count = 0
        t_last, images = time.perf_counter(), 0
        for batch in loader:
            batch = self._to_device(batch)
            ctx = StepContext(epoch, self.state.global_step, total, self._set_schedule(self.state.global_step))
            metrics = self._step(batch, ctx)
            images += _batch_size(batch) * dist.world_size()
            self.state.step_in_epoch += 1
            self.state.global_step += 1
            count += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            if self.state.global_step % self.log_every_steps == 0 or self.state.step_in_epoch == self.steps_per_epoch:
                now = time.perf_counter()
                metrics["images_per_s"] = images / max(now - t_last, 1e-9)
                t_last, images = now, 0
                if self.log:
                    self.log.step({"epoch": epoch, "step": self.state.global_step, **ctx.values, **metrics})
            bar.update(metrics, ctx.values, epoch, self.epochs)
            if self.checkpoint_every_steps and self.state.global_step % self.checkpoint_every_steps == 0:
                self.save_checkpoint()
            if self._stop_signal is not None:
                return
        summary = {k: v / max(count, 1) for k, v in sums.items()}
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        if self.epoch_end_hook is not None:
            summary.update(self.epoch_end_hook(epoch))
        if hasattr(self.task, "epoch_metrics"):
            summary.update(self.task.epoch_metrics())
        if self.log:
            self.log.epoch({"epoch": epoch, **summary})
        self.save_checkpoint()

    def _step(self, batch, ctx: StepContext) -> dict[str, float]:
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            loss, metrics = self.task.training_step(batch, ctx)
        if not math.isfinite(loss.item()):
            raise NonFiniteLoss(
                f"the loss became {loss.item()} at step {ctx.step} (epoch {ctx.epoch}); the last good checkpoint "
                f"is kept in {self.run_dir}. Lower the learning rate or use fp32.")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if dist.is_distributed():
            dist.average_gradients(self.trainable)
        if self.clip_grad > 0:
            metrics["grad_norm"] = clip_per_parameter(self.trainable, self.clip_grad)
        if hasattr(self.task, "frozen_parameters"):
            for p in self.task.frozen_parameters(ctx):
                p.grad = None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if hasattr(self.task, "after_step"):
            with torch.no_grad():
                self.task.after_step(ctx)
        return metrics


def _batch_size(batch) -> int:
    if isinstance(batch, dict):
        for key in ("views", "image", "images"):
            if key in batch:
                v = batch[key]
                return len(v[0]) if isinstance(v, (list, tuple)) else len(v)
        return len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return len(batch[0])
    return len(batch)
