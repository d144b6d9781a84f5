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


def backbone_to_evaluate(path: str | Path, device: torch.device, student: bool = False, random_init: bool = False,
                         ) -> tuple[Config, torch.nn.Module, Path, str]:
    """(config, backbone, checkpoint file, name) of what an evaluation scores: the run's teacher (or
    student) backbone, or with `random_init` the same network as the run's at step 0 (pre-training
    seeds with run.seed before building it), the baseline. `name`: teacher, student or random-init
    (it keys the feature cache and names the results)."""
    cfg, method, file = load_pretrained(path, device)
    which = "student" if student else "teacher"
    if random_init:
        torch.manual_seed(cfg.run.seed)
        method = build_method(cfg).to(device).eval()
    return cfg, method.backbone(which), file, "random-init" if random_init else which


def result_tag(command: str, student: bool, random_init: bool, layers: str | None,
               train_fraction: float | None) -> str:
    """The result file's name says which variant it holds, so variants do not overwrite each other."""
    tag = f"{command}-random-init" if random_init else (f"{command}-student" if student else command)
    tag += "-layers" if layers is not None else ""
    return tag + (f"-train{train_fraction:g}" if train_fraction is not None else "")


def loader_workers(requested: int | None, cfg: Config) -> int:
    """Data-loading workers of an evaluation: ``--num-workers`` when given, else the run's own."""
    if requested is not None and requested < 0:
        raise GlsdError(f"--num-workers must be 0 or more, got {requested}")
    return cfg.data.num_workers if requested is None else requested
