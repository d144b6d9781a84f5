"""Geometry of multi-crop views: token centres and geometric token matching (docs/algorithms.md §1–2).

Every view carries ``box = (top, left, height, width)`` in pixels of the ORIGINAL image (the order
of torchvision's ``RandomResizedCrop.get_params``) and ``flipped`` (horizontal flip applied after
crop and resize). A view with an ``R x C`` token grid flattens its tokens row-major,
``flat = r * C + c``.

All functions are pure tensor code, batched over images, and work on any device. Internally they
compute in float64: original-image coordinates reach thousands of pixels, where float32 would
already lose ~1e-4 px and turn exact ties (common with integer crop boxes) into arbitrary choices.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "token_centres",
    "match_geometric",
    "match_geometric_bruteforce",
]

Grid = Sequence[int]  # (rows R, columns C)


def _boxes(boxes: Tensor | Sequence, device: torch.device | None = None) -> Tensor:
    b = torch.as_tensor(boxes, device=device)
    if b.ndim != 2 or b.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (B, 4) = (top, left, height, width), got {tuple(b.shape)}")
    return b if b.is_floating_point() else b.to(torch.float64)


def _flips(flips: Tensor | Sequence, batch: int, device: torch.device) -> Tensor:
    f = torch.as_tensor(flips, device=device).to(torch.bool).reshape(-1)
    if f.numel() != batch:
        raise ValueError(f"flips must have one entry per box ({batch}), got {f.numel()}")
    return f


def _grid(grid: Grid) -> tuple[int, int]:
    r, c = (int(g) for g in grid)
    if r < 1 or c < 1:
        raise ValueError(f"grid must be (R, C) with R, C >= 1, got {tuple(grid)}")
    return r, c


def _axis_centre(start: Tensor, size: Tensor, n: int, k: Tensor) -> Tensor:
    """Centre of cell ``k`` of ``n`` along one axis: ``start + (k + 0.5) * size / n`` (§1).

    The single place this formula is evaluated, so the fast matcher and the brute force produce
    bit-identical centres and therefore bit-identical distances and hinge decisions.
    """
    return start + (k + 0.5) * size / n


def token_centres(boxes: Tensor, flips: Tensor, grid: Grid) -> Tensor:
    """Centres ``(y, x)`` in original-image pixels of every token, row-major: ``(B, R*C, 2)``.

    docs/algorithms.md §1: ``u = C-1-c`` if flipped else ``c``; ``y = top + (r+0.5)*height/R``;
    ``x = left + (u+0.5)*width/C``. Integer boxes are promoted to float64; float boxes keep
    their dtype.
    """
    b = _boxes(boxes)
    f = _flips(flips, b.shape[0], b.device)
    rows, cols = _grid(grid)
    flat = torch.arange(rows * cols, device=b.device)
    r = (flat // cols).to(b.dtype)[None, :]
    c = (flat % cols)[None, :]
    u = torch.where(f[:, None], cols - 1 - c, c).to(b.dtype)  # the flip mirrors inside the crop
    top, left, height, width = (t[:, None] for t in b.unbind(-1))
    y = _axis_centre(top, height, rows, r).expand(-1, rows * cols)
    x = _axis_centre(left, width, cols, u)
    return torch.stack((y, x), dim=-1)


def _half_diag_sq(b: Tensor, grid: tuple[int, int]) -> Tensor:
    """``D = (cell_w/2)^2 + (cell_h/2)^2`` per box: squared half-diagonal of one token cell (§2)."""
    rows, cols = grid
    return (b[:, 3] / cols / 2) ** 2 + (b[:, 2] / rows / 2) ** 2


def reading_is_free(device: torch.device) -> bool:
    """Whether reading a tensor's value on the host costs nothing (the CPU), or waits for the device."""
    return device.type == "cpu"


