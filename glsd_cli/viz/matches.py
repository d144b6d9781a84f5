"""Two sampled views of one image with lines between matched tokens (GLSD's idea made visible).

Coordinates. A view is a crop `box = (top, left, height, width)` of the original image, resized to
S x S and then maybe flipped horizontally. Its token (r, c) of an R x C grid covers view pixels
around ((r + 0.5) * S / R, (c + 0.5) * S / C) in the view as the network saw it (after the flip);
`view_to_original` takes view pixels back to the original image, where geometric matching measures
distances (glsd_cli.geometry). Matches index tokens in each view's own, post-flip, row-major order,
so a line joins view-pixel centres directly and no flip appears in the drawing code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from glsd_cli.data.multicrop import MultiCrop, sample_generator
from glsd_cli.geometry import match_geometric
from glsd_cli.matching import match_similarity
from glsd_cli.viz.drawing import BACKGROUND, TEXT, font, hue

PANEL = 320    # each view is drawn PANEL x PANEL px, whatever its size (local views are smaller)
GAP = 32       # between the two panels
TOP = 24       # caption band above the panels
BOTTOM = 20    # legend band below them
INVALID = (230, 20, 20)

__all__ = ["ViewPair", "Matches", "sample_views", "view_token_centres", "view_to_original", "original_to_view",
           "match_segments", "geometric_matches", "similarity_matches", "draw_matches", "canvas_size",
           "student_outline_in_teacher"]


@dataclass
class ViewPair:
    student: torch.Tensor        # normalised float (3, Ss, Ss), as the network sees it
    teacher: torch.Tensor        # normalised float (3, St, St)
    student_box: torch.Tensor    # (4,) (top, left, height, width) in original pixels
    student_flip: bool
    teacher_box: torch.Tensor
    teacher_flip: bool
    student_name: str
    teacher_name: str


@dataclass
class Matches:
    segments: torch.Tensor  # (Ns, 4) float64: (y_s, x_s) in student-view px -> (y_t, x_t) in teacher-view px
    valid: torch.Tensor     # (Ns,) bool: False where the hinge dropped the pair (geometric only)
    index: torch.Tensor     # (Ns,) long: matched teacher token, row-major in the teacher view


def sample_views(transform: MultiCrop, image: torch.Tensor, seed: int, student: str = "local") -> ViewPair:
    """The views the run's augmentation makes of `image` for sample (seed, epoch 0, index 0): the
    first global view as the teacher's, and the first local (or the second global) as the student's."""
    views, boxes, flips = transform(image, sample_generator(seed, 0, 0))
    has_local = transform.num_views > transform.num_global
    s = transform.num_global if student == "local" and has_local else 1
    s_name = "local view 1" if s >= transform.num_global else "global view 2"
    return ViewPair(views[s], views[0], boxes[s], bool(flips[s]), boxes[0], bool(flips[0]),
                    f"student: {s_name}", "teacher: global view 1")


def _hw(size: int | Sequence[int]) -> tuple[float, float]:
    if isinstance(size, int):
        return float(size), float(size)
    return float(size[0]), float(size[1])


def view_token_centres(grid: Sequence[int], size: int | Sequence[int]) -> torch.Tensor:
    """(R*C, 2) float64 (y, x) centres of the tokens in view pixels, row-major (flat = r * C + c)."""
    rows, cols = int(grid[0]), int(grid[1])
    height, width = _hw(size)
    flat = torch.arange(rows * cols)
    y = ((flat // cols).double() + 0.5) * height / rows
    x = ((flat % cols).double() + 0.5) * width / cols
    return torch.stack((y, x), dim=-1)


def view_to_original(points: torch.Tensor, box: torch.Tensor | Sequence[float], flip: bool,
                     size: int | Sequence[int]) -> torch.Tensor:
    """(N, 2) (y, x) view pixels -> original-image pixels, undoing the resize and the flip."""
    top, left, height, width = (float(v) for v in torch.as_tensor(box, dtype=torch.float64))
    sh, sw = _hw(size)
    y = points[:, 0].double()
    x = points[:, 1].double()
    x = sw - x if flip else x  # the flip mirrors the resized crop about its vertical centre line
    return torch.stack((top + y * height / sh, left + x * width / sw), dim=-1)


def original_to_view(points: torch.Tensor, box: torch.Tensor | Sequence[float], flip: bool,
                     size: int | Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`view_to_original` (points may fall outside the view)."""
    top, left, height, width = (float(v) for v in torch.as_tensor(box, dtype=torch.float64))
    sh, sw = _hw(size)
    y = (points[:, 0].double() - top) * sh / height
    x = (points[:, 1].double() - left) * sw / width
    return torch.stack((y, sw - x if flip else x), dim=-1)


