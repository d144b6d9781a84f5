"""The one training loop: pre-training, linear evaluation and fine-tuning all run through it.

Per optimiser step (`_step`): scheduled lr / weight decay → for each of `accum_steps` micro-batches,
`task.training_step` under autocast and backward → gradient average over processes → gradient norms →
ONE device vector of the flags every process must agree on (non-finite loss or gradient, stop signal,
unreadable images) and the step's metrics, all-reduced in one call, of which only the flags are read
to the host → per-parameter clipping (DINO) → drop `task.frozen_parameters` → optimiser step →
`task.after_step` (EMA, centres). The metrics stay on the device, summed per epoch there, and are read
when a log line is written (every `log_every_steps`): a step waits for the device once, not once per
number. Logs metrics.jsonl every N steps, results.csv and results.png every epoch; checkpoints
atomically at epoch ends, every N steps and on SIGINT/SIGTERM; resumes exactly.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from glsd_cli.data.base import UNREADABLE_SAMPLE, too_many_unreadable
from glsd_cli.engine import distributed as dist
from glsd_cli.engine.batching import PreparedBatches, batch_size, clear_worker_errors, grouped
from glsd_cli.engine.checkpoint import (CHECKPOINT_NAME, load_optimizer, load_state_strict, optimizer_tensors,
                                        read_checkpoint, remove_stale_temporaries, restore_rng, rng_tensors,
                                        save_tensors, sub_dict)
from glsd_cli.engine.metrics import MetricsLog, console, progress_bar, read_results
from glsd_cli.engine.monitors import epoch_collapse_warnings
from glsd_cli.engine.optim import clip_gradients, grad_norms
from glsd_cli.engine.precision import autocast_dtype
from glsd_cli.engine.task import ScheduledValues, StepContext, StepOutput, TrainingTask
from glsd_cli.errors import CheckpointError, DataError, GlsdError

# With run.on_nonfinite = "skip", this many skipped steps in a row means the run is not recovering.
MAX_CONSECUTIVE_SKIPS = 10
# One interrupt often arrives twice within moments (the terminal and torchrun both pass on Ctrl-C,
# SLURM and torchrun both pass on SIGTERM): only a signal later than this means "leave now".
REPEATED_SIGNAL_S = 3.0


class NonFiniteLoss(GlsdError):
    pass


@dataclass
class TrainState:
    """The position in training; saved as the checkpoint's `position`."""

    epoch: int = 0          # epoch to run next (or the one in progress)
    step_in_epoch: int = 0  # optimiser steps of `epoch` already done
    global_step: int = 0

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


@dataclass
class RunTally:
    """Counters and the running sums of the epoch in progress; saved as the checkpoint's `run_stats`,
    so that a resumed epoch's results.csv row equals an uninterrupted one."""

    skipped_steps: int = 0              # non-finite steps skipped in the whole run
    consecutive_skips: int = 0
    epoch_sums: dict[str, float] = field(default_factory=dict)
    epoch_steps: int = 0                # steps summed in epoch_sums (skipped steps excluded)
    epoch_skipped: int = 0
    epoch_images: int = 0               # images read this epoch, all processes
    epoch_unreadable: int = 0           # of which unreadable (replaced by the next readable image)

    def new_epoch(self) -> None:
        self.epoch_sums, self.epoch_steps, self.epoch_skipped = {}, 0, 0
        self.epoch_images = self.epoch_unreadable = 0

    @classmethod
    def from_json(cls, text: str | None) -> "RunTally":
        return cls(**json.loads(text)) if text else cls()


