"""Dataset-size-aware values for config fields set to `auto`.

The published heuristic gives end points only: a prototype head (out_dim) of 1024 below ~20k
images up to 65536 above ~500k; a teacher temperature from 0.02 for small data to 0.07 at
ImageNet scale; a teacher EMA start from 0.99 for small data to 0.996. The curves in between are
glsd's own interpolation of that heuristic: each value is clamped at its anchors and is linear in
log(n) between them (out_dim linear in log2(out_dim), then rounded to a power of two), which makes
every value monotone non-decreasing in the number of training images n.

Anchors (n = number of training images):

=====================  =========  ===========  ==========  ===========
value                  n_low      value_low    n_high      value_high
=====================  =========  ===========  ==========  ===========
out_dim                20,000     1024 (2^10)  500,000     65536 (2^16)
teacher_temp           20,000     0.02         1,281,167   0.07
momentum_teacher       20,000     0.99         1,281,167   0.996
=====================  =========  ===========  ==========  ===========

1,281,167 is the ImageNet-1k training set size ("ImageNet scale").
"""
from __future__ import annotations

import math

SMALL_N = 20_000
OUT_DIM_LARGE_N = 500_000
IMAGENET_N = 1_281_167
OUT_DIM_RANGE = (1024, 65536)
TEACHER_TEMP_RANGE = (0.02, 0.07)
MOMENTUM_RANGE = (0.99, 0.996)


def _log_position(n: int, n_low: int, n_high: int) -> float:
    """Where n sits between the anchors on a log scale: 0 at or below n_low, 1 at or above n_high."""
    n = max(int(n), 1)
    if n <= n_low:
        return 0.0
    if n >= n_high:
        return 1.0
    return (math.log(n) - math.log(n_low)) / (math.log(n_high) - math.log(n_low))


def auto_out_dim(n: int) -> int:
    """Prototype count: 2 ** round(10 + 6 t), t the log-position of n between 20k and 500k images."""
    lo, hi = (math.log2(v) for v in OUT_DIM_RANGE)
    t = _log_position(n, SMALL_N, OUT_DIM_LARGE_N)
    return int(2 ** round(lo + (hi - lo) * t))


def auto_teacher_temp(n: int) -> float:
    """Teacher temperature: 0.02 + 0.05 t, t the log-position of n between 20k and 1,281,167."""
    lo, hi = TEACHER_TEMP_RANGE
    return round(lo + (hi - lo) * _log_position(n, SMALL_N, IMAGENET_N), 4)


def auto_momentum_teacher(n: int) -> float:
    """Teacher EMA start: 0.99 + 0.006 t, t the log-position of n between 20k and 1,281,167."""
    lo, hi = MOMENTUM_RANGE
    return round(lo + (hi - lo) * _log_position(n, SMALL_N, IMAGENET_N), 4)


def resolve_size_defaults(n: int) -> dict[str, float | int]:
    """All size-aware values for a training set of n images, keyed by their config field names."""
    return {
        "out_dim": auto_out_dim(n),
        "teacher_temp": auto_teacher_temp(n),
        "momentum_teacher": auto_momentum_teacher(n),
    }
