"""Collapse monitors: is the teacher's output still telling images apart?

Self-distillation collapses in two ways (Caron et al. 2021, §5.3 and Fig. 7), and the three numbers
logged here separate them from a healthy run:
- uniform: every prototype equally likely for every image. Per-image entropy → log K and the mean
  output → uniform, so KL(mean ‖ uniform) → 0 (too much centring, or a teacher temperature too high);
- one prototype wins: every image gets the same one-hot. The mean output is that one-hot too, so
  KL(mean ‖ uniform) → log K (and per-image entropy → 0; too much sharpening);
- healthy: sharp per image (low entropy) yet spread over many prototypes across images (KL well below
  log K, well above 0).
The centre norm is logged alongside: a centre that runs away is often the first visible symptom.

A method can report these itself with `collapse_metrics() -> dict[str, float]`: the values for its
last training step under the keys `teacher_entropy`, `teacher_kl_uniform` (nats) and
`teacher_prototypes` (K, to judge them against log K); otherwise they are computed from the inputs of every `DINOLoss` in the
task, through a forward hook that reads its teacher logits (no gradient, no random numbers).
"""
from __future__ import annotations

import math

import torch
from torch import nn

ENTROPY, KL_UNIFORM, NUM_PROTOTYPES = "teacher_entropy", "teacher_kl_uniform", "teacher_prototypes"
COLLAPSE_KEYS = (ENTROPY, KL_UNIFORM)
# Fractions of log K. Healthy DINO runs sit far from both ends; these only fire near a true collapse.
UNIFORM_ENTROPY, UNIFORM_KL = 0.9, 0.05
ONE_PROTOTYPE_KL = 0.9


@torch.no_grad()
def collapse_stats(probs: torch.Tensor) -> dict[str, float]:
    """probs (N, K), rows summing to 1 → mean per-row entropy and KL(mean row ‖ uniform), in nats."""
    p = probs.float()
    k = p.shape[-1]
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
    mean = p.mean(0)
    kl = (mean * (mean.clamp_min(1e-30) * k).log()).sum()
    return {ENTROPY: float(entropy), KL_UNIFORM: float(kl), NUM_PROTOTYPES: float(k)}


class CollapseMonitor:
    """Collects the collapse statistics of each training step and warns at epoch ends."""

    def __init__(self, task: nn.Module):
        from glsd_cli.losses.dino import DINOLoss

        self.task = task
        self._pending: list[dict[str, float]] = []
        self.num_prototypes: int | None = None
        # Every `center` buffer in use (a DINO loss with Sinkhorn-Knopp targets has an unused one).
        self._centers = [(name, buf) for name, buf in task.named_buffers() if name.rsplit(".", 1)[-1] == "center"
                         and getattr(task.get_submodule(name.rpartition(".")[0]), "centering", "ema") != "sinkhorn"]
        self._handles = []
        if not hasattr(task, "collapse_metrics"):
            for module in task.modules():
                if isinstance(module, DINOLoss):
                    self._handles.append(module.register_forward_hook(self._on_dino_loss, with_kwargs=True))
                    break  # the global loss is the one to watch; per-layer losses share its targets

    def _on_dino_loss(self, module, args, kwargs, output) -> None:  # noqa: ARG002
        teacher = kwargs.get("teacher_logits", args[1] if len(args) > 1 else None)
        temp = kwargs.get("teacher_temp", args[2] if len(args) > 2 else None)
        if teacher is None or temp is None:
            return
        with torch.no_grad():
            probs = torch.cat(module.teacher_targets([t.detach() for t in teacher], temp))
            self._pending.append(collapse_stats(probs))

    def step_metrics(self) -> dict[str, float]:
        """The statistics of the step's forward passes, averaged over its micro-batches."""
        out: dict[str, float] = {}
        if hasattr(self.task, "collapse_metrics"):
            out.update(self.task.collapse_metrics())
        elif self._pending:
            for key in self._pending[0]:
                out[key] = sum(d[key] for d in self._pending) / len(self._pending)
        self._pending.clear()
        if NUM_PROTOTYPES in out:  # a constant: kept here for the warning, not logged every step
            self.num_prototypes = int(out.pop(NUM_PROTOTYPES))
        return out

    def center_norms(self) -> dict[str, float]:
        """Norm of every `center` buffer (the same on all processes: centres are all-reduced)."""
        out: dict[str, float] = {}
        for name, buf in self._centers:
            module = name.rsplit(".", 1)[0] if "." in name else ""
            key = "center_norm" if module in ("", "dino_loss") else f"center_norm_{module.replace('.', '_')}"
            out[key] = float(buf.float().norm())
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def collapse_warning(summary: dict[str, float], num_prototypes: int | None, epoch: int,
                     history: list[dict[str, float]] | None = None) -> str | None:
    """A one-paragraph warning when an epoch's mean statistics look collapsed, or when they have been
    drifting toward a collapse over the last epochs (`history`: earlier epochs' summaries, oldest first),
    else None."""
    if num_prototypes is None or not all(k in summary for k in COLLAPSE_KEYS):
        return None
    log_k = math.log(max(num_prototypes, 2))
    entropy, kl = summary[ENTROPY], summary[KL_UNIFORM]
    numbers = f"entropy {entropy:.3f} and KL(mean ‖ uniform) {kl:.3f} nats, of at most log K = {log_k:.3f}"
    if entropy > UNIFORM_ENTROPY * log_k and kl < UNIFORM_KL * log_k:
        return (f"collapse warning (epoch {epoch}): the teacher's outputs are nearly uniform ({numbers}): "
                "every prototype is equally likely for every image. Lower method.loss.teacher_temp or "
                "its warm-up start, or lower optim.lr.")
    if kl > ONE_PROTOTYPE_KL * log_k:
        return (f"collapse warning (epoch {epoch}): one prototype wins for nearly every image ({numbers}). "
                "Raise method.loss.teacher_temp, keep the centring on (method.loss.center_momentum < 1), "
                "or lower optim.lr.")
    return _drift_warning(summary, history or [], log_k, epoch)


