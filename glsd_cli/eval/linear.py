"""`glsd linear-eval`: linear probes on a frozen backbone, DINO's protocol (docs/algorithms.md §5).

Protocol (DINO `eval_linear.py`): features = the CLS of the last n blocks after the final norm,
concatenated (n = 4 for ViT-S; ViT-B and wider: n = 1 plus the mean patch token); one linear layer
(weights N(0, 0.01²), bias 0); SGD momentum 0.9, weight decay 0, lr 0.001 × batch / 256 with a
per-epoch cosine to 0 over 100 epochs; train augmentation RandomResizedCrop + flip; evaluation
resize 256/224 + centre crop. With `--layers`, one probe per block on that block's CLS instead.

Two modes, one engine (the Trainer of engine/trainer.py runs both):
- augmented (default): the frozen backbone runs on freshly augmented images at every step;
- cached (`--cached`): the training images' frozen features are extracted once (evaluation
  transform, no augmentation; cached on disk) and the probes train on them — a grid of learning
  rates at once (DINOv2), much faster, usually within a point of the augmented protocol.
Reported: the final-epoch val accuracy at the protocol's lr; then, separately and labelled, the lr
and the (lr, epoch) selected on a selection set that is never val (see splits.py).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from glsd_cli.data.base import SubsetSource
from glsd_cli.data.loader import EpochSampler, make_loader
from glsd_cli.engine.checkpoint import CHECKPOINT_NAME
from glsd_cli.engine.precision import pick_device
from glsd_cli.engine.trainer import Trainer
from glsd_cli.errors import DataError, GlsdError
from glsd_cli.eval.feature_cache import FeatureCache
from glsd_cli.eval.features import FeatureRequest, parse_blocks
from glsd_cli.eval.linear_probes import (EpochScores, LinearProbes, ProbeTask, Representation, epoch_cosine,
                                         probe_accuracies, report_rows)
from glsd_cli.eval.loading import load_pretrained, loader_workers
from glsd_cli.eval.report import check_output, pct, print_table, result_paths, write_results
from glsd_cli.eval.splits import EvalSplits, open_eval_splits
from glsd_cli.eval.train_data import AugmentedImages
from glsd_cli.models.backbone import Backbone

DEFAULT_LR = 1e-3  # per 256 images (DINO eval_linear.py --lr)
# DINOv2 dinov2/eval/linear.py default --learning-rates, likewise per 256 images.
DINOV2_LR_GRID = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
SGD_MOMENTUM = 0.9
WIDE_EMBED_DIM = 768  # DINO: n = 4 blocks for ViT-S (384); n = 1 + mean patch token for ViT-B (768) and wider


@dataclass
class LinearOptions:
    train_uri: str | None = None
    val_uri: str | None = None
    select_uri: str | None = None
    holdout_fraction: float = 0.1
    seed: int = 0
    layers: str | None = None           # 'all' or 1-based block numbers: one probe per block
    n_last_blocks: int | None = None    # None: 4, or 1 for wide backbones (DINO)
    avgpool: bool | None = None         # None: on for wide backbones (DINO)
    student: bool = False
    cached: bool = False
    augment: bool = True
    min_crop_scale: float = 0.08        # RandomResizedCrop's smallest area fraction (torchvision's default)
    epochs: int = 100
    batch_size: int = 256
    lr: float = DEFAULT_LR
    lr_grid: tuple[float, ...] | None = None  # None: DINOv2's grid when cached, the protocol lr alone otherwise
    device: str = "auto"
    num_workers: int | None = None
    cache: bool = True
    cache_dir: Path | None = None
    output: Path | None = None
    quiet: bool = False


def _check(opts: LinearOptions) -> None:
    check_output(opts.output)
    if opts.epochs < 1 or opts.batch_size < 1:
        raise GlsdError(f"--epochs and --batch-size must be positive, got {opts.epochs} and {opts.batch_size}")
    if opts.lr <= 0 or any(lr <= 0 for lr in opts.lr_grid or ()):
        raise GlsdError("learning rates must be positive")
    if opts.layers is not None and (opts.n_last_blocks is not None or opts.avgpool is not None):
        raise GlsdError("--layers trains one probe per block; drop --n-last-blocks/--avgpool-patchtokens")
    if opts.cached and not opts.augment:
        raise GlsdError("--no-augment applies to the augmented mode; --cached never augments")
    if not 0 < opts.min_crop_scale <= 1:
        raise GlsdError(f"--min-crop-scale must be in (0, 1], got {opts.min_crop_scale}")


def representations(opts: LinearOptions, backbone: Backbone) -> tuple[FeatureRequest, list[Representation], str]:
    """What one forward pass extracts, the probe inputs built from it, and a sentence describing them."""
    depth = backbone.num_blocks
    blocks = parse_blocks(opts.layers, depth)
    if blocks is not None:
        reps = [Representation(f"block {b + 1}", (i,)) for i, b in enumerate(blocks)]
        return FeatureRequest(tuple(blocks)), reps, "each listed block's CLS after the final norm, one probe each"
    if not backbone.has_cls:  # Swin: its one representation is the mean of the final tokens
        if opts.n_last_blocks is not None or opts.avgpool:
            raise GlsdError("--n-last-blocks and --avgpool-patchtokens need a ViT with a CLS token")
        return FeatureRequest(None), [Representation("final mean token", (0,))], "the mean of the final tokens"
    wide = backbone.embed_dim >= WIDE_EMBED_DIM
    n = opts.n_last_blocks if opts.n_last_blocks is not None else min(1 if wide else 4, depth)
    if not 1 <= n <= depth:
        raise GlsdError(f"--n-last-blocks {n} is out of range: this backbone has {depth} blocks")
    avgpool = opts.avgpool if opts.avgpool is not None else wide
    name = f"last {n} block{'s' if n > 1 else ''}" + (" + mean patch token" if avgpool else "")
    request = FeatureRequest(tuple(range(depth - n, depth)), patch_mean=avgpool)
    text = f"concatenated CLS of the last {n} blocks after the final norm" + (
        ", plus the mean of the final patch tokens" if avgpool else "")
    return request, [Representation(name, tuple(range(n)), avgpool)], text


def _take(inputs: list[torch.Tensor], labels: torch.Tensor, part, whole) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Rows of `whole`'s features that belong to `part` (a subset carved from it, or `whole` itself)."""
    if part is whole:
        return inputs, labels
    assert isinstance(part, SubsetSource) and part.base is whole, "a holdout is carved from the training data"
    rows = torch.as_tensor(part.indices, dtype=torch.long)
    return [x[rows] for x in inputs], labels[rows]


