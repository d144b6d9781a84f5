"""A training step reads device values on the host once (its finiteness and stop flags), plus once
more when it writes a log line: every other number stays on the device (GPU-step issue).

On the CPU every read is free, so the count is taken by intercepting every tensor-to-Python read
(`item`, `tolist`, `bool`, `float`, `int`, ...) with the one CPU-only shortcut (geometry's tie check)
switched to its accelerator behaviour. On a GPU, bench/gpu_check.py counts real synchronisations with
`torch.cuda.set_sync_debug_mode`."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils.data import default_collate

from glsd_cli import geometry
from glsd_cli.config import resolve
from glsd_cli.data.loader import ViewsDataset
from glsd_cli.data.synthetic import SyntheticTextures
from glsd_cli.engine.optim import adamw, param_groups
from glsd_cli.pretraining import build_pretraining, build_schedules
from glsd_cli.engine.trainer import Trainer
from tests.conftest import TINY_COMMON, TINY_OVERRIDES

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "__format__", "__array__"}


class CountReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("extra", [
    ['method.local.matching="geometric"', "method.sd.enabled=true"],
    ['method.local.matching="similarity"', 'method.loss.centering="sinkhorn"', "method.loss.koleo_weight=0.1"],
    ["byol"],
], ids=["geo-sd", "sim-sinkhorn-koleo", "byol-sd"])
def test_a_step_reads_the_device_once_and_a_log_step_twice(monkeypatch, extra):
    monkeypatch.setattr(geometry, "reading_is_free", lambda device: False)
    preset, sets = ("tiny-byol-sd", TINY_COMMON) if extra == ["byol"] else ("tiny-dino", TINY_OVERRIDES + extra)
    cfg = resolve(preset, sets + ["optim.clip_grad=3.0", "run.log_every_steps=2"])
    setup = build_pretraining(cfg, 96)
    cfg, method = setup.cfg, setup.method
    dataset = ViewsDataset(SyntheticTextures("train", 8, size=16), setup.views, seed=0)
    batch = default_collate([dataset[i] for i in range(8)])
    batch = {k: batch[k] for k in ("views", "boxes", "flips")}  # the loader's host-side flags aside
    trainer = Trainer(task=method, optimizer=adamw(param_groups(method.trainable_modules())),
                      schedules=build_schedules(cfg, method, 4), epochs=1, steps_per_epoch=4, run_dir=None,
                      device=torch.device("cpu"), config_json="{}", clip_grad=cfg.optim.clip_grad, quiet=True,
                      log_every_steps=2)
    trainer.train_step([batch], 0)  # warm-up: the local loss plans its chunks once
    counter = CountReads()
    with counter:
        metrics = trainer.train_step([batch], 1)
    assert len(counter.reads) == 1, counter.reads  # the flags
    assert metrics["loss"].ndim == 0 and "grad_norm" in metrics
    # Through the loop: a logged step adds one read, of all its metrics at once.
    counter = CountReads()
    with counter:
        trainer.fit(lambda epoch, start: [batch] * 2)
    assert len(counter.reads) == 2 + 1 + 1, counter.reads  # 2 steps' flags, 1 log line, the epoch's sums
