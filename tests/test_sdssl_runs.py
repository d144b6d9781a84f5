"""SD on the global-local method (methods/layerwise.py) at the method level, and tiny CPU runs of
every SD preset through the real CLI. The layer term is re-derived here from the modules' weights
(truncated forwards, the weight-norm formula), not taken from the code under test."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from glsd_cli.config import resolve
from glsd_cli.data.loader import ViewsDataset
from glsd_cli.engine.checkpoint import read_checkpoint
from glsd_cli.pretraining import build_pretraining
from glsd_cli.engine.task import ScheduledValues
from glsd_cli.methods import StepContext
from tests.cli_helpers import run_cli
from tests.conftest import TINY_OVERRIDES
from tests.test_sdssl_method import SMALL, truncated_cls

GEO = TINY_OVERRIDES + ["model.depth=3"]


def geo_setup(*extra: str):
    cfg = resolve("tiny-geo-sd", GEO + list(extra))
    torch.manual_seed(0)
    setup = build_pretraining(cfg)
    batch = default_collate([ViewsDataset(setup.source, setup.views, 0)[i] for i in range(4)])
    return setup.cfg, setup.method, batch


def step(method, batch, lam: float | None):
    values = {"lr": 0.0, "teacher_temp": 0.05, "momentum": 0.99}
    if lam is not None:
        values["sd_weight"] = lam
    out = method.training_step(batch, StepContext(epoch=1, step=0, total_steps=10, values=ScheduledValues(**values)))
    loss, metrics = out.loss, {k: float(v) for k, v in out.metrics.items()}
    loss.backward()
    return loss, metrics, {n: p.grad.clone() for n, p in method.student.named_parameters() if p.grad is not None}


def test_geo_sd_at_zero_weight_is_geo():
    _, base, batch = geo_setup("method.sd.enabled=false")
    _, sd, _ = geo_setup()
    missing, unexpected = sd.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("student.sd.") for k in missing)
    b_loss, _, b_g = step(base, batch, None)
    s_loss, s_m, s_g = step(sd, batch, 0.0)
    assert s_loss.item() == b_loss.item() and s_m["loss_layers"] > 0
    assert all(torch.equal(s_g[n], g) for n, g in b_g.items())
    assert not any(k.startswith("teacher.sd") for k in sd.state_dict())  # targets: the final layer only


def test_geo_sd_layer_term_matches_the_formula_and_spares_the_prototypes():
    # The formula below makes the targets with DINO's EMA centre; the layer terms take whatever targets
    # the global term uses (Sinkhorn-Knopp in the preset), computed once (test_sdssl_method).
    cfg, method, batch = geo_setup('method.loss.centering="ema"')
    lam, temp = 0.5, 0.05
    _, m0, g0 = step(method, batch, 0.0)
    method.zero_grad(set_to_none=True)
    loss, m, g = step(method, batch, lam)
    # Independent recomputation of mean_l L_l.
    s, t = method.student, method.teacher
    globals_ = batch["views"][:2]
    with torch.no_grad():
        t_logits = [t["head"](t["backbone"](x)) for x in globals_]
        probs = [F.softmax((z - method.dino_loss.center) / temp, dim=-1) for z in t_logits]
        lw = s["head"].last_layer.parametrizations.weight
        protos = lw.original0 * lw.original1 / lw.original1.norm(dim=1, keepdim=True)  # W = g v / ||v||
        per_layer = []
        for layer in (0, 1):
            mlp = s["sd"].projections[str(layer)].mlp
            logp = [F.log_softmax(F.normalize(mlp(truncated_cls(s["backbone"], x, layer)), dim=-1) @ protos.t()
                                  / cfg.method.loss.student_temp, dim=-1) for x in globals_]
            ce = [(-probs[1 - v] * logp[v]).sum(-1).mean() for v in range(2)]
            per_layer.append(sum(ce) / 2)
        expected = sum(per_layer) / 2
    assert m["loss_layers"] == pytest.approx(expected.item(), rel=1e-5)
    assert m["loss_layer0"] == pytest.approx(per_layer[0].item(), rel=1e-5)
    total_without_sd = m["loss"] - lam * m["loss_layers"]
    assert total_without_sd == pytest.approx(m0["loss"], rel=1e-5)
    # The layer terms train the layer MLPs and the backbone, never the shared prototypes.
    for n in g0:
        if "head.last_layer" in n:
            assert torch.equal(g[n], g0[n]), n
    assert g["sd.projections.0.mlp.0.weight"].abs().sum() > 0
    assert not torch.equal(g["backbone.model.blocks.0.attn.qkv.weight"], g0["backbone.model.blocks.0.attn.qkv.weight"])


# ----------------------------------------------------------------------------- the CLI
def _sets(items):
    return [a for item in items for a in ("--set", item)]


def _pretrain(preset, tmp_path, capsys, extra=()):
    overrides = (SMALL if preset != "tiny-geo-sd" else GEO) + list(extra)
    code, out, err = run_cli(["pretrain", "--preset", preset, "--out", str(tmp_path), "--name", "run", "--quiet",
                              *_sets(overrides)], capsys)
    assert code == 0, err
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, [line for line in lines if "step" in line]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-simclr-sd", "tiny-byol-sd", "tiny-mocov3-sd", "tiny-geo-sd"])
def test_tiny_sd_preset_runs_through_the_cli(preset, tmp_path, capsys):
    run, steps = _pretrain(preset, tmp_path, capsys)
    ratio = resolve(preset).method.sd.ratio
    total = 6  # 96 images / batch 32 x 2 epochs
    assert [s["step"] for s in steps] == list(range(1, total + 1))
    for s in steps:
        assert s["sd_weight"] == pytest.approx(ratio * (1 - math.cos(math.pi * (s["step"] - 1) / total)) / 2, abs=1e-6)
        assert {"loss", "loss_layers", "loss_layer0", "loss_layer1"} <= set(s) and math.isfinite(s["loss"])
        if preset != "tiny-geo-sd":
            assert "loss_final" in s
            assert s["loss"] == pytest.approx(s["loss_final"] + s["sd_weight"] * s["loss_layers"]
                                              + s["loss_pred_only"], rel=1e-4)
    tensors, _ = read_checkpoint(run)
    keys = set(tensors)
    assert "model/student.backbone.model.blocks.0.attn.qkv.weight" in keys
    has_teacher = preset != "tiny-simclr-sd"
    assert any(k.startswith("model/teacher.") for k in keys) == has_teacher
    assert not any(".predictors." in k for k in keys if k.startswith("model/teacher."))
    code, out, err = run_cli(["knn-eval", str(run), "--k", "5"], capsys)
    assert code == 0, err
    assert 0 <= json.loads(out.strip().splitlines()[-1])["top1"] <= 100


def test_tiny_simclr_sd_short_run(tmp_path, capsys):
    """One epoch (3 steps) of the cheapest SD method in the fast suite."""
    _, steps = _pretrain("tiny-simclr-sd", tmp_path, capsys, ["run.epochs=1", "model.depth=2"])
    assert [s["step"] for s in steps] == [1, 2, 3] and steps[0]["sd_weight"] == 0.0
    assert 0 < steps[-1]["sd_weight"] < 0.8


@pytest.mark.parametrize("override,message", [
    ("method.sd.layers=[2]", "final layer"),
    ("model.embed_dim=42", "divisible by 4"),
])
def test_bad_sd_settings_exit_2_with_one_line(override, message, tmp_path, capsys):
    code, _, err = run_cli(["pretrain", "--preset", "tiny-mocov3-sd", "--out", str(tmp_path), "--quiet",
                            *_sets(SMALL + [override])], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