# Slow drift: over the last DRIFT_EPOCHS epochs (this one included) a statistic rose by at least
# DRIFT_SLOPE × log K per epoch (least-squares slope) and now stands past DRIFT_LEVEL × log K. A healthy
# run's entropy falls as the teacher sharpens and its KL settles well below half of log K; a run
# drifting to uniform outputs climbs through those levels for many epochs before the collapse
# thresholds above fire (tiny-dino on synthetic-scenes for 20 epochs: entropy 0.06 → 4.39 of 5.55,
# a few percent of log K per epoch, never past 0.9 log K; issue 20).
DRIFT_EPOCHS, DRIFT_SLOPE, DRIFT_LEVEL = 4, 0.03, 0.5


def _slope(values: list[float]) -> float:
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values)) / sum((x - mean_x) ** 2 for x in range(n))


def _drift_warning(summary: dict[str, float], history: list[dict[str, float]], log_k: float, epoch: int) -> str | None:
    # Earlier epochs as logged (results.csv rows hold strings; an epoch without the statistics is skipped).
    logged = [{k: float(h[k]) for k in COLLAPSE_KEYS} for h in history if all(h.get(k) not in (None, "") for k in COLLAPSE_KEYS)]
    recent = logged[-(DRIFT_EPOCHS - 1):] + [summary]
    if len(recent) < DRIFT_EPOCHS:
        return None
    for key, toward, advice in (
            (ENTROPY, "uniform outputs", "Lower optim.lr, raise optim.momentum_teacher (a slower teacher), or use "
                                         "method.loss.centering=sinkhorn."),
            (KL_UNIFORM, "one prototype for every image", "Raise method.loss.teacher_temp, lower optim.lr, or use "
                                                          "method.loss.centering=sinkhorn.")):
        series = [h[key] / log_k for h in recent]
        if _slope(series) >= DRIFT_SLOPE and series[-1] >= DRIFT_LEVEL:
            trail = " → ".join(f"{h[key]:.2f}" for h in recent)
            name = "entropy" if key == ENTROPY else "KL(mean ‖ uniform)"
            return (f"collapse warning (epoch {epoch}): the teacher is drifting toward {toward}: its {name} rose "
                    f"over the last {len(recent)} epochs ({trail} nats, log K = {log_k:.2f}). {advice}")
    return None
