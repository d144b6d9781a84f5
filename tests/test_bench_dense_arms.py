"""bench/dense_arms.py reuses a finished run only if it was trained as the bench asks now."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from glsd_cli.config import resolve

_BENCH = Path(__file__).resolve().parent.parent / "bench"


def _dense_arms():
    sys.path.insert(0, str(_BENCH))  # the script imports its sibling `common`
    try:
        spec = importlib.util.spec_from_file_location("dense_arms", _BENCH / "dense_arms.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(_BENCH))


def _finished_run(tmp_path: Path, sets: list[str]) -> Path:
    run = tmp_path / "dino-s0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(resolve("scenes-dino", sets).to_json())
    (run / "done.json").write_text("{}")
    return run


def test_a_run_trained_as_asked_is_reused_and_a_stale_one_stops_the_bench(tmp_path):
    dense_arms = _dense_arms()
    asked = Namespace(epochs=None, data=None)
    # Written elsewhere, logged more often: the same training, so it is reused.
    same = _finished_run(tmp_path / "same", ["run.seed=0", "run.log_every_steps=1", 'run.out="/elsewhere"'])
    dense_arms.check_reusable(same, "scenes-dino", [], 0, asked)
    # Trained on the presets' data before it moved to texture scale 40.
    stale = _finished_run(tmp_path / "stale", ["run.seed=0", 'data.train="synthetic-scenes"'])
    with pytest.raises(SystemExit) as stop:
        dense_arms.check_reusable(stale, "scenes-dino", [], 0, asked)
    assert "data.train = 'synthetic-scenes'" in str(stop.value) and "scale=40" in str(stop.value)
    with pytest.raises(SystemExit, match="run.epochs"):  # asked for more epochs than it had
        dense_arms.check_reusable(_finished_run(tmp_path / "short", ["run.seed=0"]), "scenes-dino", [], 0,
                                  Namespace(epochs=20, data=None))
    # Trained before the scenes presets' teacher temperature moved from 0.02 to 0.01.
    warmer = _finished_run(tmp_path / "warmer", ["run.seed=0", "method.loss.teacher_temp=0.02",
                                                  "method.loss.warmup_teacher_temp=0.02"])
    with pytest.raises(SystemExit, match="method.loss.teacher_temp = 0.02, not 0.01"):
        dense_arms.check_reusable(warmer, "scenes-dino", [], 0, asked)
    # An arm's own settings are part of what it asks: the geometric arm is not the dino arm's run.
    with pytest.raises(SystemExit, match="method.local.matching = 'none', not 'geometric'"):
        dense_arms.check_reusable(_finished_run(tmp_path / "arm", ["run.seed=0"]), "scenes-dino",
                                  ['method.local.matching="geometric"'], 0, asked)


def test_collapse_monitors_judge_both_heads_of_a_finished_run_from_its_logs(tmp_path):
    sys.path.insert(0, str(_BENCH))
    try:
        from common import collapse_monitors
    finally:
        sys.path.remove(str(_BENCH))
    run = tmp_path / "geometric-s0"
    run.mkdir()
    cfg = resolve("scenes-geo", ["run.seed=0", "method.local.out_dim=1024"])  # "auto" resolved, as pretrain writes it
    (run / "config.json").write_text(cfg.to_json())
    k, dense_k = cfg.head.out_dim, cfg.method.local.out_dim
    # The global head healthy, then nearly uniform at epoch 2 (entropy past 0.9 log K); the dense head
    # healthy throughout.
    global_entropy = [3.0, 3.2, 0.97 * math.log(k)]
    rows = ["epoch,teacher_entropy,teacher_kl_uniform,dense_teacher_entropy,dense_teacher_kl_uniform,loss"]
    rows += [f"{epoch},{entropy},0.01,4.0,0.2,5.0" for epoch, entropy in enumerate(global_entropy)]
    (run / "results.csv").write_text("\n".join(rows) + "\n")
    seen = collapse_monitors(run)
    assert seen["epochs"] == 3 and seen["log_k"] == pytest.approx(math.log(k), abs=1e-4)
    assert seen["dense_log_k"] == pytest.approx(math.log(dense_k), abs=1e-4)
    assert seen["teacher_entropy"] == pytest.approx(global_entropy[-1]) and seen["dense_teacher_entropy"] == 4.0
    [warning] = seen["warnings"]
    assert "uniform" in warning and "epoch 2" in warning
    # The run already uses Sinkhorn-Knopp targets: the advice does not tell it to.
    assert "sinkhorn" not in warning.lower()
