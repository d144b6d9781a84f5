"""KoLeo regulariser against a direct re-computation (Sablayrolles et al. 2019; DINOv2)."""
import math

import pytest
import torch

from glsd_cli.losses.koleo import koleo_loss


def direct_koleo(x: torch.Tensor) -> float:
    """-1/n Σ_i log(min_{j≠i} ‖x̂_i − x̂_j‖ + 1e-8), x̂ = x / ‖x‖, with explicit loops."""
    rows = [[float(v) for v in r] for r in x.double()]
    unit = [[v / math.sqrt(sum(w * w for w in r)) for v in r] for r in rows]
    total = 0.0
    for i, a in enumerate(unit):
        nearest = min(math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b))) for j, b in enumerate(unit) if j != i)
        total += -math.log(nearest + 1e-8)
    return total / len(unit)


def test_koleo_matches_formula():
    torch.manual_seed(0)
    x = torch.randn(9, 5) * 3
    assert koleo_loss(x).item() == pytest.approx(direct_koleo(x), rel=1e-5)


def test_koleo_hand_computed_case():
    # Three unit vectors in the plane at 0°, 90° and 180°: each one's nearest neighbour is at 90°,
    # distance √2, so the loss is -log √2 for all.
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    assert koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)


def test_koleo_is_lower_for_spread_features_and_its_gradient_spreads_them():
    close = torch.tensor([[1.0, 0.00], [1.0, 0.05], [1.0, -0.05]], requires_grad=True)
    spread = torch.tensor([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]])
    assert koleo_loss(spread) < koleo_loss(close)
    koleo_loss(close).backward()
    # Gradient descent moves the upper point up and the lower one down: away from their neighbour.
    assert close.grad[1, 1] < 0 and close.grad[2, 1] > 0


def test_koleo_needs_two_features():
    with pytest.raises(ValueError, match="KoLeo"):
        koleo_loss(torch.randn(1, 4))
