"""The Python API: a trained backbone as a plain timm model, and its features over a dataset.

    import glsd_cli
    model = glsd_cli.load_backbone("runs/demo")                  # teacher backbone, eval mode
    feats, labels = glsd_cli.extract_features("runs/demo", "path/to/images")

`path` may be a run directory, a checkpoint (.safetensors), a full export or a timm export (the
folder or its model.safetensors). Files are read as safetensors only; nothing is unpickled.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import torch
from torch import nn

from glsd_cli.errors import GlsdError
from glsd_cli.export.spec import block_count, build_timm_model, read_backbone

__all__ = ["load_backbone", "extract_features"]


def load_backbone(path: str | Path, which: str = "teacher", device: str | torch.device = "cpu",
                  layer: int | None = None) -> nn.Module:
    """The backbone as a ready timm model (eval mode) on `device`.

    which: "teacher" (what glsd evaluates) or "student". A timm export holds one backbone: the
           default gives it whichever it is; "student" on a teacher export is an error.
    layer: keep blocks 1..N of a ViT only (-1 = last), as `glsd export --layer N`.
    `model(images)` gives glsd's image representation: the CLS token after the final norm (ViT),
    the mean of the final tokens (Swin).
    """
    spec = read_backbone(path, which, layer)
    return build_timm_model(spec).to(device).eval()


class _TimmFeatures(nn.Module):
    """A timm model behind the two calls glsd's feature extraction makes on its Backbone."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def num_blocks(self) -> int:
        return len(self.model.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pre_logits: the pooled representation even if the model was given a classifier head.
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward_layers(self, x: torch.Tensor, layers: list[int]) -> SimpleNamespace:
        final, inter = self.model.forward_intermediates(
            x, indices=list(layers), norm=True, output_fmt="NLC", return_prefix_tokens=True)
        prefix = getattr(self.model, "num_prefix_tokens", 1)
        return SimpleNamespace(layer_cls=[p[:, 0] for _, p in inter], patches=final[:, prefix:])


def _native_size(model: nn.Module) -> int:
    inner = getattr(model, "model", model)  # glsd's Backbone wraps the timm model as .model
    size = getattr(getattr(inner, "patch_embed", None), "img_size", None)
    if size is None:
        raise GlsdError("cannot tell this model's input size; pass image_size=")
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _block_indices(layers: Sequence[int] | str, model: nn.Module) -> list[int]:
    """Block numbers as `glsd knn-eval --layers` takes them (1 = first block, -1 = last; 'all') → 0-based."""
    inner = getattr(model, "model", model)
    if getattr(inner, "cls_token", None) is None or getattr(inner, "blocks", None) is None:
        raise GlsdError("per-block features (layers=) need a ViT with a CLS token")
    depth = len(inner.blocks)
    if isinstance(layers, str):
        if layers != "all":
            raise GlsdError(f"layers must be 'all' or a list of block numbers, got {layers!r}")
        return list(range(depth))
    if not layers:
        raise GlsdError("layers names no block: give 'all' or block numbers like [4, 8, 12]")
    return [block_count(int(n), depth, "layers: block") - 1 for n in layers]


def extract_features(path_or_model: str | Path | nn.Module, data: str, image_size: int | None = None,
                     batch_size: int = 64, layers: Sequence[int] | str | None = None,
                     device: str | torch.device | None = None, split: str = "train", which: str = "teacher",
                     num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of every image in `data`, through glsd's evaluation transform.

    path_or_model: anything `load_backbone` takes, a model it returned, or glsd's Backbone.
    data:       a dataset URI or an image folder (`glsd data schemes`); `split` picks train or val.
    image_size: the centre-crop size (default: the size the backbone was trained at).
    layers:     None → features (N, D) of the final representation; block numbers (1 = first block,
                -1 = last, or 'all') → (L, N, D), each block's CLS after the final norm.
    labels:     (N,) int64, -1 for unlabelled images.
    """
    from glsd_cli.data.sources import open_source
    from glsd_cli.eval.features import extract_features as extract
    from glsd_cli.models.backbone import Backbone

    if isinstance(path_or_model, (str, Path)):
        model = load_backbone(path_or_model, which, device or "cpu")
    elif isinstance(path_or_model, nn.Module):
        model = path_or_model
    else:
        raise GlsdError(f"expected a path or a torch model, got {type(path_or_model).__name__}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
    model = model.to(device)
    features_of = model if isinstance(model, Backbone) else _TimmFeatures(model)
    blocks = None if layers is None else _block_indices(layers, model)
    size = int(image_size or _native_size(model))
    source = open_source(data, split)
    return extract(features_of, source, size, torch.device(device), layers=blocks, batch_size=batch_size,
                   num_workers=num_workers)