def _tag(opts: LinearOptions) -> str:
    return ("linear" + ("-student" if opts.student else "") + ("-layers" if opts.layers is not None else "")
            + ("-cached" if opts.cached else ""))


def run_linear_eval(checkpoint: Path, opts: LinearOptions) -> dict:
    _check(opts)
    device = pick_device(opts.device)
    cfg, method, file = load_pretrained(checkpoint, device)
    which = "student" if opts.student else "teacher"
    backbone = method.backbone(which).eval().requires_grad_(False)
    request, reps, rep_text = representations(opts, backbone)
    splits = open_eval_splits(cfg, opts.train_uri, opts.val_uri, opts.select_uri,
                              opts.holdout_fraction, opts.seed)
    if len(splits.train) < opts.batch_size:
        raise DataError(f"the probe's training data has {len(splits.train)} images, fewer than one batch of "
                        f"{opts.batch_size}; lower --batch-size")
    lrs = sorted(set(opts.lr_grid or (DINOV2_LR_GRID if opts.cached else ())) | {opts.lr})
    size = cfg.data.global_crop_size
    cache = FeatureCache.for_backbone(file, which, backbone, cfg.model.model_dump_json(), opts.cache_dir, opts.cache)
    workers = loader_workers(opts.num_workers, cfg)

    def features(source, what: str) -> tuple[list[torch.Tensor], torch.Tensor]:
        feats, labels = cache.features(backbone, source, size, device, request, opts.batch_size, workers,
                                       quiet=opts.quiet, description=f"{what} features")
        return [r.build(feats) for r in reps], labels

    started = time.perf_counter()
    val = features(splits.val, "val")
    train = select = None
    if opts.cached:
        whole = features(splits.full_train, "train")
        train = _take(*whole, splits.train, splits.full_train)
        if splits.select is not None and getattr(splits.select, "base", None) is splits.full_train:
            select = _take(*whole, splits.select, splits.full_train)
    if splits.select is not None and select is None:
        select = features(splits.select, "selection")
    feature_seconds = time.perf_counter() - started

    torch.manual_seed(opts.seed)  # the probes start alike in both modes
    probes = LinearProbes([r.dim(backbone.embed_dim) for r in reps], splits.num_classes, lrs)
    task = (ProbeTask(probes, reps) if opts.cached else ProbeTask(probes, reps, backbone, request)).to(device)
    default = lrs.index(opts.lr)
    reference_lr = opts.lr * opts.batch_size / 256  # linear scaling rule, as DINO
    optimizer = torch.optim.SGD(probes.param_groups(opts.lr), lr=reference_lr, momentum=SGD_MOMENTUM, weight_decay=0.0)
    sampler = EpochSampler(len(splits.train), opts.batch_size, opts.seed)
    loader = (_cached_loader(train, sampler, device) if opts.cached else
              _augmented_loader(splits, size, opts, sampler, workers))
    history: list[EpochScores] = []

    def score_epoch(epoch: int) -> dict[str, float]:
        sel = probe_accuracies(probes, *select, device)[0] if select is not None else None
        top1, top5 = probe_accuracies(probes, *val, device)
        history.append(EpochScores(sel, top1, top5))
        headline = probes.index(len(reps) - 1, default)  # the last representation at the protocol's lr
        out = {"val_top1": float(top1[headline])}
        if sel is not None:
            out["holdout_top1"] = float(sel[headline])
        return out

    json_path, csv_path = result_paths(file, _tag(opts), opts.output)
    run_dir = json_path.parent / json_path.name.removesuffix(".json")  # the probes' checkpoint and logs
    for stale in (CHECKPOINT_NAME, "metrics.jsonl", "results.csv"):  # a previous call's logs would mix in
        (run_dir / stale).unlink(missing_ok=True)
    config = json.dumps({"pretrain_checkpoint": str(file), "linear": dataclasses.asdict(opts)}, default=str)
    trainer = Trainer(task=task, optimizer=optimizer, schedules={"lr": epoch_cosine(reference_lr, opts.epochs,
                      sampler.steps_per_epoch)}, epochs=opts.epochs, steps_per_epoch=sampler.steps_per_epoch,
                      run_dir=run_dir, device=device, config_json=config, kind="linear",
                      epoch_end_hook=score_epoch, quiet=opts.quiet,
                      plots=False)  # redrawing results.png each epoch would cost more than a cached epoch
    started = time.perf_counter()
    trainer.fit(loader)
    train_seconds = time.perf_counter() - started

    rows = report_rows(history, probes, reps, backbone.embed_dim, default)
    result = _result(file, which, opts, splits, select, rep_text, lrs, size, rows, cache,
                     {"features": round(feature_seconds, 3), "training": round(train_seconds, 3)}, run_dir)
    write_results(json_path, csv_path, result, rows)
    _print(result, rows, json_path)
    return result


