"""Pre-training, set up from a config: data → concrete config → method → views → schedules.

`build_pretraining` is the one factory that the `glsd pretrain` command (commands/pretrain.py), the
benchmarks and the tests share; the engine (engine/) only runs what it builds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from glsd_cli.config import Config
from glsd_cli.data.base import ImageSource
from glsd_cli.data.multicrop import MultiCrop
from glsd_cli.engine.schedules import cosine_schedule
from glsd_cli.methods import Method, build_method


def open_training_source(cfg: Config, split: str = "train") -> ImageSource:
    """The configured training data, restricted to the configured subset (low-data regimes)."""
    from glsd_cli.data.sources import open_source
    from glsd_cli.data.subsets import restrict_to_run_subset

    return restrict_to_run_subset(cfg, open_source(cfg.data.train, split))


def prepare(cfg: Config, num_images: int) -> tuple[Config, dict[str, object]]:
    """A concrete copy of `cfg`: every 'auto' value replaced by its default for `num_images` training
    images (data/size_defaults.py), and what was resolved."""
    from glsd_cli.data.size_defaults import resolve_size_defaults

    sizes = resolve_size_defaults(num_images)
    cfg = cfg.model_copy(deep=True)
    resolved: dict[str, object] = {}
    method = cfg.method
    if cfg.head.out_dim == "auto":
        cfg.head.out_dim = resolved["head.out_dim"] = sizes["out_dim"]
    if method.name == "dino" and method.local.out_dim == "auto":
        method.local.out_dim = sizes["out_dim"]
        if method.local.matching != "none":  # reported only where a dense head is built with it
            resolved["method.local.out_dim"] = sizes["out_dim"]
    if method.name == "dino" and method.loss.teacher_temp == "auto":
        method.loss.teacher_temp = resolved["method.loss.teacher_temp"] = sizes["teacher_temp"]
    if cfg.optim.momentum_teacher == "auto":
        cfg.optim.momentum_teacher = resolved["optim.momentum_teacher"] = sizes["momentum_teacher"]
    return cfg, resolved


def make_views(cfg: Config, method: Method | None = None) -> MultiCrop:
    """The views a method trains on: its own (SDSSL's two-view methods), else DINO's multi-crop."""
    custom = getattr(method, "make_transform", None)
    if custom is not None:
        return custom()
    d = cfg.data
    return MultiCrop(d.global_crop_size, d.local_crop_size, d.num_local_crops, tuple(d.global_crop_scale),
                     tuple(d.local_crop_scale), color=d.color_jitter)


def build_schedules(cfg: Config, method: Method, steps_per_epoch: int) -> dict[str, np.ndarray]:
    """Per-iteration values: lr (linear scaling rule, Goyal et al. 2017, as DINO), weight decay and
    teacher momentum (cosine), plus the method's own (teacher temperature, SD's λ)."""
    o, epochs = cfg.optim, cfg.run.epochs
    lr = o.lr * cfg.data.batch_size / 256
    schedules = {
        "lr": cosine_schedule(lr, o.min_lr, epochs, steps_per_epoch, o.warmup_epochs),
        "weight_decay": cosine_schedule(o.weight_decay, o.weight_decay_end, epochs, steps_per_epoch),
        "momentum": cosine_schedule(float(o.momentum_teacher), 1.0, epochs, steps_per_epoch),
    }
    schedules.update(method.schedules(epochs, steps_per_epoch))
    return schedules


def photometric_on_device(cfg: Config, device: torch.device) -> bool:
    """data.augment_on resolved: 'auto' is the device on a GPU (the loader's workers would starve it:
    bench/results/end_to_end-cuda-h100.json), the workers on a CPU (where both share the same cores)."""
    if cfg.data.augment_on == "auto":
        return device.type == "cuda"
    return cfg.data.augment_on == "device"


def compile_backbones(method: torch.nn.Module) -> None:
    """torch.compile each transformer block in place (state_dict keys unchanged, so checkpoints and
    resume are unaffected).

    The blocks share one forward, but dynamo guards on each block's own constants (stochastic depth
    gives every student block its drop-path rate) and on the input's resolution (global, local), so
    it keeps a graph per block and resolution. Its default limit of 8 graphs per code object left the
    deeper blocks of ViT-S/16 uncompiled, with a warning (H200, 2026-11-28): the limit is raised to
    cover them."""
    import torch._dynamo
    from glsd_cli.models.backbone import Backbone

    blocks = []
    for module in method.modules():
        if isinstance(module, Backbone):
            blocks += list(getattr(module.model, "blocks", None) or getattr(module.model, "layers", None) or [])
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 4 * len(blocks))
    for block in blocks:
        block.compile()


@dataclass
class Pretraining:
    """What a pre-training run is made of, before any device or process enters."""

    cfg: Config                     # concrete: no 'auto' left
    method: Method                  # on the CPU, freshly initialised from the torch RNG
    views: MultiCrop
    source: ImageSource | None      # None when built for a number of images only
    resolved: dict[str, object] = field(default_factory=dict)

    def schedules(self, steps_per_epoch: int) -> dict[str, np.ndarray]:
        return build_schedules(self.cfg, self.method, steps_per_epoch)


def build_pretraining(cfg: Config, data: ImageSource | int | None = None) -> Pretraining:
    """Config → data → concrete config → method → views. `data`: the training source (default: open
    the configured one), or just its number of images (benchmarks and tests that build their own
    batches). The method's initialisation draws from the torch RNG: seed it first."""
    source = open_training_source(cfg) if data is None else (None if isinstance(data, int) else data)
    cfg, resolved = prepare(cfg, data if isinstance(data, int) else len(source))
    method = build_method(cfg)
    return Pretraining(cfg, method, make_views(cfg, method), source, resolved)
