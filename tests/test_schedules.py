import math

import numpy as np

from glsd_cli.engine.schedules import cosine_schedule, sd_ramp, teacher_temp_schedule


def test_cosine_schedule_formula():
    base, final, epochs, steps, warm = 1.0, 0.1, 5, 10, 1
    s = cosine_schedule(base, final, epochs, steps, warmup_epochs=warm, warmup_start=0.0)
    assert len(s) == 50
    assert np.allclose(s[:10], np.linspace(0, base, 10))
    n = 40
    for i in (0, 7, 20, 39):
        want = final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n))
        assert abs(s[10 + i] - want) < 1e-12
    assert s[10] == base and s[-1] > final


def test_teacher_temperature_warmup():
    s = teacher_temp_schedule(0.04, 0.07, warmup_epochs=2, epochs=4, steps_per_epoch=3)
    assert len(s) == 12
    assert np.allclose(s[:6], np.linspace(0.04, 0.07, 6))
    assert np.all(s[6:] == 0.07)


def test_sd_ramp_formula():
    r, T = 0.8, 100
    lam = sd_ramp(r, T)
    for t in (0, 10, 50, 99):
        assert abs(lam[t] - r * (1 - math.cos(math.pi * t / T)) / 2) < 1e-12
    assert lam[0] == 0.0 and np.all(np.diff(lam) >= 0)
