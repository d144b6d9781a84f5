import math

import torch

from glsd_cli.losses.dino import DINOLoss


def direct_dino_loss(student, teacher, center, t_temp, s_temp):
    """Re-computation from the formula with explicit loops (docs/algorithms.md §3)."""
    total, pairs = 0.0, 0
    for t, gt in enumerate(teacher):
        for s, gs in enumerate(student):
            if s == t:
                continue
            batch = 0.0
            for b in range(gt.shape[0]):
                pt = [math.exp((gt[b, k] - center[0, k]) / t_temp) for k in range(gt.shape[1])]
                zt = sum(pt)
                ps = [math.exp(gs[b, k] / s_temp) for k in range(gs.shape[1])]
                zs = sum(ps)
                batch += -sum(pt[k] / zt * math.log(ps[k] / zs) for k in range(gt.shape[1]))
            total += batch / gt.shape[0]
            pairs += 1
    return total / pairs


def test_dino_loss_matches_formula():
    torch.manual_seed(1)
    k = 7
    loss_fn = DINOLoss(k, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, k) * 0.1)
    student = [torch.randn(3, k, dtype=torch.float64) for _ in range(4)]  # 2 global + 2 local views
    teacher = [torch.randn(3, k, dtype=torch.float64) for _ in range(2)]
    got = loss_fn(student, loss_fn.teacher_targets(teacher, 0.04)).item()
    want = direct_dino_loss(student, teacher, loss_fn.center.double(), 0.04, 0.1)
    assert abs(got - want) < 1e-4 * max(1.0, abs(want))


def test_same_view_is_not_its_own_target():
    k = 5
    loss_fn = DINOLoss(k)
    g = torch.randn(2, k)
    # One global view only on both sides: there is no pair, but with two views the pair (0, 1) counts.
    loss = loss_fn([g, g.clone()], loss_fn.teacher_targets([g, g.clone()], 0.04))
    want = direct_dino_loss([g.double(), g.double()], [g.double(), g.double()], torch.zeros(1, k, dtype=torch.float64), 0.04, 0.1)
    assert abs(loss.item() - want) < 1e-4


def test_center_update_is_ema_of_teacher_mean():
    k = 6
    loss_fn = DINOLoss(k, center_momentum=0.9)
    c0 = torch.randn(1, k)
    loss_fn.center.copy_(c0)
    teacher = [torch.randn(4, k), torch.randn(4, k)]
    loss_fn.update_center(teacher)
    want = 0.9 * c0 + 0.1 * torch.cat(teacher).mean(0, keepdim=True)
    assert torch.allclose(loss_fn.center, want, atol=1e-6)


def test_student_gets_gradient_teacher_does_not():
    k = 5
    loss_fn = DINOLoss(k)
    s = [torch.randn(2, k, requires_grad=True) for _ in range(3)]
    t = [torch.randn(2, k, requires_grad=True) for _ in range(2)]
    loss_fn(s, loss_fn.teacher_targets(t, 0.04)).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t)


# ---------------------------------------------------------------- Sinkhorn-Knopp centring (DINOv2)
def direct_sinkhorn(logits: torch.Tensor, temp: float, iterations: int) -> torch.Tensor:
    """DINOv2's sinkhorn_knopp_teacher in float64, linear domain, written out (Oquab et al. 2023)."""
    q = torch.exp(logits.double() / temp).t()  # (K, N)
    k, n = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).t()


def test_sinkhorn_matches_direct_algorithm():
    from glsd_cli.losses.dino import sinkhorn_knopp

    torch.manual_seed(0)
    logits = torch.randn(24, 10) * 0.2  # small enough for the linear-domain reference
    for iterations in (1, 3):
        got = sinkhorn_knopp(logits, 0.04, iterations).double()
        assert torch.allclose(got, direct_sinkhorn(logits, 0.04, iterations), atol=1e-6)


def test_sinkhorn_matches_a_float64_log_domain_reference_where_float32_underflows():
    """Logits / τ spanning hundreds of nats, as a sharp teacher's do: most entries of exp underflow
    float32 (the CPU's slow path, which sinkhorn_knopp clamps away); the targets must not move."""
    from glsd_cli.losses.dino import sinkhorn_knopp

    torch.manual_seed(0)
    logits = torch.randn(300, 64) * 3 + torch.randn(1, 64) * 4  # prototypes of very different popularity
    ref = logits.double() / 0.02
    for _ in range(3):
        ref = ref - torch.logsumexp(ref, dim=0, keepdim=True)
        ref = ref - torch.logsumexp(ref, dim=1, keepdim=True)
    assert (ref < -104).float().mean() > 0.5  # below float32's smallest subnormal: most of the table
    got = sinkhorn_knopp(logits, 0.02, 3).double()
    assert torch.allclose(got, ref.exp(), atol=1e-6, rtol=1e-4)
    # What float32 cannot hold comes out as (next to) nothing; what it can, with its log-probability.
    assert got[ref < -90].max() < 1e-37
    assert torch.allclose(got[ref > -80].log(), ref[ref > -80], atol=1e-3)


def test_sinkhorn_balances_prototypes_and_survives_large_logits():
    from glsd_cli.losses.dino import sinkhorn_knopp

    torch.manual_seed(0)
    # exp(10 / 0.04) overflows float32: the log-domain version must stay finite.
    logits = torch.randn(40, 8)
    logits[:, 0] += 10  # every image prefers prototype 0: a plain softmax puts all mass there
    assert (torch.softmax(logits / 0.04, dim=1).argmax(1) == 0).all()
    q = sinkhorn_knopp(logits, 0.04, iterations=200)
    assert torch.isfinite(q).all()
    assert torch.allclose(q.sum(1), torch.ones(40), atol=1e-5)
    assert torch.allclose(q.sum(0), torch.full((8,), 40 / 8), atol=0.02)  # equipartition
    huge = sinkhorn_knopp(torch.randn(40, 8) * 1e4, 0.04, iterations=3)  # no NaN whatever the scale
    assert torch.isfinite(huge).all() and torch.allclose(huge.sum(1), torch.ones(40), atol=1e-5)


def test_dino_loss_with_sinkhorn_targets_matches_formula():
    torch.manual_seed(2)
    k = 6
    loss_fn = DINOLoss(k, centering="sinkhorn", sinkhorn_iterations=3)
    loss_fn.center.copy_(torch.randn(1, k))  # ignored by Sinkhorn-Knopp
    student = [torch.randn(5, k) for _ in range(3)]
    teacher = [torch.randn(5, k) * 0.1 for _ in range(2)]
    targets = direct_sinkhorn(torch.cat(teacher), 0.04, 3).split(5)  # both global views together
    want, pairs = 0.0, 0
    for t, p in enumerate(targets):
        for s, x in enumerate(student):
            if s != t:
                want += -(p * torch.log_softmax(x.double() / 0.1, dim=-1)).sum(-1).mean().item()
                pairs += 1
    got = loss_fn(student, loss_fn.teacher_targets(teacher, 0.04)).item()
    assert abs(got - want / pairs) < 1e-5


def test_unknown_centering_is_refused():
    import pytest

    with pytest.raises(ValueError, match="centering"):
        DINOLoss(4, centering="mean")


def test_sinkhorn_leaves_the_centre_alone():
    loss_fn = DINOLoss(6, centering="sinkhorn")
    teacher = [torch.randn(5, 6) for _ in range(2)]
    loss_fn.update_center(teacher)
    assert torch.count_nonzero(loss_fn.center) == 0  # unused by Sinkhorn-Knopp, so not moved
