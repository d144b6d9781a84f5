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

Methods report them in their step metrics, computed from the targets they already made
(`collapse_stats`, or `CollapseTally` for targets made in parts); the loop averages them per epoch and
`collapse_warning` judges the epoch. GLSD's dense head is watched the same way, under keys with the
prefix `DENSE` (its teacher targets over all patch tokens of the global views).
"""
from __future__ import annotations

import math

import torch

ENTROPY, KL_UNIFORM = "teacher_entropy", "teacher_kl_uniform"
COLLAPSE_KEYS = (ENTROPY, KL_UNIFORM)
DENSE = "dense_"  # key prefix of the dense head's statistics
# Fractions of log K. Healthy DINO runs sit far from both ends; these only fire near a true collapse.
UNIFORM_ENTROPY, UNIFORM_KL = 0.9, 0.05
ONE_PROTOTYPE_KL = 0.9


@torch.no_grad()
def collapse_stats(probs: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """probs (N, K), rows summing to 1 → mean per-row entropy and KL(mean row ‖ uniform), in nats, as
    0-d tensors on probs' device (read when a log line is written, not every step)."""
    tally = CollapseTally()
    tally.add(probs)
    return tally.stats(prefix)


class CollapseTally:
    """`collapse_stats` of rows that arrive in parts (the local loss's chunks): sums in float32, with
    no float32 copy of a part (a dense head's targets can be B x tokens x 65536)."""

    def __init__(self) -> None:
        self.entropy_sum: torch.Tensor | None = None
        self.mass: torch.Tensor | None = None
        self.rows = 0

    @torch.no_grad()
    def add(self, probs: torch.Tensor) -> None:
        entropy = torch.special.entr(probs).sum(dtype=torch.float32)  # -p log p, 0 at p = 0
        mass = probs.sum(0, dtype=torch.float32)
        self.entropy_sum = entropy if self.entropy_sum is None else self.entropy_sum + entropy
        self.mass = mass if self.mass is None else self.mass + mass
        self.rows += probs.shape[0]

    def stats(self, prefix: str = "") -> dict[str, torch.Tensor]:
        if self.mass is None:
            raise ValueError("no rows were added")
        mean = self.mass / self.rows
        kl = (mean * (mean.clamp_min(1e-30) * mean.numel()).log()).sum()
        return {prefix + ENTROPY: self.entropy_sum / self.rows, prefix + KL_UNIFORM: kl}


def collapse_warning(summary: dict[str, float], num_prototypes: int | None, epoch: int,
                     history: list[dict[str, float]] | None = None, prefix: str = "",
                     sinkhorn: bool = False) -> str | None:
    """A one-paragraph warning when an epoch's mean statistics look collapsed, or when they have been
    drifting toward a collapse over the last epochs (`history`: earlier epochs' summaries, oldest first),
    else None. `prefix`: "" for the (global) head, `DENSE` for the dense head. `sinkhorn`: the targets
    already come from Sinkhorn-Knopp, so the advice does not suggest it (nor DINO's centre)."""
    keys = (prefix + ENTROPY, prefix + KL_UNIFORM)
    if num_prototypes is None or not all(k in summary for k in keys):
        return None
    log_k = math.log(max(num_prototypes, 2))
    entropy, kl = summary[keys[0]], summary[keys[1]]
    outputs = "dense (patch-token) outputs" if prefix == DENSE else "outputs"
    numbers = f"entropy {entropy:.3f} and KL(mean ‖ uniform) {kl:.3f} nats, of at most log K = {log_k:.3f}"
    if entropy > UNIFORM_ENTROPY * log_k and kl < UNIFORM_KL * log_k:
        return (f"collapse warning (epoch {epoch}): the teacher's {outputs} are nearly uniform ({numbers}): "
                "every prototype is equally likely for every input. Lower method.loss.teacher_temp or "
                "its warm-up start, or lower optim.lr.")
    if kl > ONE_PROTOTYPE_KL * log_k:
        centring = "" if sinkhorn else (", keep the centring on (method.loss.center_momentum < 1) or use "
                                        "method.loss.centering=sinkhorn")
        return (f"collapse warning (epoch {epoch}): one prototype wins for nearly every input in the teacher's "
                f"{outputs} ({numbers}). Raise method.loss.teacher_temp{centring}, or lower optim.lr.")
    return _drift_warning(summary, history or [], log_k, epoch, keys, outputs, sinkhorn)


