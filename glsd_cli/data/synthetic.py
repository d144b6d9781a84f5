"""The built-in data: procedurally generated shapes and textures, no files, deterministic.

Ten classes defined by *shape* only; foreground and background colours (two of a palette of ten),
position, scale, small rotation and pixel noise are random per image, so colour statistics say nothing about the class and
a random network does poorly, while views of the same shape share structure that self-distillation
can learn. Image i of a split is a pure function of (seed, split, i).

URI: `synthetic` or `synthetic:key=value,...` with keys `train` (images in the train split, default
2000), `val` (held-out images, default 1000), `size` (side in pixels, default 32), `seed` (default 0).
"""
from __future__ import annotations

import numpy as np
import torch

from glsd_cli.data.base import ImageSource
from glsd_cli.errors import DataError

CLASSES = ["disk", "ring", "square", "frame", "triangle", "plus", "cross", "stripes", "checker", "dots"]
_SPLIT_ID = {"train": 0, "val": 1}
PALETTE = np.array([[0.9, 0.1, 0.1], [0.1, 0.7, 0.2], [0.15, 0.3, 0.9], [0.95, 0.85, 0.1],
                    [0.9, 0.45, 0.05], [0.6, 0.2, 0.8], [0.1, 0.8, 0.85], [0.95, 0.95, 0.95],
                    [0.1, 0.1, 0.1], [0.5, 0.5, 0.5]])
_DEFAULTS = {"train": 2000, "val": 1000, "size": 32, "seed": 0}


def _shape_mask(label: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of class `label` in shape coordinates (u, v); the shape spans about [-1, 1]²."""
    r = np.sqrt(u * u + v * v)
    box = np.maximum(np.abs(u), np.abs(v))
    name = CLASSES[label]
    if name == "disk":
        return r < 0.9
    if name == "ring":
        return (r > 0.55) & (r < 0.95)
    if name == "square":
        return box < 0.75
    if name == "frame":
        return (box > 0.5) & (box < 0.85)
    if name == "triangle":  # apex up; width shrinks linearly with height
        return (v > -0.75) & (v < 0.85) & (np.abs(u) < (0.85 - v) * 0.55)
    if name in ("plus", "cross"):
        if name == "cross":  # the plus turned by 45 degrees
            u, v = (u - v) / np.sqrt(2), (u + v) / np.sqrt(2)
        return ((np.abs(u) < 0.22) & (np.abs(v) < 0.95)) | ((np.abs(v) < 0.22) & (np.abs(u) < 0.95))
    # Textures cover the whole image; frequency and phase vary per image.
    freq = rng.uniform(2.5, 4.0)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    if name == "stripes":
        return np.sin(freq * np.pi * u + phase[0]) > 0
    if name == "checker":
        return (np.sin(freq * np.pi * u + phase[0]) > 0) ^ (np.sin(freq * np.pi * v + phase[1]) > 0)
    if name == "dots":
        return (np.sin(freq * np.pi * u + phase[0]) * np.sin(freq * np.pi * v + phase[1])) > 0.55
    raise AssertionError(name)


def render(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image of class `label`."""
    ys, xs = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    textured = CLASSES[label] in ("stripes", "checker", "dots")
    centre = rng.uniform(-0.3, 0.3, size=2)
    scale = rng.uniform(0.4, 0.7) if not textured else rng.uniform(0.8, 1.2)
    angle = rng.uniform(-0.35, 0.35) if not textured else rng.uniform(0, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = xs - centre[1], ys - centre[0]
    u = (c * dx + s * dy) / scale
    v = (-s * dx + c * dy) / scale
    mask = _shape_mask(label, u, v, rng)
    # Two different colours of a small palette: colour says nothing about the class, and it cannot
    # tell one image from another either, so matching two views by colour alone is not enough and
    # self-distillation has to learn shape. (With continuous random colours it learns colour only.)
    fg_i, bg_i = rng.choice(len(PALETTE), size=2, replace=False)
    img = np.where(mask[..., None], PALETTE[fg_i], PALETTE[bg_i]) + rng.normal(0, 0.06, size=(size, size, 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


class SyntheticShapes(ImageSource):
    """The built-in labelled data set of ten shape and texture classes (train / val splits)."""

    def __init__(self, split: str = "train", num_images: int | None = None, size: int = 32, seed: int = 0):
        if split not in _SPLIT_ID:
            raise DataError(f"the synthetic data has splits 'train' and 'val', not '{split}'")
        self.split = split
        self.size = size
        self.seed = seed
        n = num_images if num_images is not None else _DEFAULTS[split]
        self.uri = f"synthetic:{split}={n},size={size},seed={seed}"
        self.classes = list(CLASSES)
        # Balanced labels in a fixed interleaved order: image i has class i mod 10.
        self.targets = [i % len(CLASSES) for i in range(n)]

    @classmethod
    def from_uri(cls, options: str, split: str) -> "SyntheticShapes":
        values = dict(_DEFAULTS)
        for item in filter(None, (options or "").split(",")):
            key, _, raw = item.partition("=")
            if key not in values or not raw.isdigit():
                raise DataError(
                    f"bad synthetic option '{item}': expected key=integer with keys {', '.join(_DEFAULTS)}")
            values[key] = int(raw)
        if values["size"] < 8:
            raise DataError("synthetic images need size >= 8")
        return cls(split=split, num_images=values[split if split in _SPLIT_ID else "train"],
                   size=values["size"], seed=values["seed"])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = self.targets[index]
        rng = np.random.default_rng([self.seed, _SPLIT_ID[self.split], index])
        img = render(label, self.size, rng)
        return torch.from_numpy(img).permute(2, 0, 1).contiguous(), label

    def image_size(self) -> str:
        return f"{self.size}x{self.size}"
