"""Tests of the SimCLR / BYOL / MoCo v3 losses, their SDSSL layer-wise versions, the projector
modules and the layer-wise DINO loss. References are re-derived here with explicit loops over
samples (no call into the code under test)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import glsd_cli.losses.contrastive as C
from glsd_cli.losses.contrastive import (LayerwiseContrastiveLoss, byol_loss, mocov3_infonce,
                                         nt_xent, sd_simclr_layer_loss)
from glsd_cli.losses.layerwise_dino import LayerToPrototype, LayerwiseDinoLoss
from glsd_cli.models.projectors import LayerwiseHeads, LayerwiseOutputs, PredictionMLP, ProjectionMLP

TAU = 0.2


# ----------------------------------------------------------------------------- references
def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a * b).sum() / (a.norm() * b.norm()))


def ref_nt_xent(z, tau, anchors=None):
    """z[v][i]; every (i, v) is an anchor; positive (i, 1-v); candidates all (j, w) != (i, v)."""
    n = z[0].shape[0]
    slots = [(i, v) for v in range(2) for i in range(n)]
    anchors = anchors if anchors is not None else range(n)
    losses = []
    for v in range(2):
        for i in anchors:
            den = sum(math.exp(cos(z[v][i], z[w][j]) / tau) for (j, w) in slots if (j, w) != (i, v))
            num = math.exp(cos(z[v][i], z[1 - v][i]) / tau)
            losses.append(-math.log(num / den))
    return sum(losses) / len(losses)


def ref_sd_simclr(h, f, tau, anchors=None):
    """Query h[v][i]; positive f[1-v][i]; candidates all final (j, w) except (i, v)."""
    n = f[0].shape[0]
    anchors = anchors if anchors is not None else range(n)
    losses = []
    for v in range(2):
        for i in anchors:
            den = sum(math.exp(cos(h[v][i], f[w][j]) / tau)
                      for w in range(2) for j in range(n) if (j, w) != (i, v))
            losses.append(-math.log(math.exp(cos(h[v][i], f[1 - v][i]) / tau) / den))
    return sum(losses) / len(losses)


def ref_byol(p, k):
    n = p[0].shape[0]
    return sum(sum(2 - 2 * cos(p[v][i], k[1 - v][i]) for i in range(n)) / n for v in range(2))


def ref_moco(q, k, tau, anchors=None):
    """k is the global key set; anchors index the global rows of the local queries."""
    n_all = k[0].shape[0]
    anchors = list(anchors) if anchors is not None else list(range(q[0].shape[0]))
    total = 0.0
    for v in range(2):
        terms = []
        for row, i in enumerate(anchors):
            den = sum(math.exp(cos(q[v][row], k[1 - v][j]) / tau) for j in range(n_all))
            terms.append(-math.log(math.exp(cos(q[v][row], k[1 - v][i]) / tau) / den))
        total += sum(terms) / len(terms) * 2 * tau
    return total


def rand_views(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(2)]


# ----------------------------------------------------------------------------- plain losses
def test_nt_xent_matches_loop():
    z = rand_views()
    assert nt_xent(z[0], z[1], TAU).item() == pytest.approx(ref_nt_xent(z, TAU), rel=1e-9)


def test_sd_simclr_layer_loss_matches_loop_and_stops_gradient():
    h, f = rand_views(seed=1), rand_views(seed=2)
    f = [t.requires_grad_() for t in f]
    loss = sd_simclr_layer_loss(h[0], h[1], f[0], f[1], TAU)
    assert loss.item() == pytest.approx(ref_sd_simclr(h, f, TAU), rel=1e-9)
    assert not loss.requires_grad  # h has no grad and f is stop-gradient


def test_byol_and_mocov3_match_loops():
    p, k = rand_views(seed=3), rand_views(seed=4)
    assert byol_loss(p[0], p[1], k[0], k[1]).item() == pytest.approx(ref_byol(p, k), rel=1e-9)
    assert mocov3_infonce(p[0], p[1], k[0], k[1], TAU).item() == pytest.approx(
        ref_moco(p, k, TAU), rel=1e-9)


@pytest.fixture
def fake_rank1(monkeypatch):
    """Pretend to be rank 1 of 2: gathers prepend rank 0's rows (set by the test)."""
    other: dict[str, list[torch.Tensor]] = {"queue": []}

    def gather(x):  # rank 0's slices, queued by the test in call order
        return torch.cat([other["queue"].pop(0), x], 0)

    def gather_nograd(x):
        return gather(x).detach()

    monkeypatch.setattr(C, "rank", lambda: 1)
    monkeypatch.setattr(C, "all_gather_with_grad", gather)
    monkeypatch.setattr(C, "all_gather_no_grad", gather_nograd)
    return other