def _cached_loader(train: tuple[list[torch.Tensor], torch.Tensor], sampler: EpochSampler, device: torch.device):
    inputs = [x.to(device) for x in train[0]]
    labels = train[1].to(device)

    def make(epoch: int, start_step: int):
        sampler.set_epoch(epoch, start_step)
        order = torch.as_tensor(sampler.global_order(), device=device)
        b = sampler.global_batch
        for step in range(start_step, sampler.steps_per_epoch):
            rows = order[step * b:(step + 1) * b]
            # "label" first: the Trainer counts a batch's images from its first entry.
            yield {"label": labels[rows], "features": [x[rows] for x in inputs]}
    return make


def _augmented_loader(splits: EvalSplits, size: int, opts: LinearOptions, sampler: EpochSampler, workers: int):
    dataset = AugmentedImages(splits.train, size, opts.seed, augment=opts.augment, min_crop_scale=opts.min_crop_scale)

    def make(epoch: int, start_step: int):
        sampler.set_epoch(epoch, start_step)
        dataset.set_epoch(epoch)
        return make_loader(dataset, sampler, opts.batch_size, workers, seed=opts.seed)
    return make


def _result(file, which, opts, splits, select, rep_text, lrs, size, rows, cache, seconds, run_dir) -> dict:
    last = rows[-1]
    summary = {"probe": last["probe"], "top1": last["final_top1"], "top5": last["final_top5"],
               "epoch": opts.epochs, "lr": opts.lr}
    if "best_epoch" in last:
        summary.update({"selected_on": "holdout" if opts.select_uri is None else "select-data",
                        "selected_lr": last["best_epoch_lr"], "selected_epoch": last["best_epoch"],
                        "selected_top1": last["best_epoch_top1"]})
    return {
        "checkpoint": str(file), "backbone": which, "mode": "cached" if opts.cached else "augmented",
        "train_augmentation": (f"RandomResizedCrop(scale {opts.min_crop_scale:g}-1) + horizontal flip"
                               if not opts.cached and opts.augment
                               else "none: the evaluation transform (resize 256/224, centre crop)"),
        "train_data": splits.full_train.uri, "num_train": len(splits.train),
        "val_data": splits.val.uri, "num_val": len(splits.val),
        "selection": splits.select_note, "num_selection": len(select[1]) if select is not None else 0,
        "representation": rep_text, "blocks_numbered_from": 1, "image_size": size, "seed": opts.seed,
        "epochs": opts.epochs, "batch_size": opts.batch_size, "lr_per_256": opts.lr, "lr_grid_per_256": lrs,
        "optimizer": "SGD momentum 0.9, weight decay 0, lr x batch/256, cosine to 0 stepped per epoch",
        "how_to_read": ("accuracies (%) are on val. final_*: the final epoch at the protocol lr, nothing selected. "
                        "best_lr_*: the lr selected on the selection set at the final epoch. best_epoch_*: the "
                        "lr and epoch (counted from 1) selected on the selection set. Val is never selected on."),
        "rows": rows, "summary": summary, "seconds": seconds, "probe_run": str(run_dir),
        "feature_cache": {"folder": str(cache.folder) if cache.enabled else None, "hits": cache.hits,
                          "misses": cache.misses},
    }


def _print(result: dict, rows: list[dict], json_path: Path) -> None:
    lr = result["lr_per_256"]
    selected = "best_lr" in rows[0]
    columns = ["probe", "dim", f"top-1 (lr {lr:g})", "top-5"]
    if selected:
        columns += ["lr*", "top-1 @ lr*", "lr**, epoch**", "top-1 @ **"]
    table = []
    for r in rows:
        line = [r["probe"], str(r["dim"]), pct(r["final_top1"]), pct(r["final_top5"])]
        if selected:
            line += [f"{r['best_lr']:g}", pct(r["best_lr_top1"]), f"{r['best_epoch_lr']:g}, {r['best_epoch']}",
                     pct(r["best_epoch_top1"])]
        table.append(line)
    caption = (f"val accuracy (%) after the final epoch ({result['epochs']}), nothing selected"
               + (f"; * lr and ** (lr, epoch) selected on the selection set: {result['selection']}" if selected else "")
               + f". Results: {json_path} and .csv")
    print_table(f"Linear probes ({result['mode']}, {result['backbone']} backbone, {result['num_train']} training "
                f"images)", columns, table, caption)