@dataclass
class Trainer:
    """Runs a `TrainingTask` (engine/task.py) over epochs."""

    task: TrainingTask
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
    accum_steps: int = 1                     # micro-batches per optimiser step
    on_nonfinite: str = "stop"               # "stop" | "skip"
    max_bad_fraction: float | None = None    # of unreadable images per epoch, None: no check
    plots: bool = True
    # Finishes a host batch on the device before the step (e.g. DevicePhotometric.prepare), one batch
    # ahead on a GPU (engine/batching.PreparedBatches); then the rest is moved to the device as it is.
    prepare_batch: Callable[[dict], dict] | None = None

    def __post_init__(self):
        self.dtype = autocast_dtype(self.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.log = MetricsLog(self.run_dir) if (self.run_dir and dist.is_main_process()) else None
        self.tally = RunTally()
        # This epoch's metric sums on the device (float64, keys `_sum_keys`), folded into
        # `tally.epoch_sums` when a checkpoint is written or the epoch ends.
        self._sums: torch.Tensor | None = None
        self._sum_keys: tuple[str, ...] = ()
        unknown = set(self.schedules) - set(ScheduledValues.__dataclass_fields__)
        if unknown:
            raise ValueError(f"schedules {sorted(unknown)} are not fields of ScheduledValues")
        self._stop_signal: int | None = None
        self._stop_time = 0.0
        self._stopping = False
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / CHECKPOINT_NAME if self.run_dir else None

    def save_checkpoint(self) -> None:
        """Rank 0 writes; every rank must call this (the RNG states of all ranks are gathered)."""
        if self.run_dir is None:
            return
        rng = rng_tensors()
        self._fold_sums()
        if not dist.is_main_process():
            return
        tensors = {f"model/{k}": v for k, v in self.task.state_dict().items()}
        opt_tensors, groups = optimizer_tensors(self.optimizer)
        tensors.update(opt_tensors)
        tensors.update(rng)
        meta = {"kind": self.kind, "config": self.config_json, "position": self.state.to_json(),
                "optim_groups": groups, "run_stats": json.dumps(asdict(self.tally))}
        if self.scaler is not None:
            meta["grad_scaler"] = json.dumps(self.scaler.state_dict())
        try:
            save_tensors(self.checkpoint_path, tensors, meta)
        except OSError as e:
            raise CheckpointError(f"could not write the checkpoint {self.checkpoint_path} ({e.strerror or e}); "
                                  "the previous one is intact") from None

    def resume(self, path: Path) -> None:
        tensors, meta = read_checkpoint(path, device="cpu")
        load_state_strict(self.task, sub_dict(tensors, "model/"), f"checkpoint {path}")
        load_optimizer(self.optimizer, tensors, meta["optim_groups"])
        restore_rng(tensors)
        self.state = TrainState(**json.loads(meta["position"]))
        self.tally = RunTally.from_json(meta.get("run_stats"))
        if self.scaler is not None and "grad_scaler" in meta:
            self.scaler.load_state_dict(json.loads(meta["grad_scaler"]))
        if self.log:
            self.log.truncate_after(self.state.global_step)
            remove_stale_temporaries(self.checkpoint_path)

    # ------------------------------------------------------------------ the loop
    def _set_schedule(self, step: int) -> ScheduledValues:
        values = ScheduledValues(**{k: float(v[min(step, len(v) - 1)]) for k, v in self.schedules.items()})
        for group in self.optimizer.param_groups:
            group["lr"] = values.lr * group.get("lr_scale", 1.0)
            if values.weight_decay is not None and not group.get("fixed_weight_decay", False):
                group["weight_decay"] = values.weight_decay
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
        now = time.monotonic()
        if self._stop_signal is None:
            self._stop_signal, self._stop_time = signum, now
        elif now - self._stop_time > REPEATED_SIGNAL_S:  # a second Ctrl-C: leave now, last checkpoint intact
            raise KeyboardInterrupt(f"second signal {signum}: stopped without saving")

    def fit(self, make_loader: Callable[[int, int], Iterable]) -> TrainState:
        """`make_loader(epoch, start_step)` returns the (micro-)batches of that epoch from `start_step` on."""
        total = self.epochs * self.steps_per_epoch
        old_handlers = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                old_handlers[s] = signal.signal(s, self._handle_signal)
        try:
            with progress_bar(total, disabled=self.quiet or not dist.is_main_process()) as bar:
                bar.advance(self.state.global_step)
                while self.state.epoch < self.epochs and not self._stopping:
                    self._run_epoch(make_loader(self.state.epoch, self.state.step_in_epoch), bar, total)
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
        if self._stopping:
            self.save_checkpoint()
            dist.barrier()  # no process exits (and makes torchrun kill rank 0) before the save is done
            raise KeyboardInterrupt(f"stopped by signal {self._stop_signal or 'on another process'}; "
                                    f"checkpoint saved at step {self.state.global_step}")
        return self.state

    def _run_epoch(self, loader: Iterable, bar, total: int) -> None:
        epoch = self.state.epoch
        self.task.train()
        t_last, images = time.perf_counter(), 0
        batches = clear_worker_errors(loader)
        prepared = PreparedBatches(batches, self.prepare_batch, self.device) if self.prepare_batch else None
        for micro_batches in grouped(prepared or batches, self.accum_steps):
            step = self.state.global_step
            ctx = StepContext(epoch, step, total, self._set_schedule(step))
            metrics, step_images, skipped = self._step(micro_batches, ctx,
                                                       prepared.prepare_next if prepared else None)
            images += step_images
            self.state.step_in_epoch += 1
            self.state.global_step += 1
            logged = None
            if (self.state.global_step % self.log_every_steps == 0 or self.state.step_in_epoch == self.steps_per_epoch
                    or skipped):  # a skipped step is always on record
                now = time.perf_counter()
                logged = dict(zip(sorted(metrics), self._vector(metrics).tolist())) if metrics else {}
                if skipped:
                    logged["nonfinite_skipped"] = 1.0
                logged["images_per_s"] = images / max(now - t_last, 1e-9)
                t_last, images = now, 0
                if self.log:
                    self.log.step({"epoch": epoch, "step": self.state.global_step, **ctx.values.logged(), **logged})
            bar.update(logged, ctx.values, epoch, self.epochs)
            if self.checkpoint_every_steps and self.state.global_step % self.checkpoint_every_steps == 0:
                self.save_checkpoint()
            if self._stopping:
                return
        self._end_epoch(epoch)

    def _end_epoch(self, epoch: int) -> None:
        self._fold_sums()
        t = self.tally
        summary = {k: v / max(t.epoch_steps, 1) for k, v in t.epoch_sums.items()}
        summary.update(skipped_steps=t.epoch_skipped, unreadable_images=t.epoch_unreadable)
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        t.new_epoch()
        if self.epoch_end_hook is not None:
            # The monitor must not move the training RNG (its data loader draws a seed from it).
            devices = [torch.cuda.current_device()] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                summary.update(self.epoch_end_hook(epoch))
        summary.update(self.task.epoch_metrics())
        if self.log:
            history = [row for row in read_results(self.run_dir) if int(row["epoch"]) < epoch]  # survives resume
            task = self.task
            for warning in epoch_collapse_warnings(summary, epoch, history, task.num_prototypes,
                                                   task.dense_prototypes, task.sinkhorn_targets):
                console.print(f"[bold yellow]{warning}")  # shown even with --quiet: it may save days of compute
            self.log.epoch({"epoch": epoch, **summary})
            if self.plots:
                self._draw()
        self.save_checkpoint()

    def _draw(self) -> None:
        from glsd_cli.engine.plots import draw_results

        try:
            draw_results(self.run_dir)
        except ImportError as e:  # matplotlib is a dependency; a broken install must not stop training
            self.plots = False
            console.print(f"[yellow]results.png not drawn: {e}")

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def train_step(self, micro_batches: list, step: int, epoch: int = 0) -> dict[str, torch.Tensor]:
        """One optimiser step outside `fit` (benchmarks, tests): schedules at `step`, then `_step`.
        Returns the step's metrics as device tensors (empty for a skipped step)."""
        if self.prepare_batch is not None:
            micro_batches = [self.prepare_batch(b) for b in micro_batches]
        ctx = StepContext(epoch, step, self.epochs * self.steps_per_epoch, self._set_schedule(step))
        return self._step(micro_batches, ctx)[0]

    def _step(self, micro_batches: list, ctx: StepContext, before_wait: Callable[[], None] | None = None
              ) -> tuple[dict[str, torch.Tensor], int, bool]:
        """One optimiser step over its micro-batches; returns its metrics (device tensors, averaged
        over micro-batches and processes), the images it used, and whether it was skipped.
        `before_wait` runs once the step's work is queued, just before the host waits for the device
        (the next batch's preparation)."""
        self.optimizer.zero_grad(set_to_none=True)
        outputs: list[StepOutput] = []
        unreadable, images = 0, 0
        for batch in micro_batches:
            if isinstance(batch, dict) and "unreadable" in batch:
                unreadable += int(batch["unreadable"].sum())  # a CPU tensor from the loader: no device wait
            images += batch_size(batch)
            with self._autocast():
                out = self.task.training_step(self._to_device(batch), ctx)
            # Every process runs every forward and backward, finite or not: losses may hold
            # collectives (all-gathers), and a process leaving early would leave the others waiting.
            scaled = out.loss / len(micro_batches)
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            outputs.append(out)
        metrics = {k: torch.stack([o.metrics[k].double() for o in outputs]).mean() for k in outputs[0].metrics}
        loss_ok = torch.stack([torch.isfinite(o.loss.detach()).all() for o in outputs]).all()
        # Averaged before the check: a non-finite gradient anywhere reaches every process, so all agree.
        dist.average_gradients(self.trainable)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads, norms = grad_norms(self.trainable, self.device)
        # The scaler handles fp16 overflow itself (it skips the step and lowers the scale).
        grads_ok = torch.isfinite(norms).all() if self.scaler is None else torch.ones((), dtype=torch.bool,
                                                                                     device=norms.device)
        if before_wait is not None:
            before_wait()
        flags, metrics = self._agree([~loss_ok, ~grads_ok], [self._stop_signal is not None, unreadable, images],
                                     metrics)
        bad_loss, bad_grads, stop, unreadable, images = flags
        self._stopping = stop > 0
        self._count_images(int(unreadable), int(images))
        if bad_loss or bad_grads:
            self._nonfinite_step(ctx, "loss" if bad_loss else "gradient")
            return {}, int(images), True
        if self.clip_grad > 0:
            metrics["grad_norm"] = clip_gradients(grads, norms, self.clip_grad)
        for p in self.task.frozen_parameters(ctx):
            p.grad = None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        with torch.no_grad():
            self.task.after_step(ctx, outputs)
        self.tally.consecutive_skips = 0
        self.tally.epoch_steps += 1
        self._add_to_sums(metrics)
        return metrics, int(images), False

    def _agree(self, device_flags: list[torch.Tensor], host_flags: list[float],
               metrics: dict[str, torch.Tensor]) -> tuple[list[float], dict[str, torch.Tensor]]:
        """Flags summed and metrics averaged over processes in ONE all-reduce of one device vector, of
        which only the flags come back to the host: the step's one wait for the device."""
        keys = sorted(metrics)
        parts = [torch.stack(device_flags).double()]
        if dist.is_distributed():  # alone, the host's own flags need no trip through the device
            parts.append(torch.tensor(host_flags, dtype=torch.float64).to(self.device, non_blocking=True))
        vec = torch.cat(parts + ([self._vector(metrics)] if keys else []))
        if dist.is_distributed():
            vec = dist.all_reduce_sum(vec)
            vec[len(device_flags) + len(host_flags):] /= dist.world_size()
        n_flags = len(device_flags) + (len(host_flags) if dist.is_distributed() else 0)
        flags = vec[:n_flags].tolist() + ([] if dist.is_distributed() else [float(f) for f in host_flags])
        averaged = dict(zip(keys, vec[n_flags:].unbind())) if keys else {}
        return flags, averaged

    @staticmethod
    def _vector(metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        """The metrics as one float64 device vector, in sorted key order."""
        return torch.stack([metrics[k].double() for k in sorted(metrics)])

    def _add_to_sums(self, metrics: dict[str, torch.Tensor]) -> None:
        keys = tuple(sorted(metrics))
        if self._sums is not None and keys != self._sum_keys:
            self._fold_sums()
        if self._sums is None:  # continue from the host sums, so additions happen in the same order
            self._sum_keys = keys
            self._sums = torch.tensor([self.tally.epoch_sums.get(k, 0.0) for k in keys], dtype=torch.float64,
                                      device=self.device)
        self._sums += self._vector(metrics)

    def _fold_sums(self) -> None:
        """Bring the device sums into `tally.epoch_sums` (before a checkpoint and at the epoch's end)."""
        if self._sums is not None:
            self.tally.epoch_sums.update(zip(self._sum_keys, self._sums.tolist()))
            self._sums = None

    def _count_images(self, unreadable: int, images: int) -> None:
        t = self.tally
        t.epoch_unreadable += unreadable
        t.epoch_images += images
        if self.max_bad_fraction is None:
            return
        if too_many_unreadable(t.epoch_unreadable, t.epoch_images, self.max_bad_fraction,
                               min(UNREADABLE_SAMPLE, self.steps_per_epoch * images)):
            raise DataError(f"{t.epoch_unreadable} of the {t.epoch_images} images read in epoch {self.state.epoch} "
                            f"were unreadable (more than run.max_bad_image_fraction = {self.max_bad_fraction:.1%}); "
                            "fix or remove the broken files, or raise that fraction.")

    def _nonfinite_step(self, ctx: StepContext, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        where = f"at step {ctx.step} (epoch {ctx.epoch})"
        if self.on_nonfinite == "stop":
            kept = f"the last good checkpoint is kept in {self.run_dir}. " if self.run_dir else ""
            raise NonFiniteLoss(f"the {what} became non-finite {where}; {kept}Lower optim.lr, use "
                                "run.precision=fp32, or set run.on_nonfinite=skip to skip such steps.")
        t = self.tally
        t.skipped_steps += 1
        t.epoch_skipped += 1
        t.consecutive_skips += 1
        if t.consecutive_skips > MAX_CONSECUTIVE_SKIPS:
            raise NonFiniteLoss(f"{t.consecutive_skips} steps in a row had a non-finite {what} (last {where}); "
                                "the run is not recovering. Lower optim.lr or use run.precision=fp32.")
        if self.log:
            console.print(f"[yellow]non-finite {what} {where}: step skipped ({t.skipped_steps} so far)")
