"""`glsd finetune`: the pre-trained backbone plus a linear head, trained end to end (DeiT / BEiT recipe).

Recipe (docs/algorithms.md §5; MAE `main_finetune.py`, BEiT `run_class_finetuning.py`, DeiT `main.py`):
- AdamW (β 0.9, 0.999), weight decay 0.05 on weights only (not biases, norms, CLS or position embedding);
- lr 5e-4 × batch / 256 (MAE's base lr), linear warm-up over 5 epochs, then cosine to 1e-6;
- layer-wise lr decay 0.65: a parameter in layer i of L+2 gets lr × decay^(L+1-i), where the patch
  embedding, CLS and position embedding are layer 0, block b is layer b+1 (the final norm shares the
  last block's layer) and the head is layer L+1 (timm's `param_groups_layer_decay` over the model's
  `group_matcher`, after BEiT);
- mixup α 0.8, cutmix α 1.0 (one of the two per batch, switch p 0.5), label smoothing 0.1 (timm's
  `Mixup` and `SoftTargetCrossEntropy`); RandAugment n 2, m 9 (train_data.py); drop path 0.1;
- head initialised N(0, (2e-5)²) truncated, bias 0 (MAE), on the CLS after the final norm.
The classifier of the final epoch is saved (classifier.safetensors: timm's own key names, the run's
config in the metadata); the best epoch on the selection set is reported separately, never chosen on val.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode

from glsd_cli.config import Config
from glsd_cli.data.base import ImageSource
from glsd_cli.data.loader import EpochSampler, EvalDataset, make_loader
from glsd_cli.data.multicrop import EvalTransform
from glsd_cli.engine.checkpoint import CHECKPOINT_NAME, load_state_strict, read_checkpoint, save_tensors
from glsd_cli.engine.optim import adamw
from glsd_cli.engine.schedules import cosine_schedule
from glsd_cli.engine.precision import pick_device
from glsd_cli.engine.trainer import Trainer
from glsd_cli.errors import CheckpointError, DataError, GlsdError
from glsd_cli.eval.loading import load_pretrained, loader_workers
from glsd_cli.eval.report import pct, print_table, write_results
from glsd_cli.eval.splits import open_eval_splits
from glsd_cli.eval.train_data import AugmentedImages
from glsd_cli.engine.task import StepContext, StepOutput, TrainingTask
from glsd_cli.models.backbone import create_timm_model

HEAD_INIT_STD = 2e-5   # MAE main_finetune.py: trunc_normal_(model.head.weight, std=2e-5)
ADAMW_BETAS = (0.9, 0.999)
CUTMIX_SWITCH_PROB = 0.5  # DeiT / timm default: cutmix instead of mixup for half of the batches
CLASSIFIER_NAME = "classifier.safetensors"


@dataclass
class FinetuneOptions:
    train_uri: str | None = None
    val_uri: str | None = None
    select_uri: str | None = None
    holdout_fraction: float = 0.1
    seed: int = 0
    student: bool = False
    epochs: int = 100
    batch_size: int = 128
    lr: float = 5e-4            # per 256 images
    min_lr: float = 1e-6
    warmup_epochs: float = 5
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    randaug_magnitude: int = 9  # 0: no RandAugment
    min_crop_scale: float = 0.08  # RandomResizedCrop's smallest area fraction (DeiT)
    drop_path: float = 0.1
    device: str = "auto"
    precision: str | None = None  # None: the run's own run.precision
    num_workers: int | None = None
    out: Path | None = None
    quiet: bool = False


def _check(opts: FinetuneOptions) -> None:
    if opts.epochs < 1 or opts.batch_size < 1:
        raise GlsdError(f"--epochs and --batch-size must be positive, got {opts.epochs} and {opts.batch_size}")
    if opts.lr <= 0 or not 0 < opts.layer_decay <= 1:
        raise GlsdError("--lr must be positive and --layer-decay in (0, 1]")
    if not 0 <= opts.drop_path < 1 or not 0 <= opts.smoothing < 1 or opts.mixup < 0 or opts.cutmix < 0:
        raise GlsdError("--drop-path and --smoothing must be in [0, 1), --mixup and --cutmix non-negative")
    if (opts.mixup > 0 or opts.cutmix > 0) and opts.batch_size % 2:
        raise GlsdError(f"mixup/cutmix pair each image with its mirror in the batch: --batch-size {opts.batch_size} "
                        "must be even (or pass --mixup 0 --cutmix 0)")
    if not 0 < opts.min_crop_scale <= 1:
        raise GlsdError(f"--min-crop-scale must be in (0, 1], got {opts.min_crop_scale}")
    if not 0 <= opts.randaug_magnitude <= 10:
        raise GlsdError(f"--randaug-magnitude {opts.randaug_magnitude} must be in 0..10 (0: off)")


def build_classifier(cfg: Config, num_classes: int, drop_path: float) -> nn.Module:
    """The run's timm architecture with a fresh `num_classes` head; backbone weights still random."""
    model = create_timm_model(cfg.model, cfg.data.global_crop_size, drop_path)
    model.reset_classifier(num_classes)
    head = model.get_classifier()  # `head` on ViTs, `head.fc` on Swin
    nn.init.trunc_normal_(head.weight, std=HEAD_INIT_STD)
    nn.init.zeros_(head.bias)
    return model


