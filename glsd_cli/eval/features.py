"""Frozen features of a backbone over a source: final CLS, or the CLS of any set of blocks.

`FeatureRequest` names what one forward pass returns (docs/algorithms.md §5): the final CLS, the CLS of
chosen blocks (each through the backbone's shared final norm), and optionally the mean of the final
patch tokens (DINO's `--avgpool_patchtokens`). The same request computes the features of a batch
during augmented training and of a whole source during extraction, so both paths see one formula.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from glsd_cli.data.base import ImageSource
from glsd_cli.data.loader import EvalDataset
from glsd_cli.data.multicrop import EvalTransform
from glsd_cli.engine.metrics import progress_bar
from glsd_cli.errors import GlsdError
from glsd_cli.models.backbone import Backbone


@torch.no_grad()
def extract_features(backbone: Backbone, source: ImageSource, image_size: int, device: torch.device,
                     layers: list[int] | None = None, batch_size: int = 256, num_workers: int = 0,
                     quiet: bool = True, description: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (features, labels): features (N, D) for the final CLS, or (L, N, D) for `layers`."""
    request = FeatureRequest(None if layers is None else tuple(layers))
    feats, labels = extract_representations(backbone, source, image_size, device, request, batch_size,
                                            num_workers, quiet, description)
    return (feats["cls"][0] if layers is None else feats["cls"]), labels


@dataclass(frozen=True)
class FeatureRequest:
    """What to take from one forward pass.

    blocks:     0-based block indices whose CLS (after the final norm) is returned, or None for the
                final CLS of `Backbone.forward` (the representation k-NN and the pre-training monitor use).
    patch_mean: also return the mean of the final block's patch tokens after the final norm.
    mask_size:  dense evaluation (dense.py): return the patch tokens of `blocks` (None: of the final
                block) instead of any CLS, from the whole image resized to a square, and the masks
                resized to mask_size x mask_size as the labels. Needs a segmentation source.
    """

    blocks: tuple[int, ...] | None = None
    patch_mean: bool = False
    mask_size: int | None = None

    @property
    def dense(self) -> bool:
        return self.mask_size is not None

    def describe(self) -> dict:
        out = {"blocks": list(self.blocks) if self.blocks is not None else "final", "patch_mean": self.patch_mean}
        if self.dense:  # only then, so the keys of CLS entries cached before dense evaluation existed stay valid
            out["patch_tokens_with_masks"] = self.mask_size
        return out

    def compute(self, backbone: Backbone, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'cls': (L, B, D), and 'patch_mean': (B, D) when asked}; dense: {'patches': (L, B, T, D)}."""
        if self.dense:
            if self.blocks is None:
                return {"patches": backbone.forward_tokens(images).patches.unsqueeze(0)}
            return {"patches": torch.stack(backbone.forward_layer_patches(images, list(self.blocks)))}
        if self.blocks is None and not self.patch_mean:
            return {"cls": backbone(images).unsqueeze(0)}
        blocks = list(self.blocks) if self.blocks is not None else [backbone.num_blocks - 1]
        out = backbone.forward_layers(images, blocks)
        feats = {"cls": torch.stack(out.layer_cls)}
        if self.patch_mean:
            feats["patch_mean"] = out.patches.mean(1)
        return feats


@torch.no_grad()
def extract_representations(backbone: Backbone, source: ImageSource, image_size: int, device: torch.device,
                            request: FeatureRequest, batch_size: int = 256, num_workers: int = 0,
                            quiet: bool = True, description: str = "features"
                            ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({'cls': (L, N, D), 'patch_mean': (N, D)?} in fp32 on the CPU, labels (N,)) over a whole source,
    through the evaluation transform (resize 256/224, centre crop) in the source's order.
    Dense requests: ({'patches': (L, N, T, D)}, masks uint8 (N, M, M)) of the whole images resized."""
    if len(source) == 0:
        raise GlsdError(f"{source.uri} ({source.split}) has no images to extract features from")
    was_training = backbone.training
    backbone.eval()
    if request.dense:
        from glsd_cli.data.segmentation import DenseEvalDataset, segmentation_base

        if segmentation_base(source) is None:
            raise GlsdError(f"{source.uri} ({source.split}) has no masks: dense evaluation needs segmentation data "
                            "(see `glsd data schemes`)")
        dataset = DenseEvalDataset(source, image_size, request.mask_size)
    else:
        dataset = EvalDataset(source, EvalTransform(image_size))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    parts: dict[str, list[torch.Tensor]] = {}
    labels = []
    try:
        with progress_bar(len(loader), disabled=quiet, description=description) as bar:
            for images, target, _ in loader:
                for name, value in request.compute(backbone, images.to(device)).items():
                    parts.setdefault(name, []).append(value.float().cpu())
                labels.append(target)
                bar.update({}, {}, 0, 1)
    finally:
        backbone.train(was_training)
    # cls (L, B, D) and patches (L, B, T, D) per batch: images are along dim 1; patch_mean (B, D): along dim 0.
    feats = {name: torch.cat(chunks, dim=1 if name in ("cls", "patches") else 0) for name, chunks in parts.items()}
    labels = torch.cat(labels)
    return feats, labels if request.dense else labels.long()  # masks stay uint8: a quarter of the memory


def parse_blocks(text: str | None, num_blocks: int) -> list[int] | None:
    """`--layers` as users write it → 0-based block indices, or None when not given.

    Blocks are numbered from 1 (block 1 is the first transformer block, block `num_blocks` the last,
    whose CLS is the usual final representation); negative numbers count from the end (-1 = last);
    'all' is every block.
    """
    if text is None:
        return None
    text = text.strip().lower()
    if text == "all":
        return list(range(num_blocks))
    try:
        numbers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise GlsdError(f"--layers must be 'all' or comma-separated block numbers like 4,8,12, got '{text}'") from None
    if not numbers:
        raise GlsdError("--layers names no block: give 'all' or block numbers like 4,8,12")
    blocks = []
    for n in numbers:
        if n == 0 or abs(n) > num_blocks:
            raise GlsdError(f"--layers: block {n} does not exist; this backbone has blocks 1..{num_blocks} "
                            f"(or -1..-{num_blocks} counted from the end)")
        index = n - 1 if n > 0 else num_blocks + n
        if index not in blocks:
            blocks.append(index)
    return blocks
