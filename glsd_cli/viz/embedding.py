"""A 2-D map of image features coloured by label: PCA always, t-SNE when scikit-learn is installed."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from glsd_cli.errors import GlsdError
from glsd_cli.viz.drawing import BACKGROUND, TEXT, font, palette

PLOT = 600     # square scatter area, px
LEGEND = 230   # legend column to its right
TOP = 44       # title band: two lines
MARGIN = 16    # inside the plot frame, so edge points are not cut
UNLABELLED = (150, 150, 150)

__all__ = ["evenly_spaced", "pca_2d", "tsne_2d", "draw_embedding", "canvas_size"]


def canvas_size() -> tuple[int, int]:
    """(width, height) of every embedding picture."""
    return PLOT + LEGEND, TOP + PLOT


def evenly_spaced(total: int, count: int | None) -> list[int]:
    """`count` indices spread evenly over 0..total-1 (all when count is None or >= total). Spread,
    not the first `count`: folder datasets are sorted by class, and a prefix would be one class."""
    if count is None or count >= total:
        return list(range(total))
    return sorted(set(np.linspace(0, total - 1, count).round().astype(int).tolist()))


def pca_2d(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """((N, 2) projection on the first two principal axes, (2,) fractions of variance they explain).

    Exact SVD in float64 (N x D is small here), and each axis's sign fixed so that its largest
    loading is positive: the same features always give the same picture, not a mirrored one."""
    x = features.detach().cpu().double()
    if x.ndim != 2 or x.shape[0] < 2:
        raise GlsdError(f"a 2-D projection needs at least 2 images, got {x.shape[0] if x.ndim else 0}")
    x = x - x.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    axes = vh[:2]
    if axes.shape[0] < 2:  # D == 1: nothing to spread along the second axis
        axes = torch.cat([axes, torch.zeros_like(axes)])
    signs = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
    axes = axes * torch.where(signs == 0, torch.ones_like(signs), signs)
    total = float((s ** 2).sum())
    explained = (s[:2] ** 2 / total).numpy() if total > 0 else np.zeros(2)
    return (x @ axes.T).numpy(), np.pad(explained, (0, 2 - len(explained)))


def tsne_2d(features: torch.Tensor, seed: int = 0) -> np.ndarray:
    """(N, 2) t-SNE embedding (scikit-learn), initialised from PCA as recommended for stability."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise GlsdError("--method tsne needs scikit-learn (pip install scikit-learn); --method pca works without it") from None
    x = features.detach().cpu().double().numpy()
    if x.shape[0] < 5:
        raise GlsdError(f"t-SNE needs at least 5 images, got {x.shape[0]}; use --method pca or more images")
    # perplexity must stay below the number of points; 30 is scikit-learn's default.
    perplexity = float(min(30.0, (x.shape[0] - 1) / 3))
    return TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(x)


def _to_plot(points: np.ndarray) -> np.ndarray:
    """Scale each axis into the plot square (y grows downwards in images, so flip it)."""
    lo, hi = points.min(0), points.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    unit = np.where(hi > lo, (points - lo) / span, 0.5)
    inner = PLOT - 2 * MARGIN
    return np.stack([MARGIN + unit[:, 0] * inner, TOP + MARGIN + (1 - unit[:, 1]) * inner], axis=1)


def draw_embedding(points: np.ndarray, labels: np.ndarray, classes: list[str], title: str,
                   seed: int = 0) -> Image.Image:
    """A scatter of `points` (N, 2), one colour per label, with a legend of class names
    (label -1: unlabelled, grey). `title` may hold two lines; each is cut to the picture's width."""
    labels = np.asarray(labels).astype(int)
    num = max(len(classes), int(labels.max()) + 1 if labels.size else 0)
    colours = palette(num)
    canvas = Image.new("RGB", canvas_size(), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    lines = [line if len(line) <= 110 else line[:107] + "..." for line in title.splitlines()[:2]]
    draw.multiline_text((6, 4), "\n".join(lines), fill=TEXT, font=font(14), spacing=4)
    draw.rectangle([0, TOP, PLOT - 1, TOP + PLOT - 1], outline=(200, 200, 200))
    xy = _to_plot(np.asarray(points, dtype=np.float64))
    radius = 3 if len(xy) <= 2000 else 2
    # A seeded random drawing order: no class is buried under one drawn after it.
    for i in np.random.default_rng(seed).permutation(len(xy)):
        colour = colours[labels[i]] if labels[i] >= 0 else UNLABELLED
        x, y = xy[i]
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    _legend(draw, labels, classes, colours)
    return canvas


def _legend(draw: ImageDraw.ImageDraw, labels: np.ndarray, classes: list[str],
            colours: list[tuple[int, int, int]]) -> None:
    present = sorted(set(labels.tolist()))
    entries = [(classes[k] if 0 <= k < len(classes) else f"class {k}", colours[k]) for k in present if k >= 0]
    if -1 in present:
        entries.append(("unlabelled", UNLABELLED))
    rows = (PLOT - 20) // 16
    if len(entries) > rows:
        entries = entries[:rows - 1] + [(f"... and {len(entries) - rows + 1} more", None)]
    small = font(11)
    for r, (name, colour) in enumerate(entries):
        y = TOP + 10 + 16 * r
        if colour is not None:
            draw.rectangle([PLOT + 12, y + 2, PLOT + 22, y + 12], fill=colour)
        draw.text((PLOT + 28, y), name if len(name) <= 30 else name[:27] + "...", fill=TEXT, font=small)