def classifier_state_names(model: nn.Module) -> set[str]:
    """state_dict names of the classification head (what the pre-trained backbone does not have)."""
    head = set(map(id, model.get_classifier().parameters()))
    return {name for name, p in model.named_parameters() if id(p) in head}


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with `lr_scale` = decay^(num_layers - 1 - layer id) from timm's group_matcher."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip,
                                    layer_decay=layer_decay)


class FinetuneTask(TrainingTask):
    """The Trainer's task: mixup/cutmix (seeded per step) → classifier → soft-target cross-entropy."""

    def __init__(self, model: nn.Module, num_classes: int, opts: FinetuneOptions):
        super().__init__()
        self.model = model
        self.seed = opts.seed
        self.mixup = (Mixup(mixup_alpha=opts.mixup, cutmix_alpha=opts.cutmix, switch_prob=CUTMIX_SWITCH_PROB,
                            mode="batch", label_smoothing=opts.smoothing, num_classes=num_classes)
                      if opts.mixup > 0 or opts.cutmix > 0 else None)
        self.soft_loss = SoftTargetCrossEntropy()
        self.hard_loss = nn.CrossEntropyLoss(label_smoothing=opts.smoothing)  # same smoothing as timm's Mixup

    def mix(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, targets): mixed images and soft targets (B, C) with mixup/cutmix, else the inputs."""
        if self.mixup is None:
            return images, labels
        # timm's Mixup draws from numpy's global RNG: seed it from (seed, step) so a batch's mix is
        # reproducible, and put the global state back afterwards.
        saved = np.random.get_state()
        np.random.seed(int(np.random.SeedSequence([self.seed & 0xFFFFFFFF, step]).generate_state(1)[0]))
        try:
            return self.mixup(images, labels)
        finally:
            np.random.set_state(saved)

    def training_step(self, batch: dict, ctx: StepContext) -> StepOutput:
        images, targets = self.mix(batch["image"], batch["label"], ctx.step)
        logits = self.model(images)
        loss = self.soft_loss(logits, targets) if targets.dim() == 2 else self.hard_loss(logits, targets)
        return StepOutput(loss, {"loss": loss.detach()})


@torch.no_grad()
def classify_accuracy(model: nn.Module, source: ImageSource, size: int, device: torch.device, batch_size: int,
                      num_workers: int = 0) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) of a classifier on a source through the evaluation transform."""
    was_training = model.training
    model.eval()
    loader = DataLoader(EvalDataset(source, EvalTransform(size)), batch_size=batch_size, num_workers=num_workers)
    top1 = top5 = 0
    for images, labels, _ in loader:
        logits = model(images.to(device))
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
        top1 += int((ranked[:, 0] == labels).sum())
        top5 += int((ranked == labels[:, None]).any(1).sum())
    model.train(was_training)
    return 100.0 * top1 / len(source), 100.0 * top5 / len(source)


