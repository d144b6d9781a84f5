"""Pre-training methods: `build_method(cfg)` picks the class for `cfg.method.name`."""
from __future__ import annotations

from glsd_cli.config import Config
from glsd_cli.engine.task import StepContext, StepOutput
from glsd_cli.methods.base import Method


def build_method(cfg: Config) -> Method:
    """The method of a concrete config (pretraining.prepare resolves its 'auto' values for the data)."""
    m = cfg.method
    size_dependent = [cfg.head.out_dim, cfg.optim.momentum_teacher] + (
        [m.local.out_dim, m.loss.teacher_temp] if m.name == "dino" else [])
    if "auto" in size_dependent:
        raise ValueError("the config still holds 'auto' values: build through pretraining.build_pretraining, "
                         "or resolve them with pretraining.prepare first")
    if cfg.method.name == "dino":
        from glsd_cli.methods.glsd import GlobalLocalDistillation

        return GlobalLocalDistillation(cfg)
    from glsd_cli.methods.sdssl import build_sdssl  # simclr / byol / mocov3

    return build_sdssl(cfg)


__all__ = ["Method", "StepContext", "StepOutput", "build_method"]
