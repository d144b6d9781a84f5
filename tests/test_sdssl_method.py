"""SDSSL at the method level (methods/sdssl.py, methods/layerwise.py, models/mocov3_vit.py):
r = 0 reproduces the baseline, the λ(t) schedule, the predictor-only term's reach, per-layer features
from one pass, MoCo v3's sin-cos positions and frozen patch embedding, and SD on the global-local
method. References are re-derived here (truncated forwards, explicit loops), not taken from the code
under test."""
from __future__ import annotations

import math

import pytest
import torch

from glsd_cli.config import resolve
from glsd_cli.data.loader import ViewsDataset
from glsd_cli.pretraining import build_pretraining, make_views, open_training_source
from glsd_cli.engine.optim import param_groups
from glsd_cli.errors import ConfigError
from glsd_cli.engine.task import ScheduledValues
from glsd_cli.methods import StepContext
from glsd_cli.models.mocov3_vit import sincos_2d_position_embedding
from tests.conftest import TINY_COMMON, TINY_OVERRIDES

# Narrow heads and 3 blocks (2 distilled) keep every model here at a few hundred thousand parameters.
SMALL = TINY_COMMON + ["model.depth=3", "model.drop_path_rate=0.0",
                          "method.contrastive.proj_hidden_dim=32", "method.contrastive.layer_proj_hidden_dim=24",
                          "method.contrastive.pred_hidden_dim=40", "method.contrastive.out_dim=16"]
CONTRASTIVE = ["simclr", "byol", "mocov3"]


def make(preset: str, *extra: str):
    torch.manual_seed(0)
    small = SMALL if resolve(preset).method.name != "dino" else TINY_OVERRIDES + ["model.depth=3"]
    setup = build_pretraining(resolve(preset, small + list(extra)), 96)
    return setup.cfg, setup.method


def two_views(b: int = 8, size: int = 16, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(b, 3, size, size, generator=g) for _ in range(2)]}


def ctx(sd_weight: float | None = None, **values) -> StepContext:
    vals = {"lr": 0.0, "momentum": 0.9, "teacher_temp": 0.04, **values}
    if sd_weight is not None:
        vals["sd_weight"] = sd_weight
    return StepContext(epoch=1, step=3, total_steps=10, values=ScheduledValues(**vals))


def grads_of(method, batch, c: StepContext):
    out = method.training_step(batch, c)
    loss, metrics = out.loss, {k: float(v) for k, v in out.metrics.items()}
    loss.backward()
    grads = {n: p.grad.clone() for n, p in method.student.named_parameters() if p.grad is not None}
    return loss, metrics, grads


def same_weights(src, dst) -> None:
    """Copy every weight the two methods share; what only `dst` has (layer heads) keeps its own init."""
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(k.startswith("student.heads.") for k in missing)


def truncated_cls(backbone, x: torch.Tensor, block: int) -> torch.Tensor:
    """CLS of `block` through the final norm, by running the timm ViT only up to that block."""
    m = backbone.model
    h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
    for blk in m.blocks[:block + 1]:
        h = blk(h)
    return m.norm(h)[:, 0]


# ----------------------------------------------------------------------------- r = 0 and λ(t)
@pytest.mark.parametrize("name", CONTRASTIVE)
def test_r0_reproduces_the_baseline(name):
    _, base = make(f"tiny-{name}-sd", "method.sd.enabled=false")
    cfg, sd = make(f"tiny-{name}-sd", "method.sd.ratio=0.0")
    same_weights(base, sd)
    lam = sd.schedules(cfg.run.epochs, 3)["sd_weight"]
    assert (lam == 0).all()  # r = 0: λ(t) = 0 all along
    batch = two_views()
    b_loss, b_m, b_g = grads_of(base, batch, ctx())
    s_loss, s_m, s_g = grads_of(sd, batch, ctx(float(lam[4])))
    assert s_m["loss_final"] == b_m["loss_final"] == b_loss.item()
    # Backbone and final projector: bit-identical gradients. (The distilled layers' heads exist only in SD.)
    for n, g in b_g.items():
        if ".predictors." not in n:
            assert torch.equal(s_g[n], g), n
    if name == "simclr":
        assert s_loss.item() == b_loss.item()
        assert all(not s_g[n].any() for n in s_g.keys() - b_g.keys())  # λ = 0: the layer heads learn nothing
    else:
        # The predictor-only term is the only difference (contrastive.py's definition of "r = 0").
        assert s_loss.item() == pytest.approx(b_loss.item() + s_m["loss_pred_only"], rel=1e-6)
        _, plain = make(f"tiny-{name}-sd", "method.sd.ratio=0.0", "method.sd.predictor_only_term=false")
        same_weights(base, plain)
        p_loss, _, p_g = grads_of(plain, batch, ctx(0.0))
        assert p_loss.item() == b_loss.item()
        assert all(torch.equal(p_g[n], g) for n, g in b_g.items())
    # One EMA step moves both teachers identically.
    base.after_step(ctx(), []), sd.after_step(ctx(0.0), [])
    assert all(torch.equal(p, sd.teacher.state_dict()[k]) for k, p in base.teacher.state_dict().items()
               if "running" not in k and "num_batches" not in k)