def _nearest_cell(pos: Tensor, start: Tensor, size: Tensor, n: int, prefer_high: Tensor) -> Tensor:
    """Index of the cell centre nearest to ``pos`` along one axis, O(1) per point.

    ``round((pos - start) * n / size - 0.5)`` clamped to ``[0, n-1]`` (§2), but the rounding is done
    by comparing the squared distances to the two bracketing centres, so that (a) an exact tie is
    resolved by ``prefer_high`` instead of by torch.round's half-to-even, and (b) the choice agrees
    bit-for-bit with an all-pairs argmin over the same distances.
    """
    scale = torch.where(size > 0, n / size.clamp_min(torch.finfo(size.dtype).tiny), torch.zeros_like(size))
    f = (pos - start) * scale - 0.5
    # Huge or non-finite positions (tiny boxes) only need to land beyond the grid before floor().
    f = torch.nan_to_num(f, nan=0.0, posinf=float(n), neginf=-1.0).clamp(-1.0, float(n))
    k0 = f.floor().long().clamp(0, n - 1)
    k1 = (k0 + 1).clamp(max=n - 1)
    d0, d1 = _sq_dist(pos, start, size, n, k0), _sq_dist(pos, start, size, n, k1)
    take_high = (d1 < d0) | ((d1 == d0) & prefer_high)
    best = torch.where(take_high, k1, k0)
    dmin = torch.minimum(d0, d1)
    # A tie beyond the bracket needs degenerate geometry. On the CPU one check (a host read, which
    # costs nothing there) spares the ~log2(n) rounds of the search below; on an accelerator that
    # read would stall the training step, so the search always runs (a no-op without such a tie).
    if reading_is_free(pos.device):
        beyond = torch.where(prefer_high, best + 1, best - 1).clamp(0, n - 1)
        if not bool(((beyond != best) & (_sq_dist(pos, start, size, n, beyond) == dmin)).any()):
            return best
    return _tie_end(pos, start, size, n, best, dmin, prefer_high)


def _sq_dist(pos: Tensor, start: Tensor, size: Tensor, n: int, k: Tensor) -> Tensor:
    return (pos - _axis_centre(start, size, n, k.to(pos.dtype))) ** 2


