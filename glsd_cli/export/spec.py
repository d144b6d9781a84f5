"""Which backbone a glsd file holds, and how timm rebuilds it.

`read_backbone(path)` takes a run directory, a pre-training checkpoint, a full export
(`--format safetensors`) or a timm export (its folder or its model.safetensors) and returns a
`BackboneSpec`: the timm architecture, the `timm.create_model` kwargs that rebuild exactly the
network glsd trained, and the weights under timm's own key names. Nothing is ever unpickled: every
file goes through `read_checkpoint`, which reads safetensors only.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glsd_cli.config import Config
from glsd_cli.engine.checkpoint import load_state_strict, read_checkpoint, resolve_checkpoint_path, sub_dict
from glsd_cli.errors import CheckpointError, GlsdError
from glsd_cli.models.backbone import timm_kwargs

EXPORT_FILE = "glsd_export.json"  # what glsd wrote into an export folder, and from what (timm ignores it)
EXPORT_MARKER = "glsd_export"      # key of that file holding the layout version
WHICH = ("teacher", "student")
BACKBONE_KINDS = ("pretrain", "export-full", "export-timm")


@dataclass
class BackboneSpec:
    arch: str                       # timm architecture name
    kwargs: dict[str, Any]          # timm.create_model(arch, **kwargs) rebuilds glsd's network (JSON-able)
    state: dict[str, torch.Tensor]  # timm key names; loads strictly into that model
    image_size: int                 # the size the backbone was built for (its position-embedding grid)
    which: str                      # teacher | student
    layer: int | None               # blocks kept by --layer (None: all of them)
    config: Config                  # the glsd config of the run
    source: dict[str, Any]          # file, kind and training position it came from

    @property
    def is_vit(self) -> bool:
        """A ViT with a CLS token: the only kind per-block representations (and --layer) apply to."""
        return "cls_token" in self.state and "blocks.0.norm1.weight" in self.state

    @property
    def num_blocks(self) -> int | None:
        ids = {int(m.group(1)) for k in self.state if (m := re.match(r"blocks\.(\d+)\.", k))}
        return len(ids) if ids else None

    @property
    def representation(self) -> str:
        if self.is_vit:
            return "CLS token after the final norm"
        return "mean of the final tokens (after the final norm)"

    def describe(self) -> str:
        blocks = f", blocks 1..{self.layer}" if self.layer is not None else ""
        return f"{self.which} backbone ({self.arch}{blocks})"


# ------------------------------------------------------------------ locating and reading


def read_export_config(folder: Path) -> dict[str, Any] | None:
    """The glsd_export.json of an export folder, or None when the folder is not one (e.g. a run
    directory). Exports of layout 1 kept it as config.json, where timm's config now goes."""
    for name in (EXPORT_FILE, "config.json"):
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and EXPORT_MARKER in data:
            return data
    return None


def locate(path: str | Path) -> Path:
    """The safetensors file behind a run directory, an export folder or a file."""
    p = Path(path)
    if p.is_dir():
        export = read_export_config(p)
        if export is not None:
            if export.get("format") == "onnx":
                raise CheckpointError(f"{p} is an ONNX export and holds no PyTorch weights; "
                                      "use the checkpoint it came from or a timm export")
            return p / str(export.get("weights", "model.safetensors"))
    return resolve_checkpoint_path(p)


