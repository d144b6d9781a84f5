"""DINO's photometric augmentation, per view, on the host or batched on the training device.

DINO's recipe (Caron et al. 2021, `main_dino.DataAugmentationDINO`; docs/algorithms.md §1), after the crop:
ColorJitter(0.4, 0.4, 0.2, 0.1) with p = 0.8 (its four operations in a random order), grayscale
p = 0.2, Gaussian blur with σ ∈ [0.1, 2] (p by view), solarize at 128 (second global view, p = 0.2).

The random numbers of one view are drawn by `draw` from the sample's generator, in a fixed order and
all of them whatever is switched off, and stored as one row of `NUM_PARAMS` floats. Then either
- `apply_on_host`: torchvision's uint8 operations on one view (the reference, run by loader workers), or
- `DevicePhotometric`: the same operations batched on the training device with per-image parameters,
  computed in float32 on the 0-255 scale with torchvision's rounding after each uint8 operation (floor
  after the blends and the hue conversion, rounding after the blur), so that the same parameters give
  the same pixels up to float rounding at integer boundaries (tests/test_photometric.py).
Loader workers then only decode and crop (uint8), the part whose parameters the geometry records.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# One row per view: the jitter flag, the order of its 4 operations, their factors, then the others.
JITTER, ORDER, FACTORS, GRAY, BLUR, SIGMA, SOLARIZE = 0, slice(1, 5), slice(5, 9), 9, 10, 11, 12
NUM_PARAMS = 13
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
LUMA = (0.2989, 0.587, 0.114)
SOLARIZE_THRESHOLD = 128


def uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def chance(gen: torch.Generator, p: float) -> bool:
    # Always draw, so the stream of random numbers does not depend on p.
    return float(torch.rand((), generator=gen)) < p


def draw(gen: torch.Generator, size: int, blur_p: float, solarize_p: float) -> list[float]:
    """The photometric parameters of one view of side `size`. σ ∈ [0.1, 2] is DINO's range for
    224-px views, scaled with the view so that small CPU presets are not blurred beyond recognition."""
    jitter = chance(gen, 0.8)
    order = torch.randperm(4, generator=gen).tolist()
    factors = [uniform(gen, 0.6, 1.4), uniform(gen, 0.6, 1.4), uniform(gen, 0.8, 1.2), uniform(gen, -0.1, 0.1)]
    gray = chance(gen, 0.2)
    blur = chance(gen, blur_p)
    sigma = uniform(gen, 0.1, 2.0) * size / 224
    solarize = chance(gen, solarize_p)
    return [float(jitter), *map(float, order), *factors, float(gray), float(blur), sigma, float(solarize)]


def blur_radius(sigma: float) -> int:
    """Half the kernel size: torchvision's kernel is 2⌈3σ⌉ + 1 taps here."""
    return math.ceil(3 * sigma)


def apply_on_host(view: Tensor, p: Sequence[float]) -> Tensor:
    """The reference: torchvision's operations on one uint8 (3, S, S) view."""
    if p[JITTER]:
        ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        factors = p[FACTORS]
        for i in p[ORDER]:
            view = ops[int(i)](view, factors[int(i)])
    if p[GRAY]:
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    if p[BLUR]:
        kernel = 2 * blur_radius(p[SIGMA]) + 1
        view = TF.gaussian_blur(view, [kernel, kernel], [p[SIGMA], p[SIGMA]])
    if p[SOLARIZE]:
        view = TF.solarize(view, SOLARIZE_THRESHOLD)
    return view


def normalize(view: Tensor) -> Tensor:
    """uint8 (or 0-255 float) → float normalised with ImageNet's mean and std."""
    return TF.normalize(view.float() / 255.0, IMAGENET_MEAN, IMAGENET_STD)


# ---------------------------------------------------------------------------------------------- batched