def test_sd_weight_schedule_is_the_cosine_ramp():
    for preset in ("tiny-byol-sd", "tiny-geo-sd"):
        cfg, method = make(preset, "method.sd.ratio=0.7")
        epochs, spe = 3, 5
        lam = method.schedules(epochs, spe)["sd_weight"]
        big_t = epochs * spe
        expected = [0.7 * (1 - math.cos(math.pi * t / big_t)) / 2 for t in range(big_t)]
        assert lam.tolist() == pytest.approx(expected, abs=1e-12)
        assert lam[0] == 0 and all(a < b for a, b in zip(lam, lam[1:]))
    _, base = make("tiny-byol-sd", "method.sd.enabled=false")
    assert "sd_weight" not in base.schedules(3, 5)


@pytest.mark.parametrize("name", ["byol", "mocov3"])
def test_predictor_only_term_reaches_only_predictors(name):
    _, on = make(f"tiny-{name}-sd")
    _, off = make(f"tiny-{name}-sd", "method.sd.predictor_only_term=false")
    off.load_state_dict(on.state_dict())
    batch = two_views(seed=2)
    _, m_on, g_on = grads_of(on, batch, ctx(0.5))
    _, m_off, g_off = grads_of(off, batch, ctx(0.5))
    assert m_on["loss_pred_only"] > 0 and m_off["loss_pred_only"] == 0
    assert g_on.keys() == g_off.keys()
    for n in g_on:
        if ".predictors." in n:
            continue
        assert torch.equal(g_on[n], g_off[n]), n  # backbone and every projector untouched
    for layer in ("0", "1", "2"):
        pred = [n for n in g_on if f".predictors.{layer}." in n]
        assert pred and any(not torch.equal(g_on[n], g_off[n]) for n in pred), layer


# ----------------------------------------------------------------------------- features and heads
def test_layer_features_from_one_pass_equal_truncated_forwards(monkeypatch):
    _, method = make("tiny-mocov3-sd", "model.depth=4")
    method.eval()
    backbone = method.student["backbone"]
    x = two_views(b=3)["views"][0]
    calls = []
    real = backbone.model.forward_intermediates
    monkeypatch.setattr(backbone.model, "forward_intermediates", lambda *a, **k: calls.append(1) or real(*a, **k))
    feats = method.layer_features(backbone, x)
    assert calls == [1] and sorted(feats) == [0, 1, 2, 3]
    with torch.no_grad():
        for block, f in feats.items():
            torch.testing.assert_close(f, truncated_cls(backbone, x, block), rtol=1e-5, atol=1e-6)


def test_teacher_and_heads_layout():
    _, byol = make("tiny-byol-sd")
    assert byol.distilled == [0, 1]
    assert sorted(byol.student["heads"].projectors) == ["0", "1", "2"]
    assert sorted(byol.teacher["heads"].projectors) == ["2"] and byol.teacher["heads"].predictors is None
    assert all(not p.requires_grad for p in byol.teacher.parameters())
    assert byol.backbone("teacher") is byol.teacher["backbone"]
    _, simclr = make("tiny-simclr-sd")
    assert len(simclr.teacher) == 0 and simclr.backbone("teacher") is simclr.student["backbone"]
    assert not any(k.startswith("teacher.") for k in simclr.state_dict())
    before = {k: v.clone() for k, v in simclr.state_dict().items()}
    simclr.after_step(ctx(0.1), [])  # no teacher: nothing moves
    assert all(torch.equal(v, simclr.state_dict()[k]) for k, v in before.items())


def test_two_view_transform():
    cfg, method = make("tiny-mocov3-sd")
    tf = make_views(cfg, method)
    assert tf.num_views == 2 and [r.blur_p for r in tf.recipes] == [1.0, 0.1]
    assert [r.solarize_p for r in tf.recipes] == [0.0, 0.2] and all(r.scale == (0.08, 1.0) for r in tf.recipes)
    item = ViewsDataset(open_training_source(cfg), tf, 0)[0]
    assert len(item["views"]) == 2 and item["views"][0].shape == (3, 16, 16)


