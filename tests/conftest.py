"""Shared fixtures: tiny configs that train in seconds on the CPU."""
from __future__ import annotations

import glsd_cli  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads OpenMP)
import pytest
import torch

from glsd_cli.config import resolve

# What every method shares: a tiny backbone on tiny built-in data, a short quiet run.
TINY_COMMON = [
    "model.embed_dim=48", "model.depth=2", "model.num_heads=3", "model.patch_size=4",
    'data.train="synthetic:train=96,val=48,size=16"', "data.global_crop_size=16", "data.local_crop_size=8",
    "data.batch_size=32", "data.num_workers=0",
    "run.epochs=2", "run.knn_monitor=false", "run.log_every_steps=1",
]
# The DINO / GLSD methods' own: local crops and narrow heads (two-view methods refuse them).
TINY_OVERRIDES = TINY_COMMON + [
    "data.num_local_crops=2", "head.out_dim=64", "head.hidden_dim=64", "head.bottleneck_dim=32",
    "method.local.out_dim=64",
]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture
def tiny_cfg(tmp_path):
    return resolve("tiny-dino", TINY_OVERRIDES + [f'run.out="{tmp_path}"', 'run.name="tiny"'])
