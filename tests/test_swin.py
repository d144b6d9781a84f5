"""Swin-T (the GLSD reference backbone) trains a step of the global-local method."""
import pytest
from torch.utils.data import default_collate

from glsd_cli.config import resolve
from glsd_cli.data.loader import ViewsDataset
from glsd_cli.data.synthetic import SyntheticTextures
from glsd_cli.pretraining import build_pretraining
from glsd_cli.engine.task import ScheduledValues
from glsd_cli.methods import StepContext


@pytest.mark.slow
def test_swint_geo_step_has_7x7_and_3x3_grids():
    cfg = resolve("swint-geo", ["data.num_local_crops=2", "head.out_dim=512", "method.local.out_dim=512",
                                "head.hidden_dim=256"])
    setup = build_pretraining(cfg, 1000)
    method = setup.method
    dataset = ViewsDataset(SyntheticTextures("train", 2, size=256), setup.views, 0)
    batch = default_collate([dataset[i] for i in range(2)])
    grids = [method.student["backbone"].forward_tokens(v[:1]).grid for v in (batch["views"][0], batch["views"][2])]
    assert grids == [(7, 7), (3, 3)]
    ctx = StepContext(1, 0, 10, ScheduledValues(lr=0.0, teacher_temp=0.04, momentum=0.99))
    out = method.training_step(batch, ctx)
    loss, metrics = out.loss, out.metrics
    loss.backward()
    assert metrics["loss_local"] > 0 and 0 < metrics["local_valid_fraction"] <= 1
    assert all(p.grad is None for p in method.teacher.parameters())
