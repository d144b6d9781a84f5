"""The global-local method: local term wiring, gradients, one backbone forward per resolution."""
import math

import pytest
import torch
from torch.utils.data import default_collate

from glsd_cli.config import resolve
from glsd_cli.data.loader import ViewsDataset
from glsd_cli.pretraining import build_pretraining
from glsd_cli.engine.task import ScheduledValues
from glsd_cli.methods import StepContext
from tests.conftest import TINY_OVERRIDES


def _setup(matching, extra=()):
    # KoLeo off and DINO's EMA centres unless a test asks otherwise (`extra` comes last): the tests check
    # the loss terms' weighting without KoLeo, and the centres' updates.
    cfg = resolve("tiny-dino", TINY_OVERRIDES + [f'method.local.matching="{matching}"', "method.loss.koleo_weight=0",
                                                 'method.loss.centering="ema"', *extra])
    setup = build_pretraining(cfg)
    cfg, method = setup.cfg, setup.method
    batch = default_collate([ViewsDataset(setup.source, setup.views, 0)[i] for i in range(4)])
    ctx = StepContext(epoch=1, step=0, total_steps=10, values=ScheduledValues(lr=0.0, teacher_temp=0.04, momentum=0.99))
    return cfg, method, batch, ctx


def _run(method, batch, ctx):
    """(loss, metrics as floats, the step output) of one training step."""
    out = method.training_step(batch, ctx)
    return out.loss, {k: float(v) for k, v in out.metrics.items()}, out


@pytest.mark.parametrize("matching", ["geometric", "similarity"])
def test_local_term_is_weighted_and_teacher_gets_no_gradient(matching):
    cfg, method, batch, ctx = _setup(matching, ["method.local.weight=0.3"])
    loss, metrics, _ = _run(method, batch, ctx)
    w = 0.3
    assert loss.item() == pytest.approx((1 - w) * metrics["loss_global"] + w * metrics["loss_local"], rel=1e-5)
    assert 0 < metrics["local_valid_fraction"] <= 1
    if matching == "similarity":
        assert metrics["local_valid_fraction"] == 1.0
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert method.student["dense_head"].mlp[0].weight.grad.abs().sum() > 0
    assert method.student["backbone"].model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_no_local_loss_is_plain_dino():
    _, method, batch, ctx = _setup("none")
    loss, metrics, _ = _run(method, batch, ctx)
    assert "dense_head" not in method.student and "loss_local" not in metrics
    assert loss.item() == metrics["loss_global"]


def test_sinkhorn_centring_gives_the_global_targets_and_the_collapse_statistics_see_them():
    from glsd_cli.engine.monitors import collapse_stats
    from glsd_cli.losses.dino import sinkhorn_knopp

    _, method, batch, ctx = _setup("none", ['method.loss.centering="sinkhorn"', "method.loss.sinkhorn_iterations=4"])
    with torch.no_grad():
        views = batch["views"]
        t_logits = method.teacher["head"](method.teacher["backbone"].forward_tokens(torch.cat(views[:2])).cls)
        s_logits = [method.student["head"](method.student["backbone"].forward_tokens(v).cls) for v in views]
    targets = sinkhorn_knopp(t_logits, 0.04, 4).chunk(2)  # both global views normalised together
    want = [-(targets[t] * torch.log_softmax(s_logits[s] / 0.1, -1)).sum(-1).mean()
            for t in range(2) for s in range(len(views)) if s != t]
    loss, metrics, _ = _run(method, batch, ctx)
    assert metrics["loss_global"] == pytest.approx(torch.stack(want).mean().item(), rel=1e-4)
    assert metrics["teacher_entropy"] == pytest.approx(
        float(collapse_stats(torch.cat(targets))["teacher_entropy"]), rel=1e-4)
    assert "center_norm" not in metrics  # Sinkhorn-Knopp uses no centre