def match_segments(index: torch.Tensor, valid: torch.Tensor | None, student_grid: Sequence[int],
                   student_size: int | Sequence[int], teacher_grid: Sequence[int],
                   teacher_size: int | Sequence[int]) -> Matches:
    """Line segments of one image's matches: student token i's centre -> teacher token index[i]'s
    centre, each in its own view's pixels. `index`, `valid`: (Ns,) as the matchers return per image."""
    index = index.reshape(-1).long().cpu()
    s = view_token_centres(student_grid, student_size)
    t = view_token_centres(teacher_grid, teacher_size)
    if index.numel() != s.shape[0]:
        raise ValueError(f"{index.numel()} matches for a {tuple(student_grid)} student grid")
    valid = torch.ones_like(index, dtype=torch.bool) if valid is None else valid.reshape(-1).bool().cpu()
    return Matches(torch.cat((s, t[index]), dim=-1), valid, index)


def geometric_matches(pair: ViewPair, student_grid: Sequence[int], teacher_grid: Sequence[int],
                      hinge: bool = True) -> Matches:
    """GLSD's geometric matching of the pair (match_geometric on a batch of one)."""
    index, valid = match_geometric(pair.student_box[None], torch.tensor([pair.student_flip]), student_grid,
                                   pair.teacher_box[None], torch.tensor([pair.teacher_flip]), teacher_grid,
                                   hinge=hinge)
    return match_segments(index[0], valid[0], student_grid, pair.student.shape[-2:],
                          teacher_grid, pair.teacher.shape[-2:])


def similarity_matches(pair: ViewPair, student_tokens: torch.Tensor, teacher_tokens: torch.Tensor,
                       student_grid: Sequence[int], teacher_grid: Sequence[int]) -> Matches:
    """EsViT's similarity matching of the pair: tokens (Ns, D) and (Nt, D) after the final norm."""
    index = match_similarity(student_tokens[None].float(), teacher_tokens[None].float())[0]
    return match_segments(index, None, student_grid, pair.student.shape[-2:], teacher_grid, pair.teacher.shape[-2:])


def canvas_size() -> tuple[int, int]:
    """(width, height) of every matches picture."""
    return 2 * PANEL + GAP, TOP + PANEL + BOTTOM


def _panel(rgb: np.ndarray) -> Image.Image:
    img = Image.fromarray(rgb)
    # Nearest for views much smaller than the panel keeps token-sized pixels honest; bicubic otherwise.
    resample = Image.NEAREST if img.width * 2 <= PANEL else Image.BICUBIC
    return img.resize((PANEL, PANEL), resample)


def draw_matches(student_rgb: np.ndarray, teacher_rgb: np.ndarray, matches: Matches, title: str,
                 student_outline: np.ndarray | None = None) -> Image.Image:
    """Student view (left) and teacher view (right); a coloured line per valid match, a red dot on each
    student token whose pair the hinge dropped. `student_outline`: (4, 2) (y, x) corners of the
    student crop in teacher-view pixels, drawn as a white frame (clipped to the teacher panel)."""
    s_scale = PANEL / student_rgb.shape[0]
    t_scale = PANEL / teacher_rgb.shape[0]
    teacher_panel = _panel(teacher_rgb)
    if student_outline is not None:
        corners = [(float(x) * t_scale, float(y) * t_scale) for y, x in student_outline]
        ImageDraw.Draw(teacher_panel).polygon(corners, outline=(255, 255, 255), width=2)
    canvas = Image.new("RGB", canvas_size(), BACKGROUND)
    canvas.paste(_panel(student_rgb), (0, TOP))
    canvas.paste(teacher_panel, (PANEL + GAP, TOP))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill=TEXT, font=font(13))
    n = matches.segments.shape[0]
    width = 2 if n <= 64 else 1
    radius = 4 if n <= 64 else 2
    for i, (ys, xs, yt, xt) in enumerate(matches.segments.tolist()):
        start = (xs * s_scale, TOP + ys * s_scale)
        if not bool(matches.valid[i]):
            _dot(draw, start, radius + 1, INVALID)
            continue
        end = (PANEL + GAP + xt * t_scale, TOP + yt * t_scale)
        colour = hue(i / max(n, 1))
        draw.line([start, end], fill=colour, width=width)
        _dot(draw, start, radius, colour)
        _dot(draw, end, radius, colour)
    legend = "line: student token -> matched teacher token"
    if not bool(matches.valid.all()):
        legend += f"    red dot: no valid match (hinge), {int((~matches.valid).sum())} of {n}"
    draw.text((4, TOP + PANEL + 4), legend, fill=TEXT, font=font(11))
    return canvas


def _dot(draw: ImageDraw.ImageDraw, centre: tuple[float, float], radius: int, colour: tuple[int, int, int]) -> None:
    x, y = centre
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline=(255, 255, 255))


def student_outline_in_teacher(pair: ViewPair) -> np.ndarray:
    """(4, 2) corners of the student crop in the teacher view's pixels (may lie outside it)."""
    top, left, height, width = (float(v) for v in pair.student_box)
    corners = torch.tensor([[top, left], [top, left + width], [top + height, left + width], [top + height, left]],
                           dtype=torch.float64)
    return original_to_view(corners, pair.teacher_box, pair.teacher_flip, pair.teacher.shape[-2:]).numpy()
