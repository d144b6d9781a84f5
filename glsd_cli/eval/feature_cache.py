"""On-disk cache of frozen features: repeated evaluations of one checkpoint extract them once.

An entry is one safetensors file in `<checkpoint folder>/features/`, named by the SHA-256 of its
key. The key holds everything the features depend on:
- the backbone's weights: SHA-256 over every tensor of its state_dict (name, dtype, shape, bytes).
  An entry is therefore invalid as soon as the backbone changes, whatever the file's path or mtime
  say, and stays valid when only the optimiser state or the heads of a checkpoint change;
- the architecture config, the image size and the `FeatureRequest` (blocks, patch-token mean);
- the data: URI, split, number of images, SHA-256 of the labels and of a subset's image indices.
Not in the key: edits to image files that keep a folder's file count and labels (use --no-cache).
When an entry is written, the entries of the same checkpoint path and backbone choice made with
other weights are deleted: nothing can read them again.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from glsd_cli.data.base import ImageSource, SubsetSource
from glsd_cli.engine.checkpoint import atomic_write_bytes
from glsd_cli.engine.metrics import console
from glsd_cli.eval import features as features_module
from glsd_cli.eval.features import FeatureRequest
from glsd_cli.models.backbone import Backbone

FORMAT = "glsd-features-v1"
FOLDER_NAME = "features"


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state_dict: names, dtypes, shapes and raw bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _sha(values: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, values)).encode()).hexdigest()


def root_indices(source: ImageSource) -> list[int] | None:
    """Indices into the underlying source of a (possibly nested) subset; None for a whole source."""
    if not isinstance(source, SubsetSource):
        return None
    below = root_indices(source.base)
    return list(source.indices) if below is None else [below[i] for i in source.indices]


def source_fingerprint(source: ImageSource) -> dict:
    indices = root_indices(source)
    return {"uri": source.uri, "split": source.split, "num_images": len(source), "labels": _sha(source.targets),
            "indices": _sha(indices) if indices is not None else "all"}


@dataclass
class FeatureCache:
    """Features of one backbone of one checkpoint, read from or written to `folder`."""

    folder: Path
    checkpoint: str          # the checkpoint's path: stale entries of the same path are pruned
    backbone_name: str       # teacher | student | random-init
    weights: str             # weights_fingerprint of the backbone
    model_config: str        # the architecture section of the run's config, as JSON
    enabled: bool = True
    hits: int = 0
    misses: int = 0

    @classmethod
    def for_backbone(cls, checkpoint_file: Path, backbone_name: str, backbone: Backbone, model_config: str,
                     folder: Path | None = None, enabled: bool = True) -> "FeatureCache":
        folder = folder if folder is not None else checkpoint_file.parent / FOLDER_NAME
        weights = weights_fingerprint(backbone) if enabled else ""
        return cls(Path(folder), str(checkpoint_file.resolve()), backbone_name, weights, model_config, enabled)

    def features(self, backbone: Backbone, source: ImageSource, image_size: int, device: torch.device,
                 request: FeatureRequest, batch_size: int = 256, num_workers: int = 0, quiet: bool = True,
                 description: str = "features") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Features and labels of `source`: from the cache when an entry matches, else extracted (and stored)."""
        key = json.dumps({"format": FORMAT, "weights": self.weights, "model": self.model_config,
                          "image_size": image_size, "request": request.describe(),
                          "data": source_fingerprint(source)}, sort_keys=True)
        path = self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"
        if self.enabled:
            found = self._read(path, key)
            if found is not None:
                self.hits += 1
                if not quiet:
                    console.print(f"{description}: features reused from {path}")
                return found
        self.misses += 1
        # Looked up through the module so that tests can count extractions by patching it.
        feats, labels = features_module.extract_representations(
            backbone, source, image_size, device, request, batch_size, num_workers, quiet, description)
        if self.enabled:
            self._write(path, key, feats, labels)
        return feats, labels

    def _read(self, path: Path, key: str) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None  # a hash-prefix collision or another format: extract again
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError):
            return None  # truncated or corrupt: extract again and overwrite
        labels = tensors.pop("labels")
        return tensors, labels

    def _write(self, path: Path, key: str, feats: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        tensors = {**{k: v.contiguous() for k, v in feats.items()}, "labels": labels.contiguous()}
        meta = {"format": FORMAT, "key": key, "checkpoint": self.checkpoint, "backbone": self.backbone_name,
                "weights": self.weights}
        atomic_write_bytes(path, safetensors_bytes(tensors, metadata=meta))
        self._prune_stale()

    def _prune_stale(self) -> None:
        """Delete entries of this checkpoint path and backbone choice that were made with other weights."""
        for other in self.folder.glob("*.safetensors"):
            try:
                with safe_open(str(other), framework="pt", device="cpu") as f:
                    meta = f.metadata() or {}
            except (SafetensorError, OSError, ValueError, RuntimeError):
                continue
            if (meta.get("format") == FORMAT and meta.get("checkpoint") == self.checkpoint
                    and meta.get("backbone") == self.backbone_name and meta.get("weights") != self.weights):
                other.unlink(missing_ok=True)
