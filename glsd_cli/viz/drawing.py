"""Drawing helpers on Pillow + numpy: colour maps, palettes, captions, montages, PNG files."""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from glsd_cli.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from glsd_cli.errors import GlsdError

# viridis sampled at 0, 1/8, ..., 1: perceptually uniform and readable in grayscale print, so a
# heat map keeps its meaning without matplotlib.
_VIRIDIS = np.array([
    (0x44, 0x01, 0x54), (0x47, 0x2C, 0x7A), (0x3B, 0x51, 0x8B), (0x2C, 0x71, 0x8E), (0x21, 0x90, 0x8D),
    (0x27, 0xAD, 0x81), (0x5C, 0xC8, 0x63), (0xAA, 0xDC, 0x32), (0xFD, 0xE7, 0x25)], dtype=np.float64)

# matplotlib's tab10 then tab20's light shades: what readers of ML papers expect class colours to be.
_TAB = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
        "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
        "#dbdb8d", "#9edae5"]

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def colormap(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 viridis colours (linear between the anchors)."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (v - lo)[..., None]
    rgb = _VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac
    return np.round(rgb).astype(np.uint8)


def normalise01(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] for display; a constant map becomes all zeros rather than NaN."""
    v = np.asarray(values, dtype=np.float64)
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else np.zeros_like(v)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blend a (H, W) heat map in [0, 1] over an (H, W, 3) uint8 image: alpha of colour map."""
    if image.shape[:2] != heat.shape:
        raise ValueError(f"image {image.shape[:2]} and heat map {heat.shape} differ in size")
    out = (1 - alpha) * image.astype(np.float64) + alpha * colormap(heat).astype(np.float64)
    return np.round(out).clip(0, 255).astype(np.uint8)


def palette(n: int) -> list[tuple[int, int, int]]:
    """n distinct colours: tab10/tab20 first, then golden-ratio hues for larger label sets."""
    out = [tuple(int(h[i:i + 2], 16) for i in (1, 3, 5)) for h in _TAB[:n]]
    for k in range(len(out), n):
        r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.65, 0.85)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out  # type: ignore[return-value]


def hue(fraction: float) -> tuple[int, int, int]:
    """A saturated colour for a position in [0, 1) (tells neighbouring match lines apart)."""
    r, g, b = colorsys.hsv_to_rgb(fraction % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at `size` px (Pillow >= 10.1); the fixed bitmap font on older ones."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def uint8_image(image: torch.Tensor) -> np.ndarray:
    """uint8 (3, H, W) tensor -> (H, W, 3) numpy array for Pillow."""
    return image.detach().cpu().permute(1, 2, 0).contiguous().numpy()


def denormalise(view: torch.Tensor) -> np.ndarray:
    """An ImageNet-normalised float view (3, S, S) -> (S, S, 3) uint8, as the network saw it."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=view.dtype)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=view.dtype)[:, None, None]
    rgb = (view.detach().cpu() * std + mean).clamp(0, 1) * 255
    return rgb.round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def upsample_nearest(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """(R, C) -> (height, width) by nearest neighbour: each token keeps its own constant cell, so the
    picture shows the model's real patch resolution (DINO's visualize_attention does the same)."""
    rows, cols = grid.shape
    r = np.minimum((np.arange(height) * rows) // height, rows - 1)
    c = np.minimum((np.arange(width) * cols) // width, cols - 1)
    return grid[r[:, None], c[None, :]]


def with_caption(image: Image.Image, text: str, band: int = 18) -> Image.Image:
    """The image below a white band holding `text`."""
    canvas = Image.new("RGB", (max(image.width, 1), image.height + band), BACKGROUND)
    canvas.paste(image, (0, band))
    ImageDraw.Draw(canvas).text((2, 2), text, fill=TEXT, font=font(max(9, band - 6)))
    return canvas


def montage(tiles: list[tuple[np.ndarray, str]], columns: int, min_side: int = 128, gap: int = 6) -> Image.Image:
    """Captioned tiles in a grid; small tiles are enlarged (nearest) to `min_side` so tiny models
    still give a readable overview while the single-map PNGs stay at the image's own size."""
    if not tiles:
        raise ValueError("montage needs at least one tile")
    h, w = tiles[0][0].shape[:2]
    factor = max(1, -(-min_side // max(1, min(h, w))))
    captioned = [with_caption(Image.fromarray(a).resize((w * factor, h * factor), Image.NEAREST), t)
                 for a, t in tiles]
    tw, th = captioned[0].size
    rows = -(-len(captioned) // columns)
    sheet = Image.new("RGB", (columns * tw + (columns + 1) * gap, rows * th + (rows + 1) * gap), BACKGROUND)
    for i, tile in enumerate(captioned):
        r, c = divmod(i, columns)
        sheet.paste(tile, (gap + c * (tw + gap), gap + r * (th + gap)))
    return sheet


def save_png(image: Image.Image | np.ndarray, path: Path) -> Path:
    """Write a PNG, creating its folder; a folder that cannot be written is the user's to fix."""
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="PNG")
    except OSError as e:
        raise GlsdError(f"cannot write {path}: {e.strerror or e}") from None
    return path
