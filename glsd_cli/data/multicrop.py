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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator that is a pure function of (seed, epoch, sample index)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _chance(gen: torch.Generator, p: float) -> bool:
    # Always draw, so the stream of random numbers does not depend on p.
    return float(torch.rand((), generator=gen)) < p


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], gen: torch.Generator,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) with torchvision's RandomResizedCrop.get_params logic, drawn from `gen`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(gen, *scale)
        aspect = math.exp(_uniform(gen, *log_ratio))
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

    DINO's photometric recipe: flip p=0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2,
    Gaussian blur σ∈[0.1, 2] (global 1: p=1, global 2: p=0.1 + solarize p=0.2, locals: p=0.5).
    The blur σ is given for 224-px views; it is scaled with the view size so that small CPU
    presets are not blurred beyond recognition.
    """

    def __init__(self, global_size: int, local_size: int, num_local: int,
                 global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
                 color: bool = True, global_blur: tuple[float, float] = (1.0, 0.1)):
        self.recipes = [ViewRecipe(global_size, global_scale, global_blur[0]),
                        ViewRecipe(global_size, global_scale, global_blur[1], solarize_p=0.2)]
        self.recipes += [ViewRecipe(local_size, local_scale, 0.5)] * num_local
        self.color = color
        self.num_global = 2

    @property
    def num_views(self) -> int:
        return len(self.recipes)

    def __call__(self, image: torch.Tensor, gen: torch.Generator
                 ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """image: uint8 (3, H, W) → (views float (3, S, S) each, boxes (V, 4) float, flips (V,) bool)."""
        height, width = image.shape[-2:]
        views, boxes, flips = [], [], []
        for recipe in self.recipes:
            top, left, h, w = random_resized_crop_box(height, width, recipe.scale, gen)
            view = F.resized_crop(image, top, left, h, w, [recipe.size, recipe.size],
                                  interpolation=InterpolationMode.BICUBIC, antialias=True)
            flipped = _chance(gen, 0.5)
            if flipped:
                view = F.horizontal_flip(view)
            view = self._photometric(view, recipe, gen)
            views.append(F.normalize(view.float() / 255.0, IMAGENET_MEAN, IMAGENET_STD))
            boxes.append((top, left, h, w))
            flips.append(flipped)
        return views, torch.tensor(boxes, dtype=torch.float32), torch.tensor(flips, dtype=torch.bool)

    def _photometric(self, view: torch.Tensor, recipe: ViewRecipe, gen: torch.Generator) -> torch.Tensor:
        # Draw every random number even when colour augmentation is off, so that switching it off
        # leaves the geometry of every view unchanged.
        jitter = _chance(gen, 0.8)
        order = torch.randperm(4, generator=gen).tolist()
        factors = [_uniform(gen, 0.6, 1.4), _uniform(gen, 0.6, 1.4), _uniform(gen, 0.8, 1.2), _uniform(gen, -0.1, 0.1)]
        gray = _chance(gen, 0.2)
        blur = _chance(gen, recipe.blur_p)
        sigma = _uniform(gen, 0.1, 2.0) * recipe.size / 224
        solarize = _chance(gen, recipe.solarize_p)
        if not self.color:
            return view
        if jitter:
            ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
            for i in order:
                view = ops[i](view, factors[i])
        if gray:
            view = F.rgb_to_grayscale(view, num_output_channels=3)
        if blur:
            kernel = 2 * math.ceil(3 * sigma) + 1
            view = F.gaussian_blur(view, [kernel, kernel], [sigma, sigma])
        if solarize:
            view = F.solarize(view, 128)
        return view


class EvalTransform:
    """Resize the shorter side to size·256/224 (bicubic), centre-crop `size`, normalise (DINO eval)."""

    def __init__(self, size: int):
        self.size = size
        self.resize = int(round(size * 256 / 224))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = F.resize(image, [self.resize], interpolation=InterpolationMode.BICUBIC, antialias=True)
        image = F.center_crop(image, [self.size, self.size])
        return F.normalize(image.float() / 255.0, IMAGENET_MEAN, IMAGENET_STD)
