"""`glsd dense-eval`: a frozen backbone's patch tokens → linear segmentation probe and patch k-NN → mIoU.

Per block asked for (the final one by default): (a) linear probes trained on the training images'
cached tokens at a grid of learning rates; the lr is chosen on a seeded holdout of the training
images (splits.py; never on the evaluation images) and the evaluation split's mIoU and pixel
accuracy at that lr are reported; (b) patch k-NN label transfer from every training token, which
trains nothing. Features come from the cache of knn-eval and linear-eval (feature_cache.py).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from glsd_cli.data.base import ImageSource, SubsetSource
from glsd_cli.data.segmentation import segmentation_base
from glsd_cli.data.sources import open_source
from glsd_cli.data.subsets import make_subset, split_holdout
from glsd_cli.engine.precision import pick_device
from glsd_cli.errors import DataError, GlsdError
from glsd_cli.eval.dense import grid_side, knn_segmentation, segmentation_scores
from glsd_cli.eval.dense_probe import DEFAULT_LR, DEFAULT_LR_GRID, probe_confusions, train_dense_probes
from glsd_cli.eval.feature_cache import FeatureCache
from glsd_cli.eval.features import FeatureRequest, extract_representations, parse_blocks
from glsd_cli.eval.knn import DEFAULT_TEMPERATURE
from glsd_cli.eval.loading import backbone_to_evaluate, loader_workers, result_tag
from glsd_cli.eval.report import check_output, pct, print_table, result_paths, write_results

DEFAULT_K = 20


@dataclass
class DenseOptions:
    train_uri: str | None = None
    val_uri: str | None = None
    layers: str | None = None           # 'all' or 1-based block numbers; None: the final block
    k: int = DEFAULT_K
    temperature: float = DEFAULT_TEMPERATURE
    image_size: int | None = None       # None: the run's global crop size
    mask_size: int | None = None        # None: the image size
    epochs: int = 10
    batch_size: int = 32
    lr: float = DEFAULT_LR              # used alone when nothing is selected (--holdout-fraction 0)
    lr_grid: tuple[float, ...] = DEFAULT_LR_GRID
    holdout_fraction: float = 0.1
    train_fraction: float | None = None  # a seeded, stratified fraction of the training images (fewer labels)
    seed: int = 0
    student: bool = False
    random_init: bool = False
    device: str = "auto"
    num_workers: int | None = None
    cache: bool = True
    cache_dir: Path | None = None
    output: Path | None = None
    quiet: bool = False


def patch_knn_miou(backbone, bank: ImageSource, queries: ImageSource, image_size: int, device: torch.device) -> float:
    """Patch k-NN mIoU (k = 20) of the final block's tokens, masks at the image size: the quick form of
    dense-eval's label transfer that pre-training's epoch-end monitor reports on segmentation data."""
    request = FeatureRequest(mask_size=image_size)
    bank_tokens, bank_masks = extract_representations(backbone, bank, image_size, device, request)
    query_tokens, query_masks = extract_representations(backbone, queries, image_size, device, request)
    confusion = knn_segmentation(bank_tokens["patches"][-1], bank_masks, query_tokens["patches"][-1], query_masks,
                                 len(bank.classes), device=device)
    return segmentation_scores(confusion)["miou"]


def _check(opts: DenseOptions) -> None:
    check_output(opts.output)
    if opts.k < 1:
        raise GlsdError(f"--k must be positive, got {opts.k}")
    if opts.temperature <= 0:
        raise GlsdError(f"--temperature must be positive, got {opts.temperature}")
    if opts.epochs < 1 or opts.batch_size < 1:
        raise GlsdError(f"--epochs and --batch-size must be positive, got {opts.epochs} and {opts.batch_size}")
    if opts.lr <= 0 or not opts.lr_grid or any(lr <= 0 for lr in opts.lr_grid):
        raise GlsdError("learning rates must be positive")
    if opts.train_fraction is not None and not 0 < opts.train_fraction <= 1:
        raise GlsdError(f"--train-fraction must be in (0, 1], got {opts.train_fraction}")
    if not 0 <= opts.holdout_fraction < 1:
        raise GlsdError(f"--holdout-fraction must be in [0, 1), got {opts.holdout_fraction}")
    for name, value in (("--image-size", opts.image_size), ("--mask-size", opts.mask_size)):
        if value is not None and value < 1:
            raise GlsdError(f"{name} must be a positive number of pixels, got {value}")


def open_segmentation_pair(cfg, train_uri: str | None, val_uri: str | None) -> tuple[ImageSource, ImageSource]:
    """Training and evaluation segmentation sources: the URIs given, else the run's data's train and val splits."""
    uri = train_uri or cfg.data.train
    train = open_source(uri, "train")
    val = open_source(val_uri or uri, "val")
    for what, src, flag in (("training", train, "--train-data"), ("evaluation", val, "--val-data")):
        if segmentation_base(src) is None:
            raise DataError(f"dense evaluation needs images with masks, but the {what} data {src.uri} has none; pass "
                            f"{flag} with a segmentation layout or synthetic-scenes (see `glsd data schemes`)")
    if train.classes != val.classes:
        raise DataError(f"the training data ({len(train.classes)} classes) and the evaluation data "
                        f"({len(val.classes)} classes) have different class lists")
    return train, val


def run_dense_eval(checkpoint: Path, opts: DenseOptions) -> dict:
    _check(opts)
    device = pick_device(opts.device)
    cfg, backbone, file, name = backbone_to_evaluate(checkpoint, device, opts.student, opts.random_init)
    backbone.eval().requires_grad_(False)
    train, val = open_segmentation_pair(cfg, opts.train_uri, opts.val_uri)
    if opts.train_fraction is not None:  # fewer labelled images for the probe and the k-NN bank
        train = make_subset(train, fraction=opts.train_fraction, seed=opts.seed)
    blocks = parse_blocks(opts.layers, backbone.num_blocks)
    numbers = [b + 1 for b in blocks] if blocks is not None else [backbone.num_blocks]
    size = opts.image_size or cfg.data.global_crop_size
    mask_size = opts.mask_size or size
    request = FeatureRequest(tuple(blocks) if blocks is not None else None, mask_size=mask_size)
    cache = FeatureCache.for_backbone(file, name, backbone, cfg.model.model_dump_json(), opts.cache_dir, opts.cache)
    workers = loader_workers(opts.num_workers, cfg)
    started = time.perf_counter()
    xt, mt = cache.features(backbone, train, size, device, request, opts.batch_size, workers, quiet=opts.quiet,
                            description="train features")
    xv, mv = cache.features(backbone, val, size, device, request, opts.batch_size, workers, quiet=opts.quiet,
                            description="val features")
    feature_seconds = time.perf_counter() - started
    num_classes = len(train.classes)

    started = time.perf_counter()
    knn = [segmentation_scores(knn_segmentation(xt["patches"][i], mt, xv["patches"][i], mv, num_classes, opts.k,
                                                opts.temperature, device), train.classes)
           for i in range(len(numbers))]
    knn_seconds = time.perf_counter() - started

    tag = result_tag("dense", opts.student, opts.random_init, opts.layers, opts.train_fraction)
    json_path, csv_path = result_paths(file, tag, opts.output)
    run_dir = json_path.parent / json_path.name.removesuffix(".json")  # the probes' checkpoint and logs
    started = time.perf_counter()
    linear, selection = _linear(opts, train, xt["patches"], mt, xv["patches"], mv, num_classes, device, run_dir, file)
    linear_seconds = time.perf_counter() - started

    rows = [{"block": n, "linear_miou": round(lin["miou"], 4), "linear_pixel_acc": round(lin["pixel_acc"], 4),
             "linear_lr": lin["lr"], "knn_miou": round(kn["miou"], 4), "knn_pixel_acc": round(kn["pixel_acc"], 4)}
            for n, lin, kn in zip(numbers, linear, knn)]
    final = rows[-1]
    result = {
        "checkpoint": str(file), "backbone": name, "train_data": train.uri, "val_data": val.uri,
        "num_train": len(train), "num_val": len(val), "train_fraction": opts.train_fraction,
        "classes": list(train.classes),
        "image_size": size, "mask_size": mask_size, "token_grid": grid_side(xt["patches"].shape[2]),
        "representation": "patch tokens after the final norm, of each block asked for", "blocks_numbered_from": 1,
        "linear": {"epochs": opts.epochs, "batch_size": opts.batch_size, "lr_grid_per_256": selection["lrs"],
                   "selection": selection["note"], "seed": opts.seed, "probe_run": str(run_dir),
                   "optimizer": "SGD momentum 0.9, weight decay 0, lr x batch/256, cosine to 0 stepped per epoch",
                   "blocks": [{"block": n, **lin} for n, lin in zip(numbers, linear)]},
        "knn": {"k": opts.k, "temperature": opts.temperature,
                "blocks": [{"block": n, **kn} for n, kn in zip(numbers, knn)]},
        "how_to_read": ("mIoU and pixel accuracy (%) on the evaluation images, pixels labelled 255 excluded. Linear: "
                        "the final epoch at the lr selected on the holdout of the training images (val_by_lr "
                        "lists every lr, for reference only). k-NN: patch-level label transfer from every training "
                        "token, nothing trained or selected."),
        "rows": rows,
        "summary": {"block": final["block"], "linear_miou": final["linear_miou"], "knn_miou": final["knn_miou"],
                    "linear_pixel_acc": final["linear_pixel_acc"], "knn_pixel_acc": final["knn_pixel_acc"]},
        "subset_seed": opts.seed if opts.train_fraction is not None else None,
        "seconds": {"features": round(feature_seconds, 3), "knn": round(knn_seconds, 3),
                    "linear": round(linear_seconds, 3)},
        "feature_cache": {"folder": str(cache.folder) if cache.enabled else None, "hits": cache.hits,
                          "misses": cache.misses},
    }
    write_results(json_path, csv_path, result, rows)
    _print(result, name, json_path)
    return result


def _rows_of(part: ImageSource, whole: ImageSource) -> torch.Tensor | slice:
    if part is whole:
        return slice(None)
    assert isinstance(part, SubsetSource) and part.base is whole, "a holdout is carved from the training data"
    return torch.as_tensor(part.indices, dtype=torch.long)


def _linear(opts: DenseOptions, train: ImageSource, train_tokens: torch.Tensor, train_masks: torch.Tensor,
            val_tokens: torch.Tensor, val_masks: torch.Tensor, num_classes: int, device: torch.device,
            run_dir: Path, file: Path) -> tuple[list[dict], dict]:
    """Per block: the val scores at the lr selected on the holdout (or at --lr without one), and how it was selected."""
    if opts.holdout_fraction > 0:
        try:
            fit, holdout = split_holdout(train, opts.holdout_fraction, opts.seed)
        except DataError:
            raise DataError(f"{len(train)} training image(s) are too few to hold out a {opts.holdout_fraction:.0%} "
                            "split for choosing the probe's lr; pass --holdout-fraction 0 to use --lr") from None
        lrs = sorted(set(opts.lr_grid))
        note = (f"a {opts.holdout_fraction:.0%} holdout of the training images, seed {opts.seed} ({len(holdout)} "
                "images, not trained on); the lr with the best holdout mIoU")
    else:
        fit, holdout, lrs = train, None, [opts.lr]
        note = "none (--holdout-fraction 0): the probe trains on every training image at --lr"
    rows = _rows_of(fit, train)
    batch = min(opts.batch_size, len(fit))  # a handful of images still trains: one batch of all of them
    blocks = [t for t in train_tokens]  # (N, T, D) per block
    config = {"pretrain_checkpoint": str(file), "dense": dataclasses.asdict(opts)}
    probes = train_dense_probes([t[rows] for t in blocks], train_masks[rows], num_classes, lrs, opts.epochs, batch,
                                opts.seed, device, run_dir, config, opts.quiet)
    val_conf = probe_confusions(probes, list(val_tokens), val_masks, num_classes, device)
    held_conf = None
    if holdout is not None:
        held_rows = _rows_of(holdout, train)
        held_conf = probe_confusions(probes, [t[held_rows] for t in blocks], train_masks[held_rows], num_classes, device)
    out = []
    for r in range(len(blocks)):
        heads = [probes.index(r, g) for g in range(len(lrs))]
        val_scores = [segmentation_scores(val_conf[h]) for h in heads]
        if held_conf is not None:
            held = [segmentation_scores(held_conf[h])["miou"] for h in heads]
            g = max(range(len(lrs)), key=lambda i: (held[i], -i))  # ties: the smaller lr
        else:
            held, g = None, 0
        chosen = segmentation_scores(val_conf[heads[g]], list(train.classes))
        entry = {"lr": lrs[g], "head": heads[g], "miou": chosen["miou"], "pixel_acc": chosen["pixel_acc"],
                 "iou": chosen["iou"], "val_by_lr": {f"{lr:g}": round(s["miou"], 4) for lr, s in zip(lrs, val_scores)}}
        if held is not None:
            entry["holdout_miou_by_lr"] = {f"{lr:g}": round(m, 4) for lr, m in zip(lrs, held)}
        out.append(entry)
    return out, {"lrs": lrs, "note": note}


def _print(result: dict, name: str, json_path: Path) -> None:
    what = {"random-init": "randomly initialised teacher", "teacher": "pre-trained teacher",
            "student": "pre-trained student"}[name]
    columns = ["block", "linear mIoU", "pixel acc", "lr*", f"k-NN mIoU (k={result['knn']['k']})", "pixel acc"]
    rows = [[str(r["block"]), pct(r["linear_miou"]), pct(r["linear_pixel_acc"]), f"{r['linear_lr']:g}",
             pct(r["knn_miou"]), pct(r["knn_pixel_acc"])] for r in result["rows"]]
    g = result["token_grid"]
    print_table(f"Dense evaluation of the {what} backbone ({result['num_train']} train / {result['num_val']} val "
                f"images, {result['image_size']} px, {g}x{g} tokens)", columns, rows,
                caption=f"% on the evaluation images; * lr selected on {result['linear']['selection']}. "
                        f"Results: {json_path} and .csv")