def _tie_end(pos: Tensor, start: Tensor, size: Tensor, n: int, best: Tensor, dmin: Tensor, prefer_high: Tensor) -> Tensor:
    """Move ``best`` to the low (or, where ``prefer_high``, the high) end of its run of exact ties.

    Normally a tie involves only the two bracketing cells and this is a no-op. Degenerate boxes
    (size 0, or cells below float resolution) make many centres, or many distances, collapse onto
    one value. Along an axis the float distance is non-increasing then non-decreasing in k (every
    float op used is monotone), so the tied cells form one contiguous run: binary search its end.
    """
    lo = torch.where(prefer_high, best, torch.zeros_like(best))
    hi = torch.where(prefer_high, torch.full_like(best, n - 1), best)
    for _ in range(max(n - 1, 1).bit_length() + 1):
        # prefer low: smallest k in [lo, hi] that ties; prefer high: largest k in [lo, hi] that ties.
        mid = torch.where(prefer_high, (lo + hi + 1) // 2, (lo + hi) // 2)
        tie = _sq_dist(pos, start, size, n, mid) == dmin
        lo = torch.where(prefer_high, torch.where(tie, mid, lo), torch.where(tie, lo, mid + 1)).minimum(hi)
        hi = torch.where(prefer_high, torch.where(tie, hi, mid - 1), torch.where(tie, mid, hi)).maximum(lo)
    return torch.where(prefer_high, hi, lo)


def _prepare(student_boxes: Tensor, student_flips: Tensor, teacher_boxes: Tensor,
             teacher_flips: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    sb = _boxes(student_boxes).to(torch.float64)
    tb = _boxes(teacher_boxes, device=sb.device).to(torch.float64)
    if sb.shape[0] != tb.shape[0]:
        raise ValueError(f"student and teacher batch sizes differ: {sb.shape[0]} vs {tb.shape[0]}")
    sf = _flips(student_flips, sb.shape[0], sb.device)
    tf = _flips(teacher_flips, tb.shape[0], sb.device)
    return sb, sf, tb, tf


def match_geometric(
    student_boxes: Tensor,
    student_flips: Tensor,
    student_grid: Grid,
    teacher_boxes: Tensor,
    teacher_flips: Tensor,
    teacher_grid: Grid,
    hinge: bool = True,
) -> tuple[Tensor, Tensor]:
    """Nearest teacher token for every student token (GLSD geometric matching, docs/algorithms.md §2).

    Returns ``index`` long ``(B, Rs*Cs)``: row-major flat index into the teacher view's own
    (post-flip) token order; and ``valid`` bool ``(B, Rs*Cs)``: the hinge ``d^2 < max(D_t, D_s)``
    (strict), all True when ``hinge=False``. Exact ties go to the lower teacher flat index.

    Separable and O(tokens): teacher centres form an axis-aligned grid, so the nearest centre is the
    nearest row times the nearest column; no (Ns, Nt) distance matrix is built.
    """
    sb, sf, tb, tf = _prepare(student_boxes, student_flips, teacher_boxes, teacher_flips)
    s_grid, t_grid = _grid(student_grid), _grid(teacher_grid)
    rows_t, cols_t = t_grid
    centres = token_centres(sb, sf, s_grid)
    ys, xs = centres[..., 0], centres[..., 1]
    top, left, height, width = (t[:, None] for t in tb.unbind(-1))

    # flat = r * C + c: among tied rows the lower r always gives the lower flat index ...
    row = _nearest_cell(ys, top, height, rows_t, prefer_high=torch.zeros_like(ys, dtype=torch.bool))
    # ... and among tied columns the lower c, which for a flipped teacher is the HIGHER u.
    u = _nearest_cell(xs, left, width, cols_t, prefer_high=tf[:, None].expand_as(xs))
    col = torch.where(tf[:, None], cols_t - 1 - u, u)
    index = row * cols_t + col

    if not hinge:
        return index, torch.ones_like(index, dtype=torch.bool)
    # Distance to the chosen centre, evaluated exactly as token_centres does (bit-identical).
    yt = _axis_centre(top, height, rows_t, row.to(ys.dtype))
    xt = _axis_centre(left, width, cols_t, u.to(xs.dtype))
    d2 = (ys - yt) ** 2 + (xs - xt) ** 2
    limit = torch.maximum(_half_diag_sq(tb, t_grid), _half_diag_sq(sb, s_grid))
    return index, d2 < limit[:, None]


def match_geometric_bruteforce(
    student_boxes: Tensor,
    student_flips: Tensor,
    student_grid: Grid,
    teacher_boxes: Tensor,
    teacher_flips: Tensor,
    teacher_grid: Grid,
    hinge: bool = True,
) -> tuple[Tensor, Tensor]:
    """Reference for :func:`match_geometric`: all-pairs distances, O(Ns * Nt) memory and time.

    For tests and visualisation only. Ties go to the lower flat index because ``argmin`` returns
    the first minimum.
    """
    sb, sf, tb, tf = _prepare(student_boxes, student_flips, teacher_boxes, teacher_flips)
    s_grid, t_grid = _grid(student_grid), _grid(teacher_grid)
    s = token_centres(sb, sf, s_grid)  # (B, Ns, 2)
    t = token_centres(tb, tf, t_grid)  # (B, Nt, 2)
    d2 = ((s[:, :, None, :] - t[:, None, :, :]) ** 2).sum(-1)  # (B, Ns, Nt)
    index = d2.argmin(dim=-1)  # documented to return the first minimum
    d2_min = d2.gather(-1, index[..., None])[..., 0]
    if not hinge:
        return index, torch.ones_like(index, dtype=torch.bool)
    limit = torch.maximum(_half_diag_sq(tb, t_grid), _half_diag_sq(sb, s_grid))
    return index, d2_min < limit[:, None]

