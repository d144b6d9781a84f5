"""Rebuild a pre-trained method from a checkpoint alone (its config travels in the metadata)."""
from __future__ import annotations

from pathlib import Path

import torch

from glsd_cli.config import Config
from glsd_cli.engine.checkpoint import load_state_strict, read_checkpoint, resolve_checkpoint_path, sub_dict
from glsd_cli.errors import CheckpointError, GlsdError
from glsd_cli.methods import Method, build_method


def load_pretrained(path: str | Path, device: torch.device | str = "cpu") -> tuple[Config, Method, Path]:
    """(config, method with student and teacher weights, checkpoint file) of a run dir or checkpoint."""
    file = resolve_checkpoint_path(path)
    tensors, meta = read_checkpoint(file, device="cpu")
    if meta.get("kind") != "pretrain":
        raise CheckpointError(f"{file} is a '{meta.get('kind')}' file, not a pre-training checkpoint")
    cfg = Config.from_json(meta["config"])
    method = build_method(cfg)
    load_state_strict(method, sub_dict(tensors, "model/"), f"checkpoint {file}")
    method.to(device).eval()
    return cfg, method, file


def loader_workers(requested: int | None, cfg: Config) -> int:
    """Data-loading workers of an evaluation: ``--num-workers`` when given, else the run's own."""
    if requested is not None and requested < 0:
        raise GlsdError(f"--num-workers must be 0 or more, got {requested}")
    return cfg.data.num_workers if requested is None else requested
