"""The built-in data: procedurally generated grey-level textures, no files, deterministic.

Ten classes defined by their *pattern* only (stripes, checks, dots, rings, ...). Orientation jitter,
period, phase, the two grey levels and pixel noise are random per image, so intensity statistics say
little about the class and a random network does poorly (30 % k-NN top-1, chance 10 %). Every
class is a texture that fills the image, so any crop — global or local — shows its class, as
multi-crop self-distillation assumes; every pattern is its own mirror image, so horizontal flips
keep classes apart. Image i of a split is a pure function of (seed, split, i).

Why textures and why grey (measured with tiny-dino-like runs of 5 epochs, 2026-11-22; README "What
the demo shows"): on single coloured shapes a tiny ViT learns slowly even with labels (20-30 %
held-out accuracy after 300 supervised steps, against 86 % on these textures after 200), and with
a random colour pair per image self-distillation matches the two views by their colours, which
survive DINO's colour jitter: k-NN rose by 2-5 points on coloured textures and by 3-15 on grey ones.

URI: `synthetic` or `synthetic:key=value,...` with keys `train` (images in the train split, default
2000), `val` (held-out images, default 1000), `size` (side in pixels, default 32), `seed` (default 0).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from glsd_cli.data.base import ImageSource
from glsd_cli.errors import DataError

CLASSES = ["hstripes", "vstripes", "checker", "diamonds", "dots", "grid", "rings", "zigzag", "blobs", "speckle"]
_SPLIT_ID = {"train": 0, "val": 1}
_DEFAULTS = {"train": 2000, "val": 1000, "size": 32, "seed": 0}
MIN_CONTRAST = 0.3  # smallest grey-level difference between the two phases of a pattern


def _pattern(label: int, size: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Boolean (size, size) pattern of class `label`; periods are 5-8 px at 32 px, in proportion otherwise.

    `scale` multiplies every length of the pattern (periods, blob size): 32 / size keeps the 32-px
    periods of 5-8 px at any image size (synthetic-scenes, whose regions are parts of a larger image).
    """
    ys, xs = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    period = rng.uniform(5, 8) / 32 * 2 * scale   # in units of the [-1, 1] image span
    k = 2 * np.pi / period
    phase = rng.uniform(0, 2 * np.pi, size=2)
    tilt = rng.uniform(-0.15, 0.15)                # small orientation jitter (radians)
    c, s = np.cos(tilt), np.sin(tilt)
    u, v = c * xs + s * ys, -s * xs + c * ys
    name = CLASSES[label]
    if name == "hstripes":
        return np.sin(k * v + phase[0]) > 0
    if name == "vstripes":
        return np.sin(k * u + phase[0]) > 0
    if name == "checker":
        return (np.sin(k * u + phase[0]) > 0) ^ (np.sin(k * v + phase[1]) > 0)
    if name == "diamonds":  # the checkerboard turned by 45 degrees
        a, b = (u + v) / np.sqrt(2), (u - v) / np.sqrt(2)
        return (np.sin(k * a + phase[0]) > 0) ^ (np.sin(k * b + phase[1]) > 0)
    if name == "dots":
        return np.sin(k * u + phase[0]) * np.sin(k * v + phase[1]) > 0.5
    if name == "grid":  # thin lines both ways
        return (np.cos(k * u + phase[0]) > 0.8) | (np.cos(k * v + phase[1]) > 0.8)
    if name == "rings":  # concentric circles about a random centre
        cy, cx = rng.uniform(-1, 1, size=2)
        return np.sin(k * np.hypot(u - cx, v - cy) + phase[0]) > 0
    if name == "zigzag":  # horizontal stripes bent by a symmetric triangle wave
        tri = np.abs((u * k / (2 * np.pi) + phase[1] / (2 * np.pi)) % 2 - 1)
        return np.sin(k * v + 2 * np.pi * tri + phase[0]) > 0
    if name == "blobs":  # a smooth random field (5x5 Gaussian values, bicubic) cut at zero
        cells = max(2, int(round(5 / scale)))
        coarse = torch.from_numpy(rng.normal(size=(1, 1, cells, cells)))
        return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)[0, 0].numpy() > 0
    if name == "speckle":  # independent pixels
        return rng.random((size, size)) < 0.5
    raise AssertionError(name)


def render(label: int, size: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """One (size, size, 3) uint8 grey-level image of class `label` (`scale`: see `_pattern`)."""
    mask = _pattern(label, size, rng, scale)
    fg, bg = rng.uniform(0, 1, size=2)
    if abs(fg - bg) < MIN_CONTRAST:
        fg = (bg + 0.5) % 1.0
    # Grey levels with a little independent noise per channel.
    img = np.where(mask, fg, bg)[..., None] + rng.normal(0, 0.06, size=(size, size, 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def parse_int_options(options: str, defaults: dict[str, int], scheme: str) -> dict[str, int]:
    """`key=N,key=N` of a built-in source's URI over its defaults; an unknown key or a value that is
    not a whole number stops with one line naming the keys."""
    values = dict(defaults)
    for item in filter(None, (options or "").split(",")):
        key, _, raw = item.partition("=")
        if key not in values or not raw.isdigit():
            raise DataError(f"bad {scheme} option '{item}': expected key=integer with keys {', '.join(defaults)}")
        values[key] = int(raw)
    return values


class SyntheticTextures(ImageSource):
    """The built-in labelled data set of ten texture classes (train / val splits)."""

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
    def from_uri(cls, options: str, split: str) -> "SyntheticTextures":
        values = parse_int_options(options, _DEFAULTS, "synthetic")
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
