"""Per-iteration schedules, precomputed for the whole run (DINO `utils.cosine_scheduler`)."""
from __future__ import annotations

import math

import numpy as np


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int,
                    warmup_epochs: float = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from `warmup_start` to `base`, then a half cosine from `base` to `final`.

    value(i) = final + (base - final)·(1 + cos(π·i/n))/2 for i counted after the warm-up (n = its length).
    """
    total = epochs * steps_per_epoch
    warm = min(int(round(warmup_epochs * steps_per_epoch)), total)
    warmup = np.linspace(warmup_start, base, warm) if warm > 0 else np.array([])
    n = total - warm
    i = np.arange(n)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / max(n, 1)))
    return np.concatenate([warmup, cosine])


def teacher_temp_schedule(start: float, final: float, warmup_epochs: int, epochs: int,
                          steps_per_epoch: int) -> np.ndarray:
    """Linear from `start` to `final` over the warm-up epochs, then constant (per iteration)."""
    total = epochs * steps_per_epoch
    warm = min(warmup_epochs * steps_per_epoch, total)
    return np.concatenate([np.linspace(start, final, warm), np.full(total - warm, final)])


def sd_ramp(ratio: float, total_steps: int) -> np.ndarray:
    """SDSSL's weight λ(t) = r·(1 - cos(π t / T))/2: 0 at the start, r at the end."""
    t = np.arange(total_steps)
    return ratio * (1 - np.cos(math.pi * t / max(total_steps, 1))) / 2