def epoch_collapse_warnings(summary: dict[str, float], epoch: int, history: list[dict],
                            num_prototypes: int | None, dense_prototypes: int | None, sinkhorn: bool) -> list[str]:
    """Every collapse warning of one epoch: the global head's and, when the run has one, the dense
    head's (`None` prototypes: no such head). What the Trainer prints at an epoch's end, and what a
    replay of a finished run's results.csv finds (bench/common.py)."""
    return [warning for prefix, k in (("", num_prototypes), (DENSE, dense_prototypes))
            if (warning := collapse_warning(summary, k, epoch, history, prefix, sinkhorn))]


# Slow drift: over the last DRIFT_EPOCHS epochs (this one included) a statistic rose by at least
# DRIFT_SLOPE × log K per epoch (least-squares slope) and now stands past DRIFT_LEVEL × log K. A healthy
# run's entropy falls as the teacher sharpens and its KL settles well below half of log K; a run
# drifting to uniform outputs climbs through those levels for many epochs before the collapse
# thresholds above fire (tiny-dino on synthetic-scenes for 20 epochs: entropy 0.06 → 4.39 of 5.55,
# a few percent of log K per epoch, never past 0.9 log K; issue 20). A drift is still under way: the
# last epoch itself rose by DRIFT_STILL × log K at least. The scenes-* presets' Sinkhorn targets rise
# from the first epoch's 3.9 nats to a plateau near 4.9 (3.92 → 4.71 → 4.89 → 4.90); over 50 epochs
# such a run sharpened to 2.47 (README "Dense evaluation"). A plateau after a start-up rise is no
# drift; one that reaches 0.9 log K is caught by the uniform threshold above.
DRIFT_EPOCHS, DRIFT_SLOPE, DRIFT_LEVEL, DRIFT_STILL = 4, 0.03, 0.5, 0.01


def _slope(values: list[float]) -> float:
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values)) / sum((x - mean_x) ** 2 for x in range(n))


def _drift_warning(summary: dict[str, float], history: list[dict[str, float]], log_k: float, epoch: int,
                   keys: tuple[str, str], outputs: str, sinkhorn: bool) -> str | None:
    # Earlier epochs as logged (results.csv rows hold strings; an epoch without the statistics is skipped).
    logged = [{k: float(h[k]) for k in keys} for h in history if all(h.get(k) not in (None, "") for k in keys)]
    recent = logged[-(DRIFT_EPOCHS - 1):] + [summary]
    if len(recent) < DRIFT_EPOCHS:
        return None
    entropy_key, kl_key = keys
    or_sinkhorn = "" if sinkhorn else ", or use method.loss.centering=sinkhorn"
    for key, toward, advice in (
            (entropy_key, "uniform outputs",
             f"Lower optim.lr or raise optim.momentum_teacher (a slower teacher){or_sinkhorn}."),
            (kl_key, "one prototype for every input", f"Raise method.loss.teacher_temp or lower optim.lr{or_sinkhorn}.")):
        series = [h[key] / log_k for h in recent]
        # Still climbing: this epoch is the highest of the window and rose over the one before (a rise
        # at the start of training that has turned or levelled off, as Sinkhorn's warm-up makes on
        # scenes-dino, is no drift).
        still_rising = series[-1] >= max(series) and series[-1] - series[-2] >= DRIFT_STILL
        if _slope(series) >= DRIFT_SLOPE and series[-1] >= DRIFT_LEVEL and still_rising:
            trail = " → ".join(f"{h[key]:.2f}" for h in recent)
            name = "entropy" if key == entropy_key else "KL(mean ‖ uniform)"
            return (f"collapse warning (epoch {epoch}): the teacher's {outputs} are drifting toward {toward}: "
                    f"the {name} rose over the last {len(recent)} epochs ({trail} nats, log K = {log_k:.2f}). {advice}")
    return None
