"""Built-in segmentation data: scenes of 2-4 regions of the built-in textures, with per-pixel masks.

Each image is cut into 2-4 regions of random, curved shape (a Voronoi partition of random seed
points whose distances are warped by a smooth random field); each region shows a different texture
class of `synthetic.py` (its own grey levels, period, phase and orientation). Seeds and classes are
drawn independently, so no class prefers a position: a region's class has to be read off its
texture. The mask is the class of each pixel (no ignore pixels). An image's label (for the k-NN
monitor and CLS k-NN) is the class that covers most of it.

Texture periods are 5-8 px at every image size (`synthetic`'s 32-px periods; `scale` multiplies
them), so a larger image holds more periods per region rather than larger stripes.

Image i of a split is a pure function of (seed, split, i). Its layout (regions and classes) comes
from a generator of its own, so masks and labels cost no texture rendering.

URI: `synthetic-scenes` or `synthetic-scenes:key=value,...` with keys `train` (default 2000), `val`
(default 500), `size` (side in pixels, default 64), `seed` (default 0), `regions` (most regions per
image, 2-4, default 4) and `scale` (texture length scale in percent, default 100).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from glsd_cli.data.segmentation import SegmentationSource
from glsd_cli.data.synthetic import CLASSES, parse_int_options, render
from glsd_cli.errors import DataError

_SPLIT_ID = {"train": 0, "val": 1}
_DEFAULTS = {"train": 2000, "val": 500, "size": 64, "seed": 0, "regions": 4, "scale": 100}
MIN_REGIONS = 2
WARP = 0.25            # amplitude of the boundary warp, in units of the image side
WARP_CELLS = 4         # the warp field is a 4x4 grid of Gaussian values, upsampled bicubically
MIN_REGION_SHARE = 0.5  # every region covers at least this share of an equal split (1 / regions)
LAYOUT_TRIES = 20


def scene_layout(size: int, max_regions: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(region map (size, size) int, class of each region): 2..max_regions regions, distinct classes.

    Layouts with a region smaller than MIN_REGION_SHARE of an equal split are drawn again (up to
    LAYOUT_TRIES times; then the last one is kept), so that every region is large enough to learn from.
    """
    n = int(rng.integers(MIN_REGIONS, max_regions + 1))
    classes = rng.choice(len(CLASSES), size=n, replace=False)
    coords = (np.arange(size) + 0.5) / size
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    for _ in range(LAYOUT_TRIES):
        seeds = rng.uniform(0, 1, size=(n, 2))
        coarse = torch.from_numpy(rng.normal(size=(1, n, WARP_CELLS, WARP_CELLS)))
        warp = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)[0].numpy()
        dist = np.hypot(ys[None] - seeds[:, 0, None, None], xs[None] - seeds[:, 1, None, None]) + WARP * warp
        regions = dist.argmin(0)
        counts = np.bincount(regions.ravel(), minlength=n)
        if counts.min() >= MIN_REGION_SHARE * size * size / n:
            break
    return regions, classes


class SyntheticScenes(SegmentationSource):
    """The built-in segmentation data set: texture scenes with masks (train / val splits)."""

    def __init__(self, split: str = "train", num_images: int | None = None, size: int = 64, seed: int = 0,
                 max_regions: int = 4, scale_percent: int = 100):
        if split not in _SPLIT_ID:
            raise DataError(f"synthetic-scenes has splits 'train' and 'val', not '{split}'")
        if not MIN_REGIONS <= max_regions <= len(CLASSES):
            raise DataError(f"synthetic-scenes: regions must be {MIN_REGIONS}..{len(CLASSES)}, got {max_regions}")
        if size < 16:
            raise DataError("synthetic-scenes images need size >= 16")
        if scale_percent < 10:
            raise DataError("synthetic-scenes: scale must be at least 10 (percent)")
        self.split, self.size, self.seed = split, size, seed
        self.max_regions, self.scale_percent = max_regions, scale_percent
        n = num_images if num_images is not None else _DEFAULTS[split]
        self.num_images = n
        self.uri = (f"synthetic-scenes:{split}={n},size={size},seed={seed},regions={max_regions},"
                    f"scale={scale_percent}")
        self.classes = list(CLASSES)
        self._targets: list[int] | None = None

    @classmethod
    def from_uri(cls, options: str, split: str) -> "SyntheticScenes":
        values = parse_int_options(options, _DEFAULTS, "synthetic-scenes")
        return cls(split=split, num_images=values[split if split in _SPLIT_ID else "train"], size=values["size"],
                   seed=values["seed"], max_regions=values["regions"], scale_percent=values["scale"])

    def __len__(self) -> int:
        return self.num_images

    @property
    def targets(self) -> list[int]:  # type: ignore[override]
        """The class covering most of each image; computed on first use from the layouts alone."""
        if self._targets is None:
            self._targets = [self._dominant(i) for i in range(self.num_images)]
        return self._targets

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_ID[self.split], index, stream])

    def _layout(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return scene_layout(self.size, self.max_regions, self._rng(index, 0))

    def _dominant(self, index: int) -> int:
        regions, classes = self._layout(index)
        return int(classes[np.bincount(regions.ravel()).argmax()])

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        regions, classes = self._layout(index)
        rng = self._rng(index, 1)
        scale = 32 / self.size * self.scale_percent / 100
        image = np.zeros((self.size, self.size, 3), dtype=np.uint8)
        for r, label in enumerate(classes):
            texture = render(int(label), self.size, rng, scale)
            image[regions == r] = texture[regions == r]
        mask = classes[regions].astype(np.uint8)
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(mask)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _ = self.sample(index)
        return image, self.targets[index] if self._targets is not None else self._dominant(index)

    def image_size(self) -> str:
        return f"{self.size}x{self.size}"
