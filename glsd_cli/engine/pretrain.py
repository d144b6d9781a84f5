"""`glsd pretrain`: config → data → method → the engine's loop → a run directory.

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
from glsd_cli.data.base import ImageSource, same_files
from glsd_cli.data.loader import EpochSampler, ViewsDataset, make_loader
from glsd_cli.data.multicrop import MultiCrop
from glsd_cli.data.photometric import DevicePhotometric
from glsd_cli.engine import distributed as dist
from glsd_cli.engine.checkpoint import CHECKPOINT_NAME, read_checkpoint
from glsd_cli.engine.metrics import console
from glsd_cli.engine.schedules import cosine_schedule
from glsd_cli.engine.optim import adamw, param_groups
from glsd_cli.engine.precision import autocast_dtype, describe, pick_device
from glsd_cli.engine.trainer import Trainer
from glsd_cli.errors import ConfigError, DataError, GlsdError
from glsd_cli.methods import build_method

KNN_MONITOR_BANK = 10_000  # training images in the epoch-end k-NN monitor's bank, at most
KNN_MONITOR_QUERIES = 5_000


def open_training_source(cfg: Config, split: str = "train") -> ImageSource:
    """The configured training data, restricted to the configured subset (low-data regimes)."""
    from glsd_cli.data.sources import open_source
    from glsd_cli.data.subsets import restrict_to_run_subset

    return restrict_to_run_subset(cfg, open_source(cfg.data.train, split))


def resolve_auto(cfg: Config, num_images: int) -> tuple[Config, dict[str, object]]:
    """Replace every `auto` value by its dataset-size-aware default; return what was resolved."""
    from glsd_cli.data.size_defaults import resolve_size_defaults

    sizes = resolve_size_defaults(num_images)
    cfg = cfg.model_copy(deep=True)
    resolved: dict[str, object] = {}
    if cfg.head.out_dim == "auto":
        cfg.head.out_dim = resolved["head.out_dim"] = sizes["out_dim"]
    if cfg.method.local.out_dim == "auto":
        cfg.method.local.out_dim = resolved["method.local.out_dim"] = sizes["out_dim"]
    if cfg.method.loss.teacher_temp == "auto":
        cfg.method.loss.teacher_temp = resolved["method.loss.teacher_temp"] = sizes["teacher_temp"]
    if cfg.optim.momentum_teacher == "auto":
        cfg.optim.momentum_teacher = resolved["optim.momentum_teacher"] = sizes["momentum_teacher"]
    return cfg, resolved


def new_run_dir(cfg: Config, preset: str) -> Path:
    name = cfg.run.name or f"{Path(preset).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.run.out) / name
    if (run_dir / CHECKPOINT_NAME).exists():
        raise ConfigError(f"run directory {run_dir} already holds a run: use --resume {run_dir} or another --name")
    return run_dir


def make_transform(cfg: Config) -> MultiCrop:
    d = cfg.data
    return MultiCrop(d.global_crop_size, d.local_crop_size, d.num_local_crops, tuple(d.global_crop_scale),
                     tuple(d.local_crop_scale), color=d.color_jitter)


def build_schedules(cfg: Config, method, steps_per_epoch: int) -> dict:
    o, epochs = cfg.optim, cfg.run.epochs
    lr = o.lr * cfg.data.batch_size / 256  # linear scaling rule (Goyal et al. 2017), as DINO
    schedules = {
        "lr": cosine_schedule(lr, o.min_lr, epochs, steps_per_epoch, o.warmup_epochs),
        "weight_decay": cosine_schedule(o.weight_decay, o.weight_decay_end, epochs, steps_per_epoch),
        "momentum": cosine_schedule(float(o.momentum_teacher), 1.0, epochs, steps_per_epoch),
    }
    schedules.update(method.schedules(epochs, steps_per_epoch))
    return schedules


def knn_monitor_hook(cfg: Config, method, device: torch.device):
    """Epoch-end k-NN top-1 (k = 20) of the teacher on the data's held-out split, when it has one."""
    from glsd_cli.data.sources import open_source
    from glsd_cli.data.subsets import make_subset
    from glsd_cli.eval.features import extract_features
    from glsd_cli.eval.knn import knn_classify

    if not cfg.run.knn_monitor:
        return None
    try:
        bank, queries = open_training_source(cfg, "train"), open_source(cfg.data.train, "val")
    except (DataError, GlsdError):
        return None
    if not (bank.labelled and queries.labelled):
        return None
    if same_files(queries, open_source(cfg.data.train, "train")):
        return None  # a folder without train/ and val/ gives the same images for both: no held-out split
    if len(bank) > KNN_MONITOR_BANK:
        bank = make_subset(bank, count=KNN_MONITOR_BANK, seed=0)
    if len(queries) > KNN_MONITOR_QUERIES:
        queries = make_subset(queries, count=KNN_MONITOR_QUERIES, seed=0)

    def hook(epoch: int) -> dict[str, float]:
        if not dist.is_main_process():
            return {}
        size = cfg.data.global_crop_size
        backbone = method.backbone("teacher")
        xb, yb = extract_features(backbone, bank, size, device)
        xq, yq = extract_features(backbone, queries, size, device)
        res = knn_classify(xb, yb, xq, yq, len(bank.classes), ks=(20,))
        return {"knn_top1": res[20]["top1"]}

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
    _set_bad_image_tolerance(source, cfg.run.max_bad_image_fraction)
    if len(source) < cfg.data.batch_size:
        raise DataError(f"the training data has {len(source)} images, fewer than one batch of {cfg.data.batch_size}; "
                        "lower --batch-size")
    cfg, resolved = resolve_auto(cfg, len(source))
    if resolved and not quiet and main:
        console.print("size-aware values for " + f"{len(source)} images: " +
                      ", ".join(f"{k} = {v}" for k, v in resolved.items()))
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.to_json())
        if hasattr(source, "indices"):
            from glsd_cli.data.subsets import save_file_list

            save_file_list(source, run_dir / "files.txt")
    dist.barrier()

    # The same seed on every process for the initialisation (and rank 0's weights broadcast, as DDP
    # does); then one RNG stream per process for what differs by design (drop path on its images).
    torch.manual_seed(cfg.run.seed)
    method = build_method(cfg).to(device)
    if world > 1 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in method.modules()):
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    dist.broadcast_module(method)
    torch.manual_seed(cfg.run.seed + 1 + dist.rank())
    if cfg.run.compile:
        _compile_backbones(method)
    sampler = EpochSampler(len(source), cfg.data.batch_size, cfg.run.seed, dist.rank(), world)
    transform = make_method_transform(cfg, method)
    on_device = photometric_on_device(cfg, device)
    dataset = ViewsDataset(source, transform, cfg.run.seed, photometric_on_device=on_device)
    optimizer = adamw(param_groups(method.trainable_modules()))
    trainer = Trainer(task=method, optimizer=optimizer, schedules=build_schedules(cfg, method, sampler.steps_per_epoch),
                      epochs=cfg.run.epochs, steps_per_epoch=sampler.steps_per_epoch, run_dir=run_dir, device=device,
                      config_json=cfg.to_json(), precision=cfg.run.precision, clip_grad=cfg.optim.clip_grad,
                      checkpoint_every_steps=cfg.run.checkpoint_every_steps, log_every_steps=cfg.run.log_every_steps,
                      epoch_end_hook=knn_monitor_hook(cfg, method, device), quiet=quiet, accum_steps=accum,
                      on_nonfinite=cfg.run.on_nonfinite, max_bad_fraction=cfg.run.max_bad_image_fraction,
                      prepare_batch=DevicePhotometric(device, transform.color).prepare if on_device else None)
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


