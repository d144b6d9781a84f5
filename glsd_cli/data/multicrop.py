"""DINO multi-crop augmentation whose views carry their geometry (docs/algorithms.md §1).

Each view records `box = (top, left, height, width)` in pixels of the original image (the order of
torchvision's `RandomResizedCrop.get_params`) and whether it was flipped after crop and resize.
All randomness comes from a `torch.Generator` that the caller seeds from (seed, epoch, index), so a
sample's views do not depend on the worker, the rank or what was drawn before (docs/design.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from glsd_cli.data import photometric
from glsd_cli.data.photometric import IMAGENET_MEAN, IMAGENET_STD, chance, uniform

# DINO's multi-crop has two global views, first in every sample; they are the teacher's views.
NUM_GLOBAL_VIEWS = 2


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator that is a pure function of (seed, epoch, sample index)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], gen: torch.Generator,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) with torchvision's RandomResizedCrop.get_params logic, drawn from `gen`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * uniform(gen, *scale)
        aspect = math.exp(uniform(gen, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    # Fallback: the largest central crop within the ratio bounds (as torchvision does).
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class ViewRecipe:
    """How one kind of view is made."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float = 0.0


class MultiCrop:
    """2 global views and N local views per image, each with its box and flip flag.

    DINO's recipe: RandomResizedCrop (bicubic, antialiased), flip p = 0.5, then the photometric part
    (data/photometric.py: colour jitter, grayscale, blur — global 1: p = 1, global 2: p = 0.1 +
    solarize p = 0.2, locals: p = 0.5 — and normalisation). `geometric` stops after the flip and
    returns uint8 views with their photometric parameters, for a training device to finish in batches
    (`DevicePhotometric`); calling the transform does everything here, in the loader's workers.
    """

    def __init__(self, global_size: int, local_size: int, num_local: int,
                 global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
                 color: bool = True, global_blur: tuple[float, float] = (1.0, 0.1)):
        # The NUM_GLOBAL_VIEWS global recipes first.
        self.recipes = [ViewRecipe(global_size, global_scale, global_blur[0]),
                        ViewRecipe(global_size, global_scale, global_blur[1], solarize_p=0.2)]
        self.recipes += [ViewRecipe(local_size, local_scale, 0.5)] * num_local
        self.color = color
        self.num_global = NUM_GLOBAL_VIEWS

    @property
    def num_views(self) -> int:
        return len(self.recipes)

    def geometric(self, image: torch.Tensor, gen: torch.Generator
                  ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """image: uint8 (3, H, W) → (views uint8 (3, S, S) each, boxes (V, 4) float, flips (V,) bool,
        photometric parameters (V, NUM_PARAMS) float32). Every random number is drawn, in the same
        order, whether or not colour augmentation is on, so that it never moves the geometry."""
        height, width = image.shape[-2:]
        views, boxes, flips, params = [], [], [], []
        for recipe in self.recipes:
            top, left, h, w = random_resized_crop_box(height, width, recipe.scale, gen)
            view = F.resized_crop(image, top, left, h, w, [recipe.size, recipe.size],
                                  interpolation=InterpolationMode.BICUBIC, antialias=True)
            flipped = chance(gen, 0.5)
            if flipped:
                view = F.horizontal_flip(view)
            views.append(view)
            boxes.append((top, left, h, w))
            flips.append(flipped)
            params.append(photometric.draw(gen, recipe.size, recipe.blur_p, recipe.solarize_p))
        return (views, torch.tensor(boxes, dtype=torch.float32), torch.tensor(flips, dtype=torch.bool),
                torch.tensor(params, dtype=torch.float32))

    def __call__(self, image: torch.Tensor, gen: torch.Generator
                 ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """image: uint8 (3, H, W) → (views float (3, S, S) each, boxes (V, 4) float, flips (V,) bool)."""
        views, boxes, flips, params = self.geometric(image, gen)
        if self.color:
            views = [photometric.apply_on_host(v, p.tolist()) for v, p in zip(views, params)]
        return [photometric.normalize(v) for v in views], boxes, flips


class EvalTransform:
    """Resize the shorter side to size·256/224 (bicubic), centre-crop `size`, normalise (DINO eval)."""

    def __init__(self, size: int):
        self.size = size
        self.resize = int(round(size * 256 / 224))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = F.resize(image, [self.resize], interpolation=InterpolationMode.BICUBIC, antialias=True)
        image = F.center_crop(image, [self.size, self.size])
        return photometric.normalize(image)