def _normed(t):
    return t / t.norm(dim=1, keepdim=True)


def test_global_batch_offsets_under_simulated_rank1(fake_rank1):
    b = 4
    z = rand_views(n=2 * b, seed=5)          # global batch of 8; this rank holds rows 4..7
    local = [t[b:] for t in z]
    anchors = range(b, 2 * b)
    # Gathers happen on normalised tensors in call order: view 0 then view 1.
    fake_rank1["queue"] = [_normed(z[0][:b]), _normed(z[1][:b])]
    assert nt_xent(local[0], local[1], TAU).item() == pytest.approx(
        ref_nt_xent(z, TAU, anchors), rel=1e-9)

    h = rand_views(n=2 * b, seed=6)
    fake_rank1["queue"] = [_normed(z[0][:b]), _normed(z[1][:b])]
    got = sd_simclr_layer_loss(h[0][b:], h[1][b:], local[0], local[1], TAU).item()
    assert got == pytest.approx(ref_sd_simclr(h, z, TAU, anchors), rel=1e-9)

    k = rand_views(n=2 * b, seed=7)
    fake_rank1["queue"] = [_normed(k[1][:b]), _normed(k[0][:b])]  # contrastive(q0,k1) then (q1,k0)
    got = mocov3_infonce(h[0][b:], h[1][b:], k[0][b:], k[1][b:], TAU).item()
    assert got == pytest.approx(ref_moco([t[b:] for t in h], k, TAU, anchors), rel=1e-9)


# ----------------------------------------------------------------------------- projectors
def test_projection_mlp_structure():
    m = ProjectionMLP(8, hidden_dim=16, out_dim=4)
    linears = [x for x in m if isinstance(x, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(8, 16), (16, 16), (16, 4)]
    assert all(l.bias is None for l in linears)
    kinds = [type(x).__name__ for x in m]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear",
                     "BatchNorm1d"]
    assert m[-1].affine is False and m[1].affine is True
    assert isinstance(ProjectionMLP(8, 16, 4, last_bn=False)[-1], nn.Linear)  # BYOL
    p = PredictionMLP(4)
    assert [x.out_features for x in p if isinstance(x, nn.Linear)] == [4096, 4]
    assert isinstance(p[-1], nn.BatchNorm1d) and not p[-1].affine  # MoCo v3 ViT predictor


def test_layerwise_heads_layout():
    heads = LayerwiseHeads(num_blocks=4, embed_dim=8, method="byol")
    assert heads.distilled_layers == [0, 1, 2] and heads.final_layer == 3
    assert heads.projectors["3"][0].out_features == 4096 and heads.projectors["0"][0].out_features == 2048
    assert isinstance(heads.projectors["0"][-1], nn.Linear)
    assert isinstance(heads.predictors["0"][-1], nn.Linear)
    assert LayerwiseHeads(4, 8, "simclr").predictors is None
    moco = LayerwiseHeads(4, 8, "mocov3", distilled_layers=[1])
    assert sorted(moco.projectors.keys()) == ["1", "3"]
    assert not moco.predictors["3"][-1].affine and not moco.projectors["1"][-1].affine


# ----------------------------------------------------------------------------- tiny model
class TinyNet(nn.Module):
    def __init__(self, method: str, blocks: int = 3, in_dim: int = 6, embed: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(in_dim if i == 0 else embed, embed) for i in range(blocks))
        self.norm = nn.LayerNorm(embed)
        self.heads = LayerwiseHeads(blocks, embed, method, out_dim=4, layer_hidden_dim=7,
                                    final_hidden_dim=9, predictor_hidden_dim=10)

    def features(self, x):
        feats, h = [], x
        for blk in self.blocks:
            h = torch.tanh(blk(h))
            feats.append(self.norm(h))  # CLS of block l through the shared final norm
        return feats

    def forward(self, views, **kw) -> LayerwiseOutputs:
        return self.heads([self.features(v) for v in views], **kw)