def read_backbone(path: str | Path, which: str = "teacher", layer: int | None = None) -> BackboneSpec:
    """The backbone in any glsd file; `layer` keeps its first blocks (see `truncate`)."""
    if which not in WHICH:
        raise GlsdError(f"which backbone: 'teacher' or 'student', got {which!r}")
    file = locate(path)
    tensors, meta = read_checkpoint(file)
    kind = meta.get("kind")
    if kind not in BACKBONE_KINDS:
        raise CheckpointError(f"{file} is of kind '{kind}'; expected a pre-training checkpoint (a run directory or "
                              "its .safetensors), a full export or a timm export")
    try:
        cfg = Config.from_json(meta["config"])
        position = json.loads(meta.get("position") or "null")
        if kind == "export-timm":
            info = json.loads(meta["export"])
            if which == "student" and info["which"] != "student":
                raise GlsdError(f"{file} holds only the {info['which']} backbone; export the student from the checkpoint")
            spec = BackboneSpec(info["architecture"], info["model_kwargs"], tensors, int(info["image_size"]),
                                info["which"], info["layer"], cfg,
                                {"file": str(file), "kind": kind, "exported_from": info["source"]})
        else:
            state, which = _backbone_state(tensors, which, file)
            size = cfg.data.global_crop_size
            spec = BackboneSpec(cfg.model.arch, timm_kwargs(cfg.model, size), state, size, which, None, cfg,
                                {"file": str(file), "kind": kind, "position": position})
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: its metadata is incomplete or damaged ({type(e).__name__}: {e})") from None
    return truncate(spec, layer) if layer is not None else spec


def _backbone_state(tensors: dict[str, torch.Tensor], which: str, file: Path) -> tuple[dict[str, torch.Tensor], str]:
    state = sub_dict(tensors, f"model/{which}.backbone.model.")
    if not state and which == "teacher":
        # SimCLR trains no teacher; glsd evaluates its student then (SelfDistilledSSL.backbone does the same).
        state, which = sub_dict(tensors, "model/student.backbone.model."), "student"
    if not state:
        raise CheckpointError(f"{file} holds no {which} backbone (no 'model/{which}.backbone.model.*' tensors)")
    return state, which


def block_count(n: int, depth: int, what: str = "--layer") -> int:
    """Block number as the CLI writes it (1 = first block, -1 = last) → how many blocks to keep."""
    if n == 0 or abs(n) > depth:
        raise GlsdError(f"{what} {n}: this backbone has blocks 1..{depth} (or -1..-{depth} counted from the end)")
    return n if n > 0 else depth + n + 1


def truncate(spec: BackboneSpec, layer: int) -> BackboneSpec:
    """Keep blocks 1..N: the model's output is then block N → final norm → CLS, the same number
    as glsd's per-block feature of block N (`Backbone.forward_layers`, `knn-eval --layers N`)."""
    depth = spec.num_blocks
    if not spec.is_vit or depth is None:
        raise GlsdError(f"--layer needs a ViT with a CLS token; {spec.arch} has none (export it whole)")
    keep = block_count(layer, depth)
    state = {k: v for k, v in spec.state.items()
             if not ((m := re.match(r"blocks\.(\d+)\.", k)) and int(m.group(1)) >= keep)}
    return replace(spec, state=state, kwargs={**spec.kwargs, "depth": keep}, layer=keep)


# ------------------------------------------------------------------ building models


def build_timm_model(spec: BackboneSpec, **overrides: Any) -> nn.Module:
    """`timm.create_model(arch, pretrained=False, **kwargs)` with the weights loaded strictly, in eval mode."""
    import timm

    kwargs = {**spec.kwargs, **overrides}
    try:
        model = timm.create_model(spec.arch, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"timm cannot build '{spec.arch}' with {kwargs}: {e}") from None
    load_state_strict(model, spec.state, f"the {spec.which} backbone of {spec.source['file']}")
    return model.eval()


def reference_backbone(spec: BackboneSpec) -> nn.Module:
    """glsd's own Backbone wrapper with these weights: what every export is checked against."""
    from glsd_cli.models.backbone import Backbone

    model_cfg = spec.config.model
    if spec.layer is not None:
        model_cfg = model_cfg.model_copy(update={"depth": spec.layer})
    backbone = Backbone(model_cfg, spec.image_size)
    load_state_strict(backbone.model, spec.state, f"the {spec.which} backbone of {spec.source['file']}")
    return backbone.eval()


def random_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Normalised-image-like inputs for output checks, the same on every call."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
