"""Frozen features of a backbone over a source: final CLS, or the CLS of any set of blocks."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from glsd_cli.data.base import ImageSource
from glsd_cli.data.loader import EvalDataset
from glsd_cli.data.multicrop import EvalTransform
from glsd_cli.engine.metrics import progress_bar
from glsd_cli.models.backbone import Backbone


@torch.no_grad()
def extract_features(backbone: Backbone, source: ImageSource, image_size: int, device: torch.device,
                     layers: list[int] | None = None, batch_size: int = 256, num_workers: int = 0,
                     quiet: bool = True, description: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (features, labels): features (N, D) for the final CLS, or (L, N, D) for `layers`."""
    was_training = backbone.training
    backbone.eval()
    loader = DataLoader(EvalDataset(source, EvalTransform(image_size)), batch_size=batch_size,
                        num_workers=num_workers, shuffle=False)
    feats, labels = [], []
    with progress_bar(len(loader), disabled=quiet, description=description) as bar:
        for images, target, _ in loader:
            images = images.to(device)
            if layers is None:
                feats.append(backbone(images).float().cpu())
            else:
                out = backbone.forward_layers(images, layers)
                feats.append(torch.stack(out.layer_cls).float().cpu())
            labels.append(target)
            bar.update({}, {}, 0, 1)
    backbone.train(was_training)
    dim = 0 if layers is None else 1
    return torch.cat(feats, dim), torch.cat(labels)