def make_pair(method, seed=0):
    torch.manual_seed(seed)
    student = TinyNet(method)
    teacher = copy.deepcopy(student).requires_grad_(False)
    x = [torch.randn(6, 6), torch.randn(6, 6)]
    return student, teacher, x


def step(student, teacher, x, loss_fn, lam):
    """One forward/backward on a fresh copy; returns (loss, stats, {param name: grad})."""
    s = copy.deepcopy(student)
    out = s(x, detached_predictions=True)
    with torch.no_grad():
        t_out = teacher(x, final_only=True, predict=False)
    loss, stats = loss_fn(out, None if loss_fn.method == "simclr" else t_out, lam)
    stats = {k: float(v) for k, v in stats.items()}
    loss.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
             for n, p in s.named_parameters()}
    return loss, stats, grads


def group(grads, prefix):
    return {n: g for n, g in grads.items() if n.startswith(prefix)}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("method", ["simclr", "byol", "mocov3"])
def test_layerwise_total_matches_composition(method):
    student, teacher, x = make_pair(method, seed=1)
    out = student(x, detached_predictions=True)
    with torch.no_grad():
        tf = teacher(x, final_only=True).final_proj
    lam = 0.3
    loss, stats = LayerwiseContrastiveLoss(method, TAU)(out, tf, lam)
    stats = {k: float(v) for k, v in stats.items()}
    d = lambda ts: [t.detach().double() for t in ts]  # noqa: E731
    fl, layers = out.final_layer, out.distilled_layers
    if method == "simclr":
        final = ref_nt_xent(d(out.proj[fl]), TAU)
        per = [ref_sd_simclr(d(out.proj[l]), d(out.proj[fl]), TAU) for l in layers]
        pred_only = 0.0
    else:
        ref = ref_byol if method == "byol" else (lambda p, k: ref_moco(p, k, TAU))
        final = ref(d(out.pred[fl]), d(tf))
        per = [ref(d(out.pred[l]), d(tf)) for l in layers]
        pred_only = sum(ref(d(out.pred_detached[l]), d(tf)) for l in layers + [fl])
    expected = final + lam * sum(per) / len(per) + pred_only
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["loss_final"] == pytest.approx(final, rel=1e-5)
    assert stats["loss_pred_only"] == pytest.approx(pred_only, rel=1e-5, abs=1e-7)
    for l, v in zip(layers, per):
        assert stats[f"loss_layer{l}"] == pytest.approx(v, rel=1e-5)
    # SD off: exactly the published baseline.
    base, bstats = LayerwiseContrastiveLoss(method, TAU, sd_enabled=False)(out, tf, lam)
    assert base.item() == pytest.approx(final, rel=1e-5) and bstats["loss_layers"] == 0.0


@pytest.mark.parametrize("method", ["simclr", "byol", "mocov3"])
def test_r0_equals_baseline(method):
    student, teacher, x = make_pair(method, seed=2)
    b_loss, _, b = step(student, teacher, x, LayerwiseContrastiveLoss(method, sd_enabled=False), 0.0)
    s_loss, s_stats, s = step(student, teacher, x, LayerwiseContrastiveLoss(method), 0.0)
    # Backbone and every projector: bit-identical gradients.
    assert_same(group(s, "blocks"), group(b, "blocks"))
    assert_same(group(s, "norm"), group(b, "norm"))
    assert_same(group(s, "heads.projectors"), group(b, "heads.projectors"))
    assert s_stats["loss_final"] == b_loss.item()
    assert s_loss.item() == pytest.approx(b_loss.item() + s_stats["loss_pred_only"], rel=1e-6)
    if method == "simclr":
        assert s_loss.item() == b_loss.item()
    else:
        # The predictor-only term (final predictor included) is the only difference.
        assert s_stats["loss_pred_only"] > 0
        assert any(not torch.equal(s[n], b[n]) for n in group(b, "heads.predictors.2"))
        assert all(s[n].abs().sum() > 0 for n in group(s, "heads.predictors.0"))
        # Without the term, SD at lambda = 0 is the baseline in value and in every gradient.
        n_loss, _, n = step(student, teacher, x,
                            LayerwiseContrastiveLoss(method, predictor_only_term=False), 0.0)
        assert n_loss.item() == b_loss.item()
        assert_same(n, b)