@pytest.mark.parametrize("layers,message", [("[2]", "final layer"), ("[]", "is empty"), ("[7]", "cannot be distilled")])
def test_bad_distilled_layers_are_config_errors(layers, message):
    with pytest.raises(ConfigError, match=message):
        make("tiny-byol-sd", f"method.sd.layers={layers}")


def test_negative_layer_indices_count_from_the_end():
    _, method = make("tiny-simclr-sd", "method.sd.layers=[-2, 0, 0]")
    assert method.distilled == [0, 1]


# ----------------------------------------------------------------------------- MoCo v3's ViT
def test_sincos_table_matches_the_formula_and_moco_v3():
    rows, cols, dim = 3, 5, 8
    table = sincos_2d_position_embedding(rows, cols, dim)
    k = dim // 4
    for r in range(rows):
        for c in range(cols):
            w = [1 / 10000 ** (d / k) for d in range(k)]
            want = ([math.sin(r * o) for o in w] + [math.cos(r * o) for o in w]
                    + [math.sin(c * o) for o in w] + [math.cos(c * o) for o in w])
            assert table[r * cols + c].tolist() == pytest.approx(want, abs=1e-6)
    # MoCo v3's construction (vits.py, build_2d_sincos_position_embedding) on a square grid.
    h = w = 4
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                    indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(16 // 4, dtype=torch.float32) / (16 // 4))
    out_w, out_h = grid_w.flatten()[:, None] * omega, grid_h.flatten()[:, None] * omega
    ref = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    torch.testing.assert_close(sincos_2d_position_embedding(h, w, 16), ref, rtol=0, atol=1e-6)


def test_model_carries_the_sincos_table_at_any_view_size():
    _, method = make("tiny-mocov3-sd")
    vit = method.student["backbone"].model
    pos = vit.pos_embed
    assert not pos.requires_grad and torch.equal(pos[0, 0], torch.zeros(48))
    torch.testing.assert_close(pos[0, 1:], sincos_2d_position_embedding(4, 4, 48), rtol=0, atol=0)
    with torch.no_grad():  # a 24-px view: timm resamples the table to 6 x 6; the CLS position stays zero
        tokens = vit._pos_embed(torch.zeros(2, 6, 6, 48))
        assert tokens.shape == (2, 37, 48) and torch.equal(tokens[:, 0], vit.cls_token[0].expand(2, -1))
        assert method.student["backbone"](torch.randn(2, 3, 24, 24)).shape == (2, 48)
    _, byol = make("tiny-byol-sd")
    assert byol.student["backbone"].model.pos_embed.requires_grad


def test_frozen_patch_embedding_gets_no_gradient_and_no_update():
    _, method = make("tiny-mocov3-sd")
    proj = method.student["backbone"].model.patch_embed.proj
    bound = math.sqrt(6 / (3 * 4 * 4 + 48))  # MoCo v3's Xavier-uniform bound for the patch conv
    assert proj.weight.abs().max() <= bound and proj.weight.abs().max() > 0.5 * bound
    assert torch.equal(proj.bias, torch.zeros(48)) and not proj.weight.requires_grad
    frozen = {id(proj.weight), id(proj.bias), id(method.student["backbone"].model.pos_embed)}
    groups = param_groups(method.trainable_modules())
    assert not frozen & {id(p) for g in groups for p in g["params"]}
    before = [t.clone() for t in (proj.weight, method.teacher["backbone"].model.patch_embed.proj.weight)]
    opt = torch.optim.AdamW(groups, lr=1e-2)
    for step in range(2):
        opt.zero_grad()
        loss = method.training_step(two_views(seed=step), ctx(0.5)).loss
        loss.backward()
        assert proj.weight.grad is None and proj.bias.grad is None
        opt.step()
        method.after_step(ctx(0.5, momentum=0.5), [])
    assert torch.equal(proj.weight, before[0])
    assert torch.equal(method.teacher["backbone"].model.patch_embed.proj.weight, before[1])
    qkv = method.teacher["backbone"].model.blocks[0].attn.qkv.weight
    assert not torch.equal(qkv, method.student["backbone"].model.blocks[0].attn.qkv.weight)  # the rest moved


def test_sincos_needs_a_width_divisible_by_4():
    with pytest.raises(ConfigError, match="divisible by 4"):
        make("tiny-mocov3-sd", "model.embed_dim=42", "model.num_heads=3")