def _set_bad_image_tolerance(source: ImageSource, fraction: float) -> None:
    """Pass run.max_bad_image_fraction down to the folder source under any subset wrappers."""
    while source is not None:
        if hasattr(source, "max_bad_fraction"):
            source.max_bad_fraction = fraction
        source = getattr(source, "base", None)


def _compile_backbones(method: torch.nn.Module) -> None:
    """torch.compile each transformer block in place (state_dict keys unchanged, so checkpoints and
    resume are unaffected); blocks share their code, so one compiled graph serves them all."""
    from glsd_cli.models.backbone import Backbone

    for module in method.modules():
        if isinstance(module, Backbone):
            blocks = getattr(module.model, "blocks", None) or getattr(module.model, "layers", None) or []
            for block in blocks:
                block.compile()


def photometric_on_device(cfg: Config, device: torch.device) -> bool:
    """data.augment_on resolved: 'auto' is the device on a GPU (the loader's workers would starve it:
    bench/end_to_end.py), the workers on a CPU (where both share the same cores)."""
    if cfg.data.augment_on == "auto":
        return device.type == "cuda"
    return cfg.data.augment_on == "device"


def make_method_transform(cfg: Config, method) -> MultiCrop:
    """Methods may ask for their own views (two-view SDSSL methods); DINO-family methods use multi-crop."""
    custom = getattr(method, "make_transform", None)
    return custom() if custom is not None else make_transform(cfg)
