"""`glsd pretrain`: config → `build_pretraining` → the engine's loop → a run directory.

Run directory (runs/<name>/): config.json (resolved), last.safetensors (model, optimiser, RNG and
position; config in the metadata), metrics.jsonl, results.csv, results.png, files.txt when a subset
is used, done.json once finished. Under torchrun every process runs this; rank 0 writes the files.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from glsd_cli.config import Config
from glsd_cli.data.base import ImageSource, SubsetSource, innermost, same_files
from glsd_cli.data.loader import EpochSampler, ViewsDataset, make_loader
from glsd_cli.data.photometric import DevicePhotometric
from glsd_cli.data.sources import FolderSource
from glsd_cli.engine import distributed as dist
from glsd_cli.engine.checkpoint import CHECKPOINT_NAME, read_checkpoint
from glsd_cli.engine.metrics import console
from glsd_cli.engine.optim import adamw, param_groups
from glsd_cli.engine.precision import autocast_dtype, describe, pick_device
from glsd_cli.engine.trainer import Trainer
from glsd_cli.errors import ConfigError, DataError, GlsdError
from glsd_cli.pretraining import build_pretraining, compile_backbones, open_training_source, photometric_on_device

KNN_MONITOR_BANK = 10_000  # training images in the epoch-end k-NN monitor's bank, at most
KNN_MONITOR_QUERIES = 5_000
# Segmentation data (masks) adds patch k-NN mIoU to the epoch-end monitor, on subsets: label transfer
# from every token of the bank images costs ~T² more than one CLS each (README "Dense evaluation").
PATCH_KNN_MONITOR_BANK, PATCH_KNN_MONITOR_QUERIES = 400, 150


def new_run_dir(cfg: Config, preset: str) -> Path:
    name = cfg.run.name or f"{Path(preset).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.run.out) / name
    if (run_dir / CHECKPOINT_NAME).exists():
        raise ConfigError(f"run directory {run_dir} already holds a run: use --resume {run_dir} or another --name")
    return run_dir


def knn_monitor_hook(cfg: Config, method, device: torch.device):
    """Epoch-end k-NN top-1 (k = 20) of the teacher on the data's held-out split, when it has one with
    image labels, and patch k-NN mIoU (dense-eval's label transfer) when it has masks."""
    from glsd_cli.data.segmentation import segmentation_base
    from glsd_cli.data.sources import open_source
    from glsd_cli.data.subsets import make_subset
    from glsd_cli.eval.dense_command import patch_knn_miou
    from glsd_cli.eval.features import extract_features
    from glsd_cli.eval.knn import knn_classify

    if not cfg.run.knn_monitor:
        return None
    try:
        bank, queries = open_training_source(cfg, "train"), open_source(cfg.data.train, "val")
    except (DataError, GlsdError):
        return None
    labelled = bank.labelled and queries.labelled
    dense = segmentation_base(bank) is not None and segmentation_base(queries) is not None  # masks: no image labels needed
    if not (labelled or dense):
        return None
    if same_files(queries, open_source(cfg.data.train, "train")):
        return None  # a folder without train/ and val/ gives the same images for both: no held-out split
    dense_bank = make_subset(bank, count=min(len(bank), PATCH_KNN_MONITOR_BANK), seed=0) if dense else None
    dense_queries = make_subset(queries, count=min(len(queries), PATCH_KNN_MONITOR_QUERIES), seed=0) if dense else None
    if len(bank) > KNN_MONITOR_BANK:
        bank = make_subset(bank, count=KNN_MONITOR_BANK, seed=0)
    if len(queries) > KNN_MONITOR_QUERIES:
        queries = make_subset(queries, count=KNN_MONITOR_QUERIES, seed=0)

    def hook(epoch: int) -> dict[str, float]:
        if not dist.is_main_process():
            return {}
        size = cfg.data.global_crop_size
        backbone = method.backbone("teacher")
        row = {}
        if labelled:
            xb, yb = extract_features(backbone, bank, size, device)
            xq, yq = extract_features(backbone, queries, size, device)
            row["knn_top1"] = knn_classify(xb, yb, xq, yq, len(bank.classes), ks=(20,))[20]["top1"]
        if dense:
            row["patch_knn_miou"] = patch_knn_miou(backbone, dense_bank, dense_queries, size, device)
        return row

    return hook


def pretrain(cfg: Config, preset: str, resume: Path | None = None, quiet: bool = False) -> Path:
    device = pick_device(cfg.run.device)
    dist.init_from_env(device)
    if resume is not None:
        run_dir = Path(resume)
        _, meta = read_checkpoint(run_dir, device="cpu")
        cfg = Config.from_json(meta["config"])
    else:
        run_dir = new_run_dir(cfg, preset)
    world, accum = dist.world_size(), cfg.run.grad_accum_steps
    if cfg.data.batch_size % (world * accum):
        raise ConfigError(f"data.batch_size {cfg.data.batch_size} must be divisible by the {world} process(es) × "
                          f"run.grad_accum_steps {accum}")
    main = dist.is_main_process()

    source = open_training_source(cfg, "train")
    base = innermost(source)[0]
    if isinstance(base, FolderSource):  # the folder source judges what its workers read
        base.max_bad_fraction = cfg.run.max_bad_image_fraction
    if len(source) < cfg.data.batch_size:
        raise DataError(f"the training data has {len(source)} images, fewer than one batch of {cfg.data.batch_size}; "
                        "lower --batch-size")
    # The same seed on every process for the initialisation (and rank 0's weights broadcast, as DDP
    # does); then one RNG stream per process for what differs by design (drop path on its images).
    torch.manual_seed(cfg.run.seed)
    setup = build_pretraining(cfg, source)
    cfg, resolved, method = setup.cfg, setup.resolved, setup.method.to(device)
    if resolved and not quiet and main:
        console.print("size-aware values for " + f"{len(source)} images: " +
                      ", ".join(f"{k} = {v}" for k, v in resolved.items()))
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.to_json())
        if isinstance(source, SubsetSource):
            from glsd_cli.data.subsets import save_file_list

            save_file_list(source, run_dir / "files.txt")
    dist.barrier()

    if world > 1 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in method.modules()):
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    dist.broadcast_module(method)
    torch.manual_seed(cfg.run.seed + 1 + dist.rank())
    if cfg.run.compile:
        compile_backbones(method)
    sampler = EpochSampler(len(source), cfg.data.batch_size, cfg.run.seed, dist.rank(), world)
    on_device = photometric_on_device(cfg, device)
    dataset = ViewsDataset(source, setup.views, cfg.run.seed, photometric_on_device=on_device)
    optimizer = adamw(param_groups(method.trainable_modules()))
    trainer = Trainer(task=method, optimizer=optimizer, schedules=setup.schedules(sampler.steps_per_epoch),
                      epochs=cfg.run.epochs, steps_per_epoch=sampler.steps_per_epoch, run_dir=run_dir, device=device,
                      config_json=cfg.to_json(), precision=cfg.run.precision, clip_grad=cfg.optim.clip_grad,
                      checkpoint_every_steps=cfg.run.checkpoint_every_steps, log_every_steps=cfg.run.log_every_steps,
                      epoch_end_hook=knn_monitor_hook(cfg, method, device), quiet=quiet, accum_steps=accum,
                      on_nonfinite=cfg.run.on_nonfinite, max_bad_fraction=cfg.run.max_bad_image_fraction,
                      prepare_batch=DevicePhotometric(device, setup.views.color).prepare if on_device else None)
    if resume is not None:
        trainer.resume(run_dir)
    if not quiet and main:
        where = f"{world} processes ({'NCCL' if device.type == 'cuda' else 'gloo'})" if world > 1 else str(device)
        console.print(f"training on {where}, precision {describe(autocast_dtype(cfg.run.precision, device))}, "
                      f"photometric augmentation on the {'device' if on_device else 'loader workers'}"
                      + (f", resuming at step {trainer.state.global_step}" if resume is not None else ""))

    def make_epoch_loader(epoch: int, start_step: int):
        sampler.set_epoch(epoch, start_step)
        dataset.set_epoch(epoch)
        return make_loader(dataset, sampler, cfg.data.batch_size // (world * accum), cfg.data.num_workers,
                           seed=cfg.run.seed + epoch)

    trainer.fit(make_epoch_loader)
    if main:
        (run_dir / "done.json").write_text(json.dumps({"epochs": cfg.run.epochs, "steps": trainer.state.global_step}))
    return run_dir
