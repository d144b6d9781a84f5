"""Precision choice (auto → bf16 where the hardware has it), bf16 training, gradient accumulation
equal to the full batch, and torch.compile."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from glsd_cli.config import resolve
from glsd_cli.data.loader import ViewsDataset
from glsd_cli.data.synthetic import SyntheticTextures
from glsd_cli.engine.optim import adamw, param_groups
from glsd_cli.engine.precision import autocast_dtype, cpu_supports_bf16
from glsd_cli.pretraining import build_pretraining, build_schedules, compile_backbones
from glsd_cli.engine.trainer import Trainer
from glsd_cli.errors import GlsdError
from tests.conftest import TINY_OVERRIDES

CPU = torch.device("cpu")
BATCH, STEPS = 16, 2


def test_precision_choice():
    assert autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    with pytest.raises(GlsdError, match="fp16 needs a CUDA GPU"):
        autocast_dtype("fp16", CPU)
    try:  # the CPU's flags as the kernel reports them: independent of torch (and of its version)
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo to check cpu_supports_bf16 against")
    native = bool({"amx_tile", "avx512_bf16"} & flags)
    assert cpu_supports_bf16() == native
    assert autocast_dtype("auto", CPU) is (torch.bfloat16 if native else None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_precision_choice_on_gpu():
    major, _ = torch.cuda.get_device_capability()
    assert autocast_dtype("auto", torch.device("cuda")) is (torch.bfloat16 if major >= 8 else torch.float16)


def _setup(tiny_cfg, precision="fp32", accum=1, compile=False):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.data.color_jitter = False  # geometry-only views: the same test, far quicker to build
    torch.manual_seed(0)
    setup = build_pretraining(cfg, 96)
    cfg, method = setup.cfg, setup.method
    if compile:
        compile_backbones(method)
    dataset = ViewsDataset(SyntheticTextures("train", BATCH * STEPS, size=16), setup.views, seed=0)
    batches = [default_collate([dataset[i] for i in range(s * BATCH, (s + 1) * BATCH)]) for s in range(STEPS)]
    trainer = Trainer(task=method, optimizer=adamw(param_groups(method.trainable_modules())),
                      schedules=build_schedules(cfg, method, STEPS), epochs=1, steps_per_epoch=STEPS, run_dir=None,
                      device=CPU, config_json="{}", precision=precision, clip_grad=cfg.optim.clip_grad,
                      accum_steps=accum, quiet=True)
    return method, trainer, batches


def _split(batch: dict, parts: int) -> list[dict]:
    """A collated batch cut into `parts` micro-batches of consecutive images."""
    def cut(v, i):
        if isinstance(v, list):
            return [cut(x, i) for x in v]
        n = len(v) // parts
        return v[i * n:(i + 1) * n]
    return [{k: cut(v, i) for k, v in batch.items()} for i in range(parts)]


def _train(trainer, batches, accum=1) -> list[float]:
    return [float(trainer.train_step(_split(batch, accum), step)["loss"]) for step, batch in enumerate(batches)]


def test_gradient_accumulation_matches_the_full_batch(tiny_cfg):
    # Without KoLeo: its nearest neighbours are searched within each micro-batch (as DINOv2's are
    # within each GPU's batch), so it changes with accumulation like contrastive negatives do.
    tiny_cfg = tiny_cfg.model_copy(deep=True)
    tiny_cfg.method.loss.koleo_weight = 0.0
    # DINO's EMA centre: it moves once per optimiser step from all micro-batches. Sinkhorn-Knopp
    # targets are normalised over each micro-batch (docs/algorithms.md), so they change with accumulation too.
    tiny_cfg.method.loss.centering = "ema"
    # AdamW turns float-rounding differences of near-zero gradients into update differences
    # proportional to the lr: 2e-5 at 2e-2 after 3 steps, 5e-6 at 5e-3 (measured); pinned, whatever the preset.
    tiny_cfg.optim.lr = 5e-3
    full, t_full, batches = _setup(tiny_cfg)
    accum, t_accum, _ = _setup(tiny_cfg, accum=2)
    loss_full, loss_accum = _train(t_full, batches), _train(t_accum, batches, accum=2)
    assert loss_full[0] == pytest.approx(loss_accum[0], abs=1e-5)
    assert np.allclose(loss_full, loss_accum, atol=1e-4)
    b = accum.state_dict()
    for key, value in full.state_dict().items():  # student, teacher (EMA) and centres
        assert torch.allclose(value, b[key], rtol=1e-4, atol=1e-5), key


@pytest.mark.parametrize("preset", ["tiny-dino", "tiny-geo", "tiny-sim"])
def test_bf16_training_stays_close_to_fp32(preset, tmp_path):
    # The local-loss presets too: their dense centre update runs outside autocast on bf16 tokens.
    cfg = resolve(preset, TINY_OVERRIDES + [f'run.out="{tmp_path}"'])
    _, t32, batches = _setup(cfg, "fp32")
    _, t16, _ = _setup(cfg, "bf16")
    l32, l16 = _train(t32, batches), _train(t16, batches)
    assert all(np.isfinite(l16))
    assert np.allclose(l32, l16, rtol=0.03), (l32, l16)


@pytest.mark.slow
def test_compiled_blocks_give_the_same_losses(tiny_cfg):
    method, t_c, batches = _setup(tiny_cfg, compile=True)
    _, t_e, _ = _setup(tiny_cfg)
    assert np.allclose(_train(t_c, batches), _train(t_e, batches), atol=1e-4)
    # Compiling in place keeps the state_dict keys, so checkpoints and resume are unaffected.
    assert not any("_orig_mod" in k for k in method.state_dict())
