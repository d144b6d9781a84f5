"""Exact resume: a run killed with SIGKILL at a random step and resumed ends bit-for-bit equal to an
uninterrupted run (CPU, fp32); and the pieces that make it so: the sampler, the augmentation and the
data loader leave no trace of where a run started."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glsd_cli.data.loader import EpochSampler, ViewsDataset, make_loader
from glsd_cli.data.multicrop import MultiCrop
from glsd_cli.data.synthetic import SyntheticTextures
from glsd_cli.engine.checkpoint import read_checkpoint
from tests.conftest import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parent.parent
# Drop path on, so that the torch RNG matters; geometry-only views keep the subprocesses quick.
RESUME_OVERRIDES = TINY_OVERRIDES + ["model.drop_path_rate=0.2", "data.color_jitter=false",
                                     "run.checkpoint_every_steps=1", "run.epochs=3"]
TOTAL_STEPS = 9  # 96 images / batch 32 × 3 epochs


def _cli(out: Path, name: str | None, resume: Path | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "glsd_cli", "pretrain", "--quiet"]
    if resume is not None:
        return cmd + ["--resume", str(resume)]
    cmd += ["--out", str(out), "--name", name]
    for item in [*RESUME_OVERRIDES, *extra]:
        cmd += ["--set", item]
    return cmd


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _position(run: Path) -> int:
    try:
        _, meta = read_checkpoint(run)
        return json.loads(meta["position"])["global_step"]
    except Exception:  # noqa: BLE001 - not written yet
        return -1


def _training_tensors(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = read_checkpoint(run)
    return {k: v for k, v in tensors.items() if k.startswith(("model/", "optim/"))}


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ('data.augment_on="device"', "data.color_jitter=true")],
                         ids=["workers", "device-photometric"])
def test_sigkill_at_a_random_step_then_resume_is_bit_exact(tmp_path, extra):
    ref = subprocess.run(_cli(tmp_path, "ref", extra=extra), env=_env(), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr

    kill_at = random.Random().randint(1, TOTAL_STEPS - 2)
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli(tmp_path, "killed", extra=extra), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while _position(run) < kill_at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _position(run)
    assert 1 <= killed_at < TOTAL_STEPS, f"kill aimed at step {kill_at} landed at {killed_at}"

    resumed = subprocess.run(_cli(tmp_path, None, resume=run), env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _training_tensors(tmp_path / "ref"), _training_tensors(run)
    assert a.keys() == b.keys() and any(k.startswith("optim/") for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"killed at step {killed_at}: {len(different)} tensors differ, e.g. {different[:3]}"
    # The logs agree too: the resumed run rewrote the steps it redid and the epoch rows.
    ref_csv = (tmp_path / "ref" / "results.csv").read_text().splitlines()
    run_csv = (run / "results.csv").read_text().splitlines()
    assert [r.split(",")[:3] for r in run_csv] == [r.split(",")[:3] for r in ref_csv]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TOTAL_STEPS + 1))
    assert (run / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _batches(loader) -> list[dict]:
    return [{k: v for k, v in b.items() if k in ("views", "boxes", "flips", "index")} for b in loader]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["index"], y["index"]) and torch.equal(x["boxes"], y["boxes"]) and
        torch.equal(x["flips"], y["flips"]) and all(torch.equal(u, v) for u, v in zip(x["views"], y["views"]))
        for x, y in zip(a, b))


def test_views_do_not_depend_on_workers_start_step_or_rank():
    source = SyntheticTextures("train", 24, size=16)
    dataset = ViewsDataset(source, MultiCrop(16, 8, 1), seed=3)
    dataset.set_epoch(2)
    sampler = EpochSampler(len(source), 8, seed=3)
    sampler.set_epoch(2)
    ref = _batches(make_loader(dataset, sampler, 8, 0))
    assert len(ref) == 3

    # Worker processes give the same views as the main process.
    assert _same(_batches(make_loader(dataset, sampler, 8, 2)), ref)
    # Starting mid-epoch gives exactly the remaining batches.
    sampler.set_epoch(2, start_step=1)
    assert _same(_batches(make_loader(dataset, sampler, 8, 0)), ref[1:])
    # Two ranks' halves of each global batch, put together, are the one-process batch.
    halves = []
    for rank in (0, 1):
        s = EpochSampler(len(source), 8, seed=3, rank=rank, world=2)
        s.set_epoch(2)
        halves.append(_batches(make_loader(dataset, s, 4, 0)))
    for h0, h1, r in zip(*halves, ref):
        assert torch.equal(torch.cat([h0["index"], h1["index"]]), r["index"])
        assert all(torch.equal(torch.cat([u, v]), w) for u, v, w in zip(h0["views"], h1["views"], r["views"]))


def test_loader_does_not_touch_the_global_rng():
    source = SyntheticTextures("train", 8, size=16)
    dataset = ViewsDataset(source, MultiCrop(16, 8, 1), seed=0)
    state = torch.get_rng_state()
    for _ in make_loader(dataset, EpochSampler(8, 4, seed=0), 4, 0):
        pass
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------- in-process: signals and the monitor hook


def _regression_trainer(run_dir, hook=None):
    import numpy as np

    from glsd_cli.engine.optim import adamw, param_groups
    from glsd_cli.engine.trainer import Trainer
    from tests.test_engine_safety import STEPS_PER_EPOCH, Regression

    torch.manual_seed(0)
    task = Regression()
    return Trainer(task=task, optimizer=adamw(param_groups(task)),
                   schedules={"lr": np.linspace(1e-2, 1e-3, 3 * STEPS_PER_EPOCH)}, epochs=3,
                   steps_per_epoch=STEPS_PER_EPOCH, run_dir=run_dir, device=torch.device("cpu"), config_json="{}",
                   quiet=True, plots=False, epoch_end_hook=hook)


def _signalling_loader(at_step: int, signum: int, copies: int = 1):
    """The test data; sends `signum` to this process while step `at_step` (global) is being read."""
    from tests.test_engine_safety import STEPS_PER_EPOCH, _loader

    def make(epoch, start):
        for i, batch in enumerate(_loader(epoch, start)):
            if epoch * STEPS_PER_EPOCH + start + i == at_step:
                for _ in range(copies):
                    os.kill(os.getpid(), signum)
            yield batch
    return make


@pytest.mark.parametrize("signum,copies", [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGINT, 2)])
def test_signal_saves_a_checkpoint_that_resumes_exactly(tmp_path, signum, copies):
    """copies = 2: the same Ctrl-C delivered twice at once (terminal and torchrun) still saves."""
    from tests.test_engine_safety import _loader

    ref = _regression_trainer(tmp_path / "ref")
    ref.fit(_loader)
    stopped = _regression_trainer(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt, match=f"stopped by signal {int(signum)}; checkpoint saved at step 6"):
        stopped.fit(_signalling_loader(5, signum, copies))  # the step being read finishes, then the run stops
    assert signal.getsignal(signum) is not stopped._handle_signal  # handlers restored
    resumed = _regression_trainer(tmp_path / "run")
    resumed.resume(tmp_path / "run")
    assert resumed.state.global_step == 6 and resumed.state.step_in_epoch == 2
    resumed.fit(_loader)
    a, b = ref.task.state_dict(), resumed.task.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _training_tensors(tmp_path / "ref").keys() == _training_tensors(tmp_path / "run").keys()
    assert all(torch.equal(v, _training_tensors(tmp_path / "run")[k]) for k, v in _training_tensors(tmp_path / "ref").items())


def test_epoch_end_monitor_does_not_move_the_training_rng(tmp_path):
    from tests.test_engine_safety import _loader

    plain = _regression_trainer(None)
    plain.fit(_loader)
    noisy = _regression_trainer(None, hook=lambda epoch: {"noise": float(torch.rand(()))})
    noisy.fit(_loader)
    a, b = plain.task.state_dict(), noisy.task.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_later_second_interrupt_leaves_at_once():
    trainer = _regression_trainer(None)
    trainer._handle_signal(signal.SIGINT, None)
    trainer._handle_signal(signal.SIGINT, None)  # a copy of the same interrupt: still one stop request
    trainer._stop_time -= 10  # ... and ten seconds later, the user presses Ctrl-C again
    with pytest.raises(KeyboardInterrupt, match="second signal 2: stopped without saving"):
        trainer._handle_signal(signal.SIGINT, None)
