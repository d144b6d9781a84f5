"""Linear segmentation probes on cached patch tokens, trained by the engine's Trainer.

One linear layer per (block, learning rate) applied to every patch token (linear_probes.LinearProbes:
DINOv2's grid of heads, each at its own lr through an optimiser group); its logits are upsampled
bilinearly to the mask's resolution and trained with pixel cross-entropy, ignore label 255 (the
"linear" head of DINOv2's and iBOT's segmentation evaluation). SGD momentum 0.9, no weight decay,
lr × batch / 256 with DINO's per-epoch cosine, as linear-eval. The training images' features are
extracted once without augmentation (linear-eval's cached mode).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glsd_cli.data.loader import EpochSampler
from glsd_cli.data.segmentation import IGNORE_INDEX
from glsd_cli.engine.checkpoint import CHECKPOINT_NAME
from glsd_cli.engine.task import StepContext, StepOutput, TrainingTask
from glsd_cli.engine.trainer import Trainer
from glsd_cli.eval.dense import confusion_matrix, pixel_scores
from glsd_cli.eval.linear import SGD_MOMENTUM
from glsd_cli.eval.linear_probes import LinearProbes, epoch_cosine

# Per 256 images. Wider and higher than DINOv2's classification grid: a token probe sees M² pixel
# targets per image, averaged, and few epochs.
DEFAULT_LR_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
DEFAULT_LR = 0.1


class DenseProbeTask(TrainingTask):
    """What the Trainer trains: every head on every block's tokens, pixel cross-entropy summed over heads."""

    def __init__(self, probes: LinearProbes):
        super().__init__()
        self.probes = probes

    def training_step(self, batch: dict, ctx: StepContext) -> StepOutput:  # noqa: ARG002
        masks = batch["label"].long()
        losses = [F.cross_entropy(pixel_scores(z, masks.shape[-1]), masks, ignore_index=IGNORE_INDEX)
                  for z in self.probes(batch["features"])]
        loss = torch.stack(losses).sum()
        return StepOutput(loss, {"loss": loss.detach() / len(losses)})


def train_dense_probes(tokens: list[torch.Tensor], masks: torch.Tensor, num_classes: int, lrs: list[float],
                       epochs: int, batch_size: int, seed: int, device: torch.device, run_dir: Path,
                       config: dict, quiet: bool) -> LinearProbes:
    """Heads for every (block, lr) trained on `tokens` [(N, T, D) per block] against `masks` (N, M, M)."""
    torch.manual_seed(seed)
    probes = LinearProbes([t.shape[-1] for t in tokens], num_classes, lrs)
    task = DenseProbeTask(probes).to(device)
    reference_lr = lrs[0] * batch_size / 256
    optimizer = torch.optim.SGD(probes.param_groups(lrs[0]), lr=reference_lr, momentum=SGD_MOMENTUM, weight_decay=0.0)
    sampler = EpochSampler(len(masks), batch_size, seed)
    inputs = [t.to(device) for t in tokens]
    labels = masks.to(device)

    def make(epoch: int, start_step: int):
        sampler.set_epoch(epoch, start_step)
        order = torch.as_tensor(sampler.global_order(), device=device)
        for step in range(start_step, sampler.steps_per_epoch):
            rows = order[step * batch_size:(step + 1) * batch_size]
            # "label" first: the Trainer counts a batch's images from its first entry.
            yield {"label": labels[rows], "features": [x[rows] for x in inputs]}

    for stale in (CHECKPOINT_NAME, "metrics.jsonl", "results.csv"):  # a previous call's logs would mix in
        (run_dir / stale).unlink(missing_ok=True)
    trainer = Trainer(task=task, optimizer=optimizer,
                      schedules={"lr": epoch_cosine(reference_lr, epochs, sampler.steps_per_epoch)},
                      epochs=epochs, steps_per_epoch=sampler.steps_per_epoch, run_dir=run_dir, device=device,
                      config_json=json.dumps(config, default=str), kind="dense-probe", quiet=quiet, plots=False)
    trainer.fit(make)
    return probes.eval()


@torch.no_grad()
def probe_confusions(probes: LinearProbes, tokens: list[torch.Tensor], masks: torch.Tensor, num_classes: int,
                     device: torch.device, images_per_chunk: int = 64) -> list[torch.Tensor]:
    """One confusion matrix per head over the images of `tokens` / `masks`."""
    out = [torch.zeros(num_classes, num_classes, dtype=torch.int64) for _ in probes.heads]
    for start in range(0, len(masks), images_per_chunk):
        target = masks[start:start + images_per_chunk].to(device)
        logits = probes([t[start:start + images_per_chunk].to(device) for t in tokens])
        for h, z in enumerate(logits):
            out[h] += confusion_matrix(pixel_scores(z, target.shape[-1]).argmax(1), target, num_classes)
    return out


def load_selected_probe(result: dict) -> nn.Linear | None:
    """The head dense-eval selected for its last block (from its result dict), or None when its probe
    checkpoint is gone."""
    from glsd_cli.engine.checkpoint import read_checkpoint

    chosen = result["linear"]["blocks"][-1]
    path = Path(result["linear"]["probe_run"]) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    tensors, _ = read_checkpoint(path)
    weight, bias = tensors[f"model/probes.heads.{chosen['head']}.weight"], tensors[f"model/probes.heads.{chosen['head']}.bias"]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": bias})
    return head.eval()
