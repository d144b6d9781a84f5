"""Dense evaluation's arithmetic: token scores → pixel predictions → mIoU, and patch-level k-NN.

- Token scores (logits of a linear probe, or k-NN votes) on the G x G token grid are upsampled
  bilinearly to the mask's M x M pixels and the argmax is each pixel's class (the linear
  segmentation protocol of DINOv2 / iBOT, "linear" head: logits upsampled to the label size).
- mIoU: per class IoU = TP / (TP + FP + FN) over all evaluated pixels of the split (one confusion
  matrix, not a mean of per-image scores), averaged over the classes that occur in the ground truth
  or the predictions (a class with an empty union has no IoU), as mmsegmentation's `mean_iou`.
  Pixels labelled IGNORE_INDEX count nowhere. Pixel accuracy: correct / evaluated pixels.
- Patch k-NN label transfer (Balažević et al. 2023, "Hummingbird"; docs/algorithms.md §7): each
  training token carries the class distribution of the mask pixels it covers (ignore pixels left
  out; a token over ignore pixels only leaves the bank); each evaluation token averages the
  distributions of its k most cosine-similar training tokens with DINO's weights exp(sim / T),
  normalised to sum to 1, and those scores go through the same upsampling.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

from glsd_cli.data.segmentation import IGNORE_INDEX


def grid_side(num_tokens: int) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a square grid")
    return side


def pixel_scores(token_scores: torch.Tensor, mask_size: int) -> torch.Tensor:
    """(B, T, C) scores on a square token grid → (B, C, M, M) by bilinear upsampling."""
    b, t, c = token_scores.shape
    g = grid_side(t)
    grid = token_scores.transpose(1, 2).reshape(b, c, g, g)
    return F.interpolate(grid, size=(mask_size, mask_size), mode="bilinear", align_corners=False)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts [true, predicted] over the pixels not labelled ignore."""
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = target != IGNORE_INDEX
    flat = target[keep] * num_classes + pred[keep]
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def segmentation_scores(confusion: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """mIoU and pixel accuracy (in %) of a confusion matrix, and every class's IoU (None: not present)."""
    conf = confusion.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    total = conf.sum()
    names = class_names or [str(i) for i in range(len(iou))]
    return {
        "miou": 100.0 * float(iou[present].mean()) if bool(present.any()) else 0.0,
        "pixel_acc": 100.0 * float(tp.sum() / total) if total > 0 else 0.0,
        "num_pixels": int(total),
        "iou": {n: (None if math.isnan(v) else round(100.0 * v, 4)) for n, v in zip(names, iou.tolist())},
    }


def token_label_distributions(masks: torch.Tensor, num_tokens: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, M, M) masks → ((N, T, C) float: each token cell's class distribution over its non-ignored
    pixels, (N, T) bool: the cell has at least one such pixel). Cells are the G x G tiles of the mask
    (adaptive pooling when M is not a multiple of G)."""
    g = grid_side(num_tokens)
    labels = masks.long()
    valid = labels != IGNORE_INDEX
    one_hot = F.one_hot(torch.where(valid, labels, num_classes), num_classes + 1)[..., :num_classes]
    counts = F.adaptive_avg_pool2d(one_hot.permute(0, 3, 1, 2).float(), (g, g))  # (N, C, G, G)
    counts = counts.flatten(2).transpose(1, 2)  # (N, T, C)
    total = counts.sum(-1)
    return counts / total.clamp_min(1e-12).unsqueeze(-1), total > 0


@torch.no_grad()
def knn_pixel_scores(train_tokens: torch.Tensor, train_masks: torch.Tensor, eval_tokens: torch.Tensor,
                     mask_size: int, num_classes: int, k: int = 20, temperature: float = 0.07,
                     device: torch.device | str = "cpu", max_similarities: int = 2 ** 26
                     ) -> Iterator[tuple[int, torch.Tensor]]:
    """Patch k-NN label transfer (module docstring): (first image, (B, C, M, M) scores) per chunk.

    train_tokens (N, T, D), train_masks (N, M', M'), eval_tokens (Q, T', D). Queries go in chunks of
    whole images, as many as keep the similarity matrix, and the neighbours' gathered distributions,
    within `max_similarities` entries each (256 MiB)."""
    distributions, keep = token_label_distributions(train_masks, train_tokens.shape[1], num_classes)
    keep = keep.reshape(-1)
    if not bool(keep.any()):
        raise ValueError("every training token covers ignored pixels only: the k-NN bank is empty")
    bank = F.normalize(train_tokens.reshape(-1, train_tokens.shape[-1])[keep].float(), dim=1).to(device)
    bank_labels = distributions.reshape(-1, num_classes)[keep].to(device)
    kk = min(k, len(bank))
    per_image = eval_tokens.shape[1]
    images_per_chunk = max(1, max_similarities // (per_image * max(len(bank), kk * num_classes)))
    for start in range(0, len(eval_tokens), images_per_chunk):
        chunk = eval_tokens[start:start + images_per_chunk].to(device)
        queries = F.normalize(chunk.reshape(-1, chunk.shape[-1]).float(), dim=1)
        top_sim, top_idx = (queries @ bank.T).topk(kk, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.einsum("qk,qkc->qc", weights, bank_labels[top_idx])
        votes = votes / votes.sum(1, keepdim=True)
        yield start, pixel_scores(votes.reshape(len(chunk), per_image, num_classes), mask_size)


def knn_segmentation(train_tokens: torch.Tensor, train_masks: torch.Tensor, eval_tokens: torch.Tensor,
                     eval_masks: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07,
                     device: torch.device | str = "cpu", max_similarities: int = 2 ** 26) -> torch.Tensor:
    """Confusion matrix of patch-level k-NN label transfer over the evaluation images (eval_masks (Q, M, M))."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for start, scores in knn_pixel_scores(train_tokens, train_masks, eval_tokens, eval_masks.shape[-1], num_classes,
                                          k, temperature, device, max_similarities):
        masks = eval_masks[start:start + len(scores)].to(device)
        confusion += confusion_matrix(scores.argmax(1), masks, num_classes)
    return confusion