@pytest.mark.parametrize("sd", [False, True])
def test_teacher_targets_are_made_once_per_step(monkeypatch, sd):
    # The global loss, SD's layer terms and the collapse statistics all use the step's one set of targets.
    import glsd_cli.losses.dino as dino

    extra = ['method.loss.centering="sinkhorn"'] + (["method.sd.enabled=true"] if sd else [])
    _, method, batch, ctx = _setup("geometric", extra)
    ctx = StepContext(1, 0, 10, ScheduledValues(lr=0.0, teacher_temp=0.04, momentum=0.99, sd_weight=0.5))
    calls = []
    real = dino.sinkhorn_knopp
    monkeypatch.setattr(dino, "sinkhorn_knopp", lambda *a, **k: calls.append(1) or real(*a, **k))
    _run(method, batch, ctx)
    assert len(calls) == 1


def test_collapse_statistics_and_centre_norms_are_step_metrics():
    _, method, batch, ctx = _setup("geometric")
    assert method.num_prototypes == 64
    loss, metrics, out = _run(method, batch, ctx)
    assert 0 <= metrics["teacher_entropy"] <= math.log(64) and 0 <= metrics["teacher_kl_uniform"] <= math.log(64)
    assert metrics["center_norm"] == 0 and metrics["center_norm_local_loss"] == 0  # the centres start at 0 ...
    method.after_step(ctx, [out])
    _, metrics, _ = _run(method, batch, ctx)
    assert metrics["center_norm"] > 0 and metrics["center_norm_local_loss"] > 0  # ... and move after a step
    assert all(v.device == loss.device and v.ndim == 0 for v in out.metrics.values())


def test_koleo_term_is_added_on_the_students_global_cls_tokens():
    from glsd_cli.losses.koleo import koleo_loss

    _, method, batch, ctx = _setup("none", ["method.loss.koleo_weight=0.25"])
    with torch.no_grad():
        want = sum(koleo_loss(method.student["backbone"].forward_tokens(v).cls) for v in batch["views"][:2])
    loss, metrics, _ = _run(method, batch, ctx)
    assert metrics["loss_koleo"] == pytest.approx(want.item(), rel=1e-4)
    assert loss.item() == pytest.approx(metrics["loss_global"] + 0.25 * metrics["loss_koleo"], rel=1e-5)


def test_one_student_forward_per_resolution(monkeypatch):
    _, method, batch, ctx = _setup("geometric")
    calls = []
    real = method.student["backbone"].forward_tokens
    monkeypatch.setattr(method.student["backbone"], "forward_tokens", lambda x: calls.append(x.shape) or real(x))
    method.training_step(batch, ctx)
    assert [tuple(s[-2:]) for s in calls] == [(16, 16), (8, 8)]
    assert calls[0][0] == 2 * 4 and calls[1][0] == 2 * 4  # 2 globals, 2 locals, batch 4


def test_centres_move_after_step():
    _, method, batch, ctx = _setup("geometric")
    before = (method.dino_loss.center.clone(), method.local_loss.center.clone())
    out = method.training_step(batch, ctx)
    assert torch.equal(method.dino_loss.center, before[0])  # unchanged until after_step
    method.after_step(ctx, [out])
    assert not torch.equal(method.dino_loss.center, before[0])
    assert not torch.equal(method.local_loss.center, before[1])


def test_prototype_layers_frozen_in_first_epoch():
    # DINO's defaults (tiny-dino itself trains a short run without either).
    _, method, _, _ = _setup("geometric", ["head.freeze_last_layer_epochs=1", "head.norm_last_layer=true"])
    frozen = method.frozen_parameters(StepContext(0, 0, 10))
    assert len(frozen) == 2 and all(p.ndim == 2 for p in frozen)  # the two weight-norm directions
    assert method.frozen_parameters(StepContext(1, 5, 10)) == []


def test_koleo_with_one_image_per_step_is_a_config_error():
    from glsd_cli.errors import ConfigError

    _, method, batch, ctx = _setup("none", ["method.loss.koleo_weight=0.1"])
    one = {**batch, "views": [v[:1] for v in batch["views"]]}
    with pytest.raises(ConfigError, match="at least 2 images"):
        method.training_step(one, ctx)
