"""Weighted k-NN classification of DINO (Wu et al. 2018 as used by Caron et al. 2021, `eval_knn.py`).

For each test feature, the k training features of highest cosine similarity vote for their class
with weight exp(sim / T); the class scores rank the predictions. Features are L2-normalised here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, ks: tuple[int, ...] = DEFAULT_KS,
                 temperature: float = DEFAULT_TEMPERATURE, chunk: int = 1024) -> dict[int, dict[str, float]]:
    """Top-1 and top-5 accuracy (in %) for each k. k larger than the training set is clamped to it.

    Works for any number of test images (including fewer than k or than classes); processes the test
    set in chunks so the similarity matrix never exceeds `chunk` × N_train.
    """
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("k-NN needs at least one training and one test feature")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    train_labels = train_labels.long()
    test_labels = test_labels.long()
    k_max = min(max(ks), len(train))
    top5_n = min(5, num_classes)
    correct = {k: [0, 0] for k in ks}
    for start in range(0, len(test), chunk):
        sim = test[start:start + chunk] @ train.T
        top_sim, top_idx = sim.topk(k_max, dim=1)  # sorted, most similar first
        top_labels = train_labels[top_idx]
        weights = (top_sim / temperature).exp()
        target = test_labels[start:start + chunk]
        for k in ks:
            votes = weighted_votes(weights, top_labels, min(k, k_max), num_classes)
            pred = votes.argsort(dim=1, descending=True, stable=True)
            correct[k][0] += int((pred[:, 0] == target).sum())
            correct[k][1] += int((pred[:, :top5_n] == target[:, None]).any(1).sum())
    n = len(test)
    return {k: {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n} for k, (c1, c5) in correct.items()}


def weighted_votes(weights: torch.Tensor, top_labels: torch.Tensor, k: int, num_classes: int) -> torch.Tensor:
    """(Q, num_classes) class scores: each query's k first neighbours (sorted, most similar first) add
    their weight exp(sim / T) to their class."""
    votes = torch.zeros(len(weights), num_classes, dtype=weights.dtype, device=weights.device)
    return votes.scatter_add_(1, top_labels[:, :k], weights[:, :k])