def _luma(x: Tensor) -> Tensor:
    """(n, 3, H, W) 0-255 → (n, 1, H, W), floored as torchvision's uint8 grayscale."""
    r, g, b = x.unbind(1)
    return (r * LUMA[0] + g * LUMA[1] + b * LUMA[2]).floor_().unsqueeze(1)


def _blend(x: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    """torchvision's `_blend` on uint8: ratio·x + (1 − ratio)·other, clamped, truncated."""
    return (x * ratio + other * (1.0 - ratio)).clamp_(0, 255).floor_()


def _rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(n, 3, H, W) in [0, 1] → h, s, v (n, H, W); torchvision's `_rgb_to_hsv` arithmetic (after
    Pillow's), step for step, so that the rounding agrees."""
    r, g, _ = x.unbind(1)
    minc, maxc = torch.aminmax(x, dim=1)
    flat = maxc == minc
    ones = torch.ones_like(maxc)
    span = maxc - minc
    s = span / torch.where(flat, ones, maxc)
    rc, gc, bc = ((maxc.unsqueeze(1) - x) / torch.where(flat, ones, span).unsqueeze(1)).unbind(1)
    max_is_r, max_is_g = maxc == r, maxc == g
    h = torch.where(max_is_r, bc - gc, torch.where(max_is_g, rc + 2.0 - bc, gc + 4.0 - rc))
    return (h * (1.0 / 6.0) + 1.0).fmod_(1.0), s, maxc


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """h, s, v (n, H, W) → (n, 3, H, W) by the closed form f(n) = v − v·s·clamp(min(k, 4 − k), 0, 1),
    k = (n + 6h) mod 6 for n = 5, 3, 1 (Wikipedia, "HSL and HSV", HSV to RGB alternative): the same
    colours as torchvision's six-sector table without its stacks and gathers (3-5x faster on the CPU;
    after the uint8 conversion 99.9995 % of values agree, the others by one level)."""
    chroma = v * s
    h6 = h * 6.0
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (h6 + n).remainder_(6.0)
        channels.append(v - chroma * torch.minimum(k, 4.0 - k).clamp_(0, 1))
    return torch.stack(channels, 1).clamp_(0, 1)


def _adjust(op: int, x: Tensor, factor: Tensor) -> Tensor:
    """One ColorJitter operation on (n, 3, H, W) 0-255 floats with per-image factors (n,)."""
    f = factor[:, None, None, None]
    if op == BRIGHTNESS:
        return (x * f).clamp_(0, 255).floor_()
    if op == CONTRAST:
        return _blend(x, _luma(x).mean(dim=(1, 2, 3), keepdim=True), f)
    if op == SATURATION:
        return _blend(x, _luma(x), f)
    h, s, v = _rgb_to_hsv(x * (1.0 / 255.0))
    rgb = _hsv_to_rgb((h + factor[:, None, None]).remainder_(1.0), s, v)
    return rgb.mul_(255.0 + 1.0 - 1e-3).floor_()  # torchvision's float → uint8 conversion


def _blur_kernels(sigma: Tensor, blur: Tensor, radius: int) -> Tensor:
    """(n, 2·radius + 1) per-image 1-D Gaussian taps, zero beyond each image's own radius ⌈3σ⌉ and
    a unit impulse for images without blur (torchvision: softmax of −(d/σ)²/2 over its taps)."""
    d = torch.arange(-radius, radius + 1, dtype=torch.float32)
    own = torch.ceil(3 * sigma)[:, None]
    logits = -(d[None, :] / sigma[:, None]).pow(2) / 2
    taps = torch.softmax(logits.masked_fill(d[None, :].abs() > own, -math.inf), dim=1)
    impulse = (d == 0).float().expand_as(taps)
    return torch.where(blur[:, None], taps, impulse)


def _blur(x: Tensor, kernels: Tensor) -> Tensor:
    """Separable per-image Gaussian blur with reflect padding, rounded as torchvision's uint8 blur."""
    n, c, height, width = x.shape
    radius = kernels.shape[1] // 2
    if radius == 0:
        return x
    weight = kernels.repeat_interleave(c, 0)[:, None, None, :]       # (n·c, 1, 1, K)
    y = F.pad(x.reshape(1, n * c, height, width), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, weight, groups=n * c)                             # along rows
    y = F.conv2d(y, weight.transpose(2, 3), groups=n * c)             # along columns
    return y.reshape(n, c, height, width).round_()


class DevicePhotometric:
    """The photometric part of a batch's views on the training device, with per-image parameters.

    Views of one size are processed together (all global views, then all local views). The jitter's
    random order is handled round by round: in round r every image applies its r-th operation, so the
    images are grouped by that operation with a permutation computed on the host from the parameters
    (which stay on the CPU: no device value is read), each group's operation runs on its contiguous
    slice, and the images are put back in place.
    """

    def __init__(self, device: torch.device, color: bool = True):
        self.device = device
        self.color = color
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0

    def prepare(self, batch: dict) -> dict:
        """A collated batch from the loader (uint8 views, "photometric" parameters on the host) → the
        same batch with normalised float views on the device (the Trainer's `prepare_batch`)."""
        batch = dict(batch)
        params = batch.pop("photometric")
        views = [v.to(self.device, non_blocking=True) for v in batch["views"]]
        batch["views"] = self(views, params)
        return batch

    def __call__(self, views: list[Tensor], params: Tensor) -> list[Tensor]:
        """views: V uint8 (B, 3, S_v, S_v) on the device; params: (B, V, NUM_PARAMS) on the CPU →
        V float (B, 3, S_v, S_v) normalised views."""
        out: list[Tensor | None] = [None] * len(views)
        sizes = sorted({v.shape[-1] for v in views})
        for size in sizes:
            members = [i for i, v in enumerate(views) if v.shape[-1] == size]
            x = torch.cat([views[i] for i in members]).float()
            if self.color:
                x = self._photometric(x, torch.cat([params[:, i] for i in members]))
            x = (x - self.mean) / self.std
            for i, chunk in zip(members, x.chunk(len(members))):
                out[i] = chunk
        return out  # type: ignore[return-value]

    def _to_device(self, t: Tensor) -> Tensor:
        # Pinned host memory lets the copy run asynchronously: a pageable copy would wait for the GPU.
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def _photometric(self, x: Tensor, p: Tensor) -> Tensor:
        jitter = p[:, JITTER] > 0
        factors = self._to_device(p[:, FACTORS].contiguous())
        for round_ in range(4):
            op = torch.where(jitter, p[:, ORDER][:, round_].long(), torch.full_like(jitter, 4, dtype=torch.long))
            perm = torch.argsort(op, stable=True)
            counts = torch.bincount(op, minlength=5).tolist()  # host values: free
            if counts[4] == len(op):
                continue
            perm_d = self._to_device(perm)
            y, f = x.index_select(0, perm_d), factors.index_select(0, perm_d)
            start = 0
            for o in range(4):
                end = start + counts[o]
                if end > start:
                    y[start:end] = _adjust(o, y[start:end], f[start:end, o])
                start = end
            x = x.index_copy_(0, perm_d, y)
        gray = self._to_device(p[:, GRAY] > 0)
        x = torch.where(gray[:, None, None, None], _luma(x).expand_as(x), x)
        blurred = p[:, BLUR] > 0
        radius = int(torch.ceil(3 * p[blurred, SIGMA]).max()) if blurred.any() else 0  # host values: free
        if radius > 0:
            x = _blur(x, self._to_device(_blur_kernels(p[:, SIGMA], blurred, radius)))
        solarize = self._to_device(p[:, SOLARIZE] > 0)[:, None, None, None]
        return torch.where(solarize & (x >= SOLARIZE_THRESHOLD), 255.0 - x, x)
