"""Linear probes trained jointly on frozen features, and how their scores become a report.

One `nn.Linear` per (representation, learning rate) pair (DINOv2's grid of heads,
`dinov2/eval/linear.py`): the heads share each batch but not their parameters, so summing their
losses trains each exactly as if it were alone, at its own learning rate (an optimiser group with
`lr_scale`, which the engine's Trainer multiplies into the scheduled lr).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from glsd_cli.eval.features import FeatureRequest
from glsd_cli.engine.task import StepContext, StepOutput, TrainingTask
from glsd_cli.models.backbone import Backbone

INIT_STD = 0.01  # DINO eval_linear.py LinearClassifier: weight ~ N(0, 0.01²), bias 0


@dataclass(frozen=True)
class Representation:
    """One probe input: rows of the extracted CLS stack concatenated, optionally + the patch-token mean."""

    name: str                   # "last 4 blocks", "block 3", ...
    cls_rows: tuple[int, ...]   # rows of feats['cls'] (L, N, D), in block order
    patch_mean: bool = False

    def dim(self, embed_dim: int) -> int:
        return embed_dim * (len(self.cls_rows) + int(self.patch_mean))

    def build(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [feats["cls"][i] for i in self.cls_rows]
        if self.patch_mean:
            parts.append(feats["patch_mean"])
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


class LinearProbes(nn.Module):
    """Heads indexed `r * len(lrs) + g`: representation r, learning rate lrs[g]."""

    def __init__(self, dims: list[int], num_classes: int, lrs: list[float]):
        super().__init__()
        self.dims, self.lrs = list(dims), list(lrs)
        self.heads = nn.ModuleList()
        for d in self.dims:
            for _ in self.lrs:
                head = nn.Linear(d, num_classes)
                nn.init.normal_(head.weight, mean=0.0, std=INIT_STD)
                nn.init.zeros_(head.bias)
                self.heads.append(head)

    def index(self, representation: int, lr_index: int) -> int:
        return representation * len(self.lrs) + lr_index

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.heads[self.index(r, g)](x) for r, x in enumerate(inputs) for g in range(len(self.lrs))]

    def param_groups(self, reference_lr: float) -> list[dict]:
        """One optimiser group per head; `lr_scale` makes its lr lrs[g] when the schedule gives `reference_lr`."""
        return [{"params": list(self.heads[self.index(r, g)].parameters()), "lr_scale": lr / reference_lr,
                 "weight_decay": 0.0} for r in range(len(self.dims)) for g, lr in enumerate(self.lrs)]


class ProbeTask(TrainingTask):
    """What the Trainer trains: the probes, fed cached features or a frozen backbone's features of images."""

    def __init__(self, probes: LinearProbes, representations: list[Representation],
                 backbone: Backbone | None = None, request: FeatureRequest | None = None):
        super().__init__()
        self.probes = probes
        self.representations = representations
        self.request = request
        # Deliberately not a registered submodule: the frozen backbone stays out of the probe
        # checkpoints the Trainer writes every epoch, and the Trainer's task.train() cannot switch it
        # out of eval mode.
        object.__setattr__(self, "frozen_backbone", backbone)

    def training_step(self, batch: dict, ctx: StepContext) -> StepOutput:
        if self.frozen_backbone is not None:
            with torch.no_grad():
                feats = self.request.compute(self.frozen_backbone, batch["image"])
            inputs = [r.build(feats).float() for r in self.representations]
        else:
            inputs = batch["features"]
        logits = self.probes(inputs)
        loss = torch.stack([F.cross_entropy(z, batch["label"]) for z in logits]).sum()
        return StepOutput(loss, {"loss": loss.detach() / len(logits)})


@torch.no_grad()
def probe_accuracies(probes: LinearProbes, inputs: list[torch.Tensor], labels: torch.Tensor,
                     device: torch.device, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 and top-5 accuracy (%) of every head, each of shape (num_heads,)."""
    was_training = probes.training
    probes.eval()
    top1 = torch.zeros(len(probes.heads))
    top5 = torch.zeros(len(probes.heads))
    for start in range(0, len(labels), chunk):
        target = labels[start:start + chunk].to(device)
        logits = probes([x[start:start + chunk].to(device) for x in inputs])
        for h, z in enumerate(logits):
            ranked = z.topk(min(5, z.shape[1]), dim=1).indices
            top1[h] += int((ranked[:, 0] == target).sum())
            top5[h] += int((ranked == target[:, None]).any(1).sum())
    probes.train(was_training)
    return 100.0 * top1 / len(labels), 100.0 * top5 / len(labels)


def epoch_cosine(base: float, epochs: int, steps_per_epoch: int) -> np.ndarray:
    """DINO eval_linear.py: CosineAnnealingLR(T_max=epochs, eta_min=0) stepped once per epoch, so
    epoch e trains at base·(1 + cos(π e / epochs)) / 2 throughout; returned per iteration."""
    per_epoch = base * 0.5 * (1 + np.cos(np.pi * np.arange(epochs) / epochs))
    return np.repeat(per_epoch, steps_per_epoch)


@dataclass
class EpochScores:
    """Every head's accuracies after one epoch: on the selection set (None without one) and on val."""

    select_top1: torch.Tensor | None
    val_top1: torch.Tensor
    val_top5: torch.Tensor


def report_rows(history: list[EpochScores], probes: LinearProbes, representations: list[Representation],
                embed_dim: int, default_lr_index: int) -> list[dict]:
    """Per representation: the final-epoch val accuracy at the protocol's lr (nothing selected) and,
    with a selection set, (a) the lr chosen on it at the final epoch and (b) the (lr, epoch) chosen on
    it, each with its val accuracy. Ties go to the earliest epoch, then the smallest lr."""
    last = history[-1]
    rows = []
    for r, rep in enumerate(representations):
        heads = [probes.index(r, g) for g in range(len(probes.lrs))]
        d = heads[default_lr_index]
        row = {"probe": rep.name, "dim": rep.dim(embed_dim), "lr": probes.lrs[default_lr_index],
               "final_top1": float(last.val_top1[d]), "final_top5": float(last.val_top5[d])}
        if last.select_top1 is not None:
            g = int(torch.argmax(last.select_top1[heads]))  # argmax returns the first maximum
            row.update({"best_lr": probes.lrs[g], "best_lr_holdout_top1": float(last.select_top1[heads[g]]),
                        "best_lr_top1": float(last.val_top1[heads[g]]), "best_lr_top5": float(last.val_top5[heads[g]])})
            grid = torch.stack([s.select_top1[heads] for s in history])  # (epochs, lrs)
            flat = int(torch.argmax(grid.reshape(-1)))
            e, g = divmod(flat, len(heads))
            row.update({"best_epoch_lr": probes.lrs[g], "best_epoch": e + 1,
                        "best_epoch_holdout_top1": float(grid[e, g]),
                        "best_epoch_top1": float(history[e].val_top1[heads[g]]),
                        "best_epoch_top5": float(history[e].val_top5[heads[g]])})
        rows.append(row)
    return rows
