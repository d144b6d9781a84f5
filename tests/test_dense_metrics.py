"""Dense evaluation's arithmetic against independent formulas: mIoU, token labels, upsampling, patch k-NN."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from glsd_cli.data.segmentation import IGNORE_INDEX
from glsd_cli.eval.dense import (confusion_matrix, knn_segmentation, pixel_scores, segmentation_scores,
                                 token_label_distributions)


def test_miou_and_pixel_accuracy_match_a_per_class_count():
    rng = np.random.default_rng(0)
    classes = 5
    target = rng.integers(0, classes, size=(3, 7, 7))
    target[rng.random(target.shape) < 0.2] = IGNORE_INDEX
    target[target == 4] = 0  # class 4 never occurs in the ground truth ...
    pred = rng.integers(0, classes - 1, size=target.shape)  # ... nor in the predictions: no IoU
    scores = segmentation_scores(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), classes))
    valid = target != IGNORE_INDEX
    ious = []
    for c in range(classes):
        tp = np.sum((pred == c) & (target == c) & valid)
        fp = np.sum((pred == c) & (target != c) & valid)
        fn = np.sum((pred != c) & (target == c) & valid)
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
            assert scores["iou"][str(c)] == pytest.approx(100 * ious[-1], abs=1e-3)
        else:
            assert scores["iou"][str(c)] is None
    assert scores["miou"] == pytest.approx(100 * np.mean(ious))
    assert scores["pixel_acc"] == pytest.approx(100 * np.sum((pred == target) & valid) / valid.sum())
    assert scores["num_pixels"] == valid.sum()


def test_a_class_only_predicted_counts_with_iou_zero():
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    pred = torch.tensor([[[0, 0], [0, 1]]])
    scores = segmentation_scores(confusion_matrix(pred, target, 3))
    assert scores["iou"] == {"0": 75.0, "1": 0.0, "2": None} and scores["miou"] == pytest.approx(37.5)


def test_token_label_distributions_count_each_cells_pixels_ignoring_255():
    rng = np.random.default_rng(1)
    masks = rng.integers(0, 3, size=(2, 8, 8)).astype(np.uint8)
    masks[0, :4, :4] = IGNORE_INDEX                 # one cell entirely ignored
    masks[1, 4:, :4] = IGNORE_INDEX
    masks[1, 4, 0] = 2                              # one labelled pixel among ignored ones is all of it
    dist, valid = token_label_distributions(torch.from_numpy(masks), 4, 3)
    for n in range(2):
        for r in range(2):
            for c in range(2):
                cell = masks[n, 4 * r:4 * r + 4, 4 * c:4 * c + 4].ravel()
                cell = cell[cell != IGNORE_INDEX]
                assert bool(valid[n, 2 * r + c]) == (cell.size > 0)
                if cell.size:
                    expected = np.bincount(cell, minlength=3) / cell.size
                    assert dist[n, 2 * r + c].numpy() == pytest.approx(expected)
    assert not valid[0, 0] and dist[1, 2].tolist() == [0.0, 0.0, 1.0]


def test_pixel_scores_upsample_bilinearly_with_half_pixel_centres():
    scores = torch.tensor([[[0.0], [1.0], [2.0], [3.0]]])  # 2x2 grid, one class: [[0, 1], [2, 3]]
    up = pixel_scores(scores, 4)[0, 0]
    # Pixel centres at (i + 0.5) / 4 of the side; token centres at 1/4 and 3/4: pixel 0 clamps to token 0,
    # pixel 1 lies a quarter of the way from token 0 to token 1.
    assert up[0, 0] == 0 and up[0, 3] == 1 and up[3, 0] == 2 and up[3, 3] == 3
    assert up[0, 1] == pytest.approx(0.25) and up[1, 1] == pytest.approx(0.25 + 0.5)


def brute_force_knn(train_tokens, train_masks, eval_tokens, num_classes, k, temperature):
    """Per evaluation token: explicit cosine similarities, sort, the exp-weighted sum of the k nearest
    tokens' class fractions (each training token's pixels counted by hand); argmax (lower class on ties)."""
    grid = math.isqrt(train_tokens.shape[1])
    cell = train_masks.shape[-1] // grid
    bank = []
    for n in range(len(train_tokens)):
        for t in range(grid * grid):
            r, c = divmod(t, grid)
            pixels = train_masks[n, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].reshape(-1).tolist()
            pixels = [p for p in pixels if p != IGNORE_INDEX]
            if pixels:
                bank.append((train_tokens[n, t], [pixels.count(j) / len(pixels) for j in range(num_classes)]))
    preds = []
    for q in eval_tokens.reshape(-1, eval_tokens.shape[-1]):
        sims = sorted(((float(q @ t) / float(q.norm() * t.norm()), d) for t, d in bank), key=lambda p: -p[0])
        votes = [0.0] * num_classes
        for s, d in sims[:k]:
            for j in range(num_classes):
                votes[j] += math.exp(s / temperature) * d[j]
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(preds).reshape(eval_tokens.shape[:2])


def test_patch_knn_matches_brute_force_on_the_token_grid():
    torch.manual_seed(0)
    classes, grid = 4, 3
    train = torch.randn(5, grid * grid, 6, dtype=torch.float64)
    val = torch.randn(2, grid * grid, 6, dtype=torch.float64)
    # Training masks of 2 x 2 pixels per token: mixed cells, an ignored pixel, an ignored cell.
    train_masks = torch.randint(0, classes, (5, 2 * grid, 2 * grid), dtype=torch.uint8)
    train_masks[0, 0, 0] = IGNORE_INDEX
    train_masks[1, :2, :2] = IGNORE_INDEX  # a token over ignored pixels only leaves the bank
    val_masks = torch.randint(0, classes, (2, grid, grid), dtype=torch.uint8)
    val_masks[1, 2, 2] = IGNORE_INDEX
    # Evaluation masks at the token grid's resolution: upsampling is the identity, one pixel per token.
    conf = knn_segmentation(train, train_masks, val, val_masks, classes, k=7, temperature=0.1, max_similarities=400)
    pred = brute_force_knn(train, train_masks, val, classes, 7, 0.1)
    assert torch.equal(conf, confusion_matrix(pred.reshape(2, grid, grid), val_masks, classes))


def test_patch_knn_is_perfect_on_tokens_that_encode_their_class():
    classes, grid = 3, 4
    rng = torch.Generator().manual_seed(0)
    masks = torch.randint(0, classes, (6, grid, grid), generator=rng).to(torch.uint8)
    tokens = torch.nn.functional.one_hot(masks.reshape(6, -1).long(), classes).float()
    tokens = tokens + 0.01 * torch.randn(tokens.shape, generator=rng)
    conf = knn_segmentation(tokens[:4], masks[:4], tokens[4:], masks[4:], classes, k=3)
    scores = segmentation_scores(conf)
    assert scores["num_pixels"] == 2 * grid * grid and scores["miou"] == 100.0