def load_finetuned(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """A saved fine-tuned classifier (in eval mode) and its metadata (config, classes, options)."""
    tensors, meta = read_checkpoint(path, device="cpu")
    if meta.get("kind") != "finetune":
        raise CheckpointError(f"{path} is a '{meta.get('kind')}' file, not a fine-tuned classifier")
    cfg = Config.from_json(meta["config"])
    model = create_timm_model(cfg.model, cfg.data.global_crop_size)
    model.reset_classifier(len(json.loads(meta["classes"])))
    load_state_strict(model, tensors, f"classifier {path}")
    return model.to(device).eval(), meta


def default_out_dir(checkpoint_file: Path) -> Path:
    prefix = "" if checkpoint_file.name == CHECKPOINT_NAME else f"{checkpoint_file.stem}."
    return checkpoint_file.parent / f"{prefix}finetune"


def run_finetune(checkpoint: Path, opts: FinetuneOptions) -> dict:
    _check(opts)
    device = pick_device(opts.device)
    cfg, method, file = load_pretrained(checkpoint, device)
    which = "student" if opts.student else "teacher"
    splits = open_eval_splits(cfg, opts.train_uri, opts.val_uri, opts.select_uri,
                              opts.holdout_fraction, opts.seed)
    if len(splits.train) < opts.batch_size:
        raise DataError(f"the training data has {len(splits.train)} images, fewer than one batch of "
                        f"{opts.batch_size}; lower --batch-size")
    torch.manual_seed(opts.seed)
    model = build_classifier(cfg, splits.num_classes, opts.drop_path)
    fresh_head = {name: t for name, t in model.state_dict().items() if name in classifier_state_names(model)}
    load_state_strict(model, {**method.backbone(which).model.state_dict(), **fresh_head}, f"checkpoint {file}")
    del method  # the pre-trained networks are not needed any more
    model.to(device)
    task = FinetuneTask(model, splits.num_classes, opts).to(device)
    optimizer = adamw(layer_decay_groups(model, opts.weight_decay, opts.layer_decay), betas=ADAMW_BETAS)
    size = cfg.data.global_crop_size
    workers = loader_workers(opts.num_workers, cfg)
    dataset = AugmentedImages(splits.train, size, opts.seed, interpolation=InterpolationMode.BICUBIC,
                              randaugment_magnitude=opts.randaug_magnitude or None, min_crop_scale=opts.min_crop_scale)
    sampler = EpochSampler(len(splits.train), opts.batch_size, opts.seed)

    def make_epoch_loader(epoch: int, start_step: int):
        sampler.set_epoch(epoch, start_step)
        dataset.set_epoch(epoch)
        return make_loader(dataset, sampler, opts.batch_size, workers, seed=opts.seed)

    history: list[dict[str, float]] = []

    def score_epoch(epoch: int) -> dict[str, float]:
        scores = dict(zip(("val_top1", "val_top5"),
                          classify_accuracy(model, splits.val, size, device, opts.batch_size, workers)))
        if splits.select is not None:
            scores["holdout_top1"] = classify_accuracy(model, splits.select, size, device, opts.batch_size, workers)[0]
        history.append(scores)
        return scores

    out_dir = Path(opts.out) if opts.out is not None else default_out_dir(file)
    for stale in (CHECKPOINT_NAME, "metrics.jsonl", "results.csv"):  # a previous call's logs would mix in
        (out_dir / stale).unlink(missing_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(opts).items()}
    lr = opts.lr * opts.batch_size / 256  # linear scaling rule (Goyal et al. 2017), as MAE and BEiT
    schedule = cosine_schedule(lr, opts.min_lr, opts.epochs, sampler.steps_per_epoch, opts.warmup_epochs)
    trainer = Trainer(task=task, optimizer=optimizer, schedules={"lr": schedule}, epochs=opts.epochs,
                      steps_per_epoch=sampler.steps_per_epoch, run_dir=out_dir, device=device,
                      config_json=json.dumps({"pretrain_checkpoint": str(file), "finetune": settings}),
                      kind="finetune-state", precision=opts.precision or cfg.run.precision,
                      epoch_end_hook=score_epoch, quiet=opts.quiet)
    started = time.perf_counter()
    trainer.fit(make_epoch_loader)
    seconds = time.perf_counter() - started

    classifier_path = out_dir / CLASSIFIER_NAME
    save_tensors(classifier_path, model.state_dict(), {
        "kind": "finetune", "config": cfg.to_json(), "classes": json.dumps(splits.full_train.classes),
        "finetune": json.dumps(settings), "pretrain_checkpoint": str(file), "backbone": which})
    row = _summary_row(history, opts.epochs)
    result = {
        "checkpoint": str(file), "backbone": which, "classifier": str(classifier_path),
        "train_data": splits.full_train.uri, "num_train": len(splits.train), "val_data": splits.val.uri,
        "num_val": len(splits.val), "selection": splits.select_note, "settings": settings,
        "how_to_read": ("accuracies (%) are on val. final_*: the final epoch, whose classifier is saved; nothing "
                        "selected. best_epoch_*: the epoch (counted from 1) selected on the selection set."),
        "summary": row, "history": history, "seconds": round(seconds, 3),
    }
    write_results(out_dir / "finetune.json", out_dir / "finetune.csv", result, [row])
    _print(result, row, out_dir)
    return result


def _summary_row(history: list[dict[str, float]], epochs: int) -> dict:
    last = history[-1]
    row = {"epochs": epochs, "final_top1": last["val_top1"], "final_top5": last["val_top5"]}
    if "holdout_top1" in last:
        best = max(range(len(history)), key=lambda e: (history[e]["holdout_top1"], -e))  # ties: earliest
        row.update({"best_epoch": best + 1, "best_epoch_holdout_top1": history[best]["holdout_top1"],
                    "best_epoch_top1": history[best]["val_top1"], "best_epoch_top5": history[best]["val_top5"]})
    return row


def _print(result: dict, row: dict, out_dir: Path) -> None:
    columns = [f"top-1 (final, epoch {row['epochs']})", "top-5"]
    values = [pct(row["final_top1"]), pct(row["final_top5"])]
    if "best_epoch" in row:
        columns += ["epoch*", "top-1 @ epoch*"]
        values += [str(row["best_epoch"]), pct(row["best_epoch_top1"])]
    caption = ("val accuracy (%); the final epoch's classifier is saved, nothing selected"
               + (f"; * epoch selected on the selection set: {result['selection']}" if "best_epoch" in row else "")
               + f". Files in {out_dir}")
    print_table(f"Fine-tuned classifier ({result['backbone']} backbone, {result['num_train']} training images)",
                columns, [values], caption)
