"""KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search"; DINOv2,
Oquab et al. 2023 §4): for L2-normalised features x_1..x_n of one batch,

    L_koleo = -1/n Σ_i log(min_{j≠i} ‖x_i − x_j‖ + ε),

the Kozachenko-Leonenko entropy estimator up to constants. Minimising it pushes every feature away
from its nearest neighbour, so the batch spreads over the sphere: it fights the collapse of the
representation itself, where DINO's centring only works on the head's outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8  # DINOv2's value, inside the distance and the log


def koleo_loss(features: torch.Tensor) -> torch.Tensor:
    """features (n, d), n >= 2 → scalar; per process (DINOv2 does not gather across GPUs either)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"KoLeo needs (n >= 2, d) features, got {tuple(features.shape)}")
    x = F.normalize(features.float(), dim=-1, eps=EPS)
    with torch.no_grad():  # the neighbour's index carries no gradient; the distance below does
        similarity = x @ x.t()
        similarity.fill_diagonal_(-2.0)  # below any cosine: a point is not its own neighbour
        nearest = similarity.argmax(dim=1)
    distance = F.pairwise_distance(x, x[nearest], eps=EPS)
    return -torch.log(distance + EPS).mean()
