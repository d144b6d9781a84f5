"""Pictures of dense evaluation: each image beside its true mask and the predicted ones, in class colours."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from glsd_cli.data.segmentation import IGNORE_INDEX
from glsd_cli.viz.drawing import BACKGROUND, TEXT, font, montage, palette

IGNORED = (0, 0, 0)  # pixels that count nowhere


def colour_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) class indices → (H, W, 3) uint8 in the class palette; ignored pixels black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:num_classes] = np.array(palette(num_classes), dtype=np.uint8)
    table[IGNORE_INDEX] = IGNORED
    return table[np.asarray(mask, dtype=np.uint8)]


def legend(classes: list[str], shown: set[int], width: int) -> Image.Image:
    """One line per class that appears in the picture: its colour and its name."""
    colours = palette(len(classes))
    entries = [(colours[c], classes[c]) for c in sorted(shown) if c < len(classes)]
    if IGNORE_INDEX in shown:
        entries.append((IGNORED, f"{IGNORE_INDEX} = ignored"))
    per_row = max(1, width // 150)
    rows = -(-len(entries) // per_row)
    sheet = Image.new("RGB", (width, 8 + 18 * rows), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, (colour, name) in enumerate(entries):
        r, c = divmod(i, per_row)
        x, y = 6 + 150 * c, 6 + 18 * r
        draw.rectangle([x, y, x + 12, y + 12], fill=colour)
        draw.text((x + 18, y), name[:20], fill=TEXT, font=font(12))
    return sheet


def draw_predictions(images: list[np.ndarray], truths: list[np.ndarray], predictions: dict[str, list[np.ndarray]],
                     classes: list[str]) -> Image.Image:
    """One row per image: the image, its true mask, then each prediction with its pixel accuracy."""
    tiles: list[tuple[np.ndarray, str]] = []
    shown: set[int] = set()
    for i, (image, truth) in enumerate(zip(images, truths)):
        size = truth.shape
        tiles.append((np.asarray(Image.fromarray(image).resize(size[::-1], Image.BICUBIC)), f"image {i}"))
        tiles.append((colour_mask(truth, len(classes)), "true"))
        shown |= set(np.unique(truth).tolist())
        valid = truth != IGNORE_INDEX
        for name, preds in predictions.items():
            acc = 100.0 * float((preds[i] == truth)[valid].mean()) if valid.any() else 0.0
            tiles.append((colour_mask(preds[i], len(classes)), f"{name} {acc:.0f}%"))
            shown |= set(np.unique(preds[i]).tolist())
    sheet = montage(tiles, columns=2 + len(predictions))
    key = legend(classes, shown, sheet.width)
    out = Image.new("RGB", (sheet.width, sheet.height + key.height), BACKGROUND)
    out.paste(sheet, (0, 0))
    out.paste(key, (0, sheet.height))
    return out