@pytest.mark.parametrize("method", ["byol", "mocov3"])
def test_predictor_only_term_touches_only_predictors(method):
    student, teacher, x = make_pair(method, seed=3)
    _, _, on = step(student, teacher, x, LayerwiseContrastiveLoss(method), 0.5)
    _, _, off = step(student, teacher, x, LayerwiseContrastiveLoss(method, predictor_only_term=False), 0.5)
    for prefix in ("blocks", "norm", "heads.projectors"):
        assert_same(group(on, prefix), group(off, prefix))
    for l in ("0", "1", "2"):
        pred = group(on, f"heads.predictors.{l}")
        assert any(not torch.equal(pred[n], off[n]) for n in pred), l


def test_positive_weight_changes_backbone_gradient():
    student, teacher, x = make_pair("simclr", seed=4)
    _, _, b = step(student, teacher, x, LayerwiseContrastiveLoss("simclr", sd_enabled=False), 0.0)
    _, _, s = step(student, teacher, x, LayerwiseContrastiveLoss("simclr"), 0.8)
    assert not torch.equal(s["blocks.0.weight"], b["blocks.0.weight"])
    assert s["heads.projectors.0.0.weight"].abs().sum() > 0


def test_heads_detached_predictions_equal_values_but_no_projector_path():
    student, _, x = make_pair("byol", seed=5)
    out = student(x, detached_predictions=True)
    for l in (0, 1, 2):
        for v in range(2):
            torch.testing.assert_close(out.pred_detached[l][v], out.pred[l][v])
    out.pred_detached[0][0].sum().backward()
    assert all(p.grad is None for p in student.heads.projectors.parameters())
    assert student.heads.predictors["0"][0].weight.grad is not None


def test_missing_detached_predictions_is_an_error():
    student, teacher, x = make_pair("byol", seed=6)
    out = student(x)
    with torch.no_grad():
        tf = teacher(x, final_only=True).final_proj
    with pytest.raises(ValueError, match="detached_predictions"):
        LayerwiseContrastiveLoss("byol")(out, tf, 0.1)


# ----------------------------------------------------------------------------- layer-wise DINO
def test_layerwise_dino_matches_formula():
    g = torch.Generator().manual_seed(8)
    b, k, ts = 3, 7, 0.1
    logits = {l: [torch.randn(b, k, generator=g, dtype=torch.float64) for _ in range(2)] for l in (0, 3)}
    probs = [torch.softmax(torch.randn(b, k, generator=g, dtype=torch.float64), -1) for _ in range(2)]
    loss, stats = LayerwiseDinoLoss(student_temp=ts)(logits, probs)
    stats = {k: float(v) for k, v in stats.items()}
    per = {}
    for l, zs in logits.items():
        pair_losses = []
        for t in range(2):
            for s in range(2):
                if s == t:
                    continue
                ce = 0.0
                for i in range(b):
                    lse = math.log(sum(math.exp(float(zs[s][i, j]) / ts) for j in range(k)))
                    ce += sum(-float(probs[t][i, j]) * (float(zs[s][i, j]) / ts - lse) for j in range(k))
                pair_losses.append(ce / b)
        per[l] = sum(pair_losses) / len(pair_losses)
    assert loss.item() == pytest.approx(sum(per.values()) / 2, rel=1e-9)
    assert stats["loss_layer3"] == pytest.approx(per[3], rel=1e-9)


def test_layer_to_prototype_uses_shared_last_layer():
    last = nn.utils.parametrizations.weight_norm(nn.Linear(4, 11, bias=False))
    m = LayerToPrototype(8, hidden_dim=6, bottleneck_dim=4)
    z = m(torch.randn(5, 8), last)
    assert z.shape == (5, 11)
    z.sum().backward()
    assert m.mlp[0].weight.grad is not None
