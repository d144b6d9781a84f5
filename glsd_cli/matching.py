"""Which teacher token each student token learns from: the comparison the GLSD paper is about.

For every student view s (globals first, then locals) and every global teacher view t != s, each of
s's patch tokens is paired with one token of t:
- geometric (GLSD, Lebailly & Tuytelaars 2023): the teacher token whose centre is nearest in the
  ORIGINAL image, dropped by the hinge when farther than a cell's half-diagonal (geometry.py holds the
  pure per-pair function and its brute-force reference; docs/algorithms.md §2);
- similarity (EsViT, Li et al. 2022): the teacher token of highest cosine similarity between backbone
  output tokens, never dropped.
Both produce one `TokenMatches` table for the whole step, built without a loop over images or pairs,
which the local loss (losses/local.py) only consumes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from glsd_cli.geometry import Grid, match_geometric

__all__ = ["TokenMatches", "geometric_matches", "similarity_matches", "match_similarity"]


@dataclass(frozen=True)
class TokenMatches:
    """The pairing of one step. Student tokens are those of all student views concatenated per image,
    view after view (``view_sizes`` tokens each, row-major within a view); teacher views are the first
    ``num_teachers`` (global) views.

    index: long (B, N, T) — the paired token of teacher view t, row-major within that view;
    valid: bool (B, N, T) — whether the pair counts: False for a view with itself (s == t, DINO's rule)
           and where the geometric hinge drops the pair.
    """

    index: Tensor
    valid: Tensor
    view_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        b, n, t = self.index.shape
        if self.valid.shape != (b, n, t) or sum(self.view_sizes) != n or len(self.view_sizes) < t:
            raise ValueError(f"index {tuple(self.index.shape)} / valid {tuple(self.valid.shape)} do not fit "
                             f"{len(self.view_sizes)} views of {self.view_sizes} tokens")

    @property
    def num_teachers(self) -> int:
        return self.index.shape[-1]

    @property
    def num_pairs(self) -> int:
        """(teacher t, student s != t) pairs: every student view with every global view but itself."""
        return self.num_teachers * (len(self.view_sizes) - 1)

    def token_weights(self) -> Tensor:
        """float32 (B, N, T): each pair's weight in the local loss, the mean over pairs, images and all
        N_s tokens of the pair's student view (a dropped token counts as zero, not as absent)."""
        batch = self.index.shape[0]
        per_token = torch.cat([torch.full((n,), 1.0 / (self.num_pairs * batch * n), device=self.index.device)
                               for n in self.view_sizes])
        return self.valid.float() * per_token[None, :, None]

    @classmethod
    def from_pairs(cls, pairs: dict[tuple[int, int], tuple[Tensor, Tensor | None]], view_sizes: Sequence[int],
                   num_teachers: int) -> "TokenMatches":
        """The table from per-pair results ``{(t, s): (index (B, N_s), valid (B, N_s) or None)}``; every
        pair (t, s != t) must be given. For tests and tools that match one pair at a time."""
        views = range(len(view_sizes))
        expected = {(t, s) for t in range(num_teachers) for s in views if s != t}
        if set(pairs) != expected:
            raise ValueError(f"pairs must be exactly {sorted(expected)}, got {sorted(pairs)}")
        index_cols, valid_cols = [], []
        for t in range(num_teachers):
            idx, ok = [], []
            for s in views:
                if s == t:
                    any_index = next(iter(pairs.values()))[0]
                    idx.append(any_index.new_zeros(any_index.shape[0], view_sizes[s]))
                    ok.append(torch.zeros_like(idx[-1], dtype=torch.bool))
                    continue
                index, valid = pairs[(t, s)]
                idx.append(index)
                ok.append(torch.ones_like(index, dtype=torch.bool) if valid is None else valid.bool())
            index_cols.append(torch.cat(idx, 1))
            valid_cols.append(torch.cat(ok, 1))
        return cls(torch.stack(index_cols, -1), torch.stack(valid_cols, -1), tuple(view_sizes))


def _not_self(view_sizes: Sequence[int], num_teachers: int, device: torch.device) -> Tensor:
    """bool (N, T): token n of view s may learn from teacher view t unless s == t. Filled on the device
    view by view (copying sizes from the host, or repeat_interleave, would wait for a GPU)."""
    view_of_token = torch.cat([torch.full((n,), v, device=device) for v, n in enumerate(view_sizes)])
    return view_of_token[:, None] != torch.arange(num_teachers, device=device)[None, :]


def _resolution_groups(grids: Sequence[Grid]) -> list[tuple[int, int, tuple[int, int]]]:
    """Runs of consecutive views with the same grid: (first view, end view, grid)."""
    groups: list[tuple[int, int, tuple[int, int]]] = []
    for v, grid in enumerate(grids):
        grid = (int(grid[0]), int(grid[1]))
        if groups and groups[-1][2] == grid:
            groups[-1] = (groups[-1][0], v + 1, grid)
        else:
            groups.append((v, v + 1, grid))
    return groups


@torch.no_grad()
def geometric_matches(boxes: Tensor, flips: Tensor, grids: Sequence[Grid], num_teachers: int,
                      hinge: bool = True) -> TokenMatches:
    """GLSD's matching for all pairs of a step. boxes (B, V, 4) = (top, left, height, width) in
    original pixels, flips (B, V), ``grids[v]`` the token grid of view v (teachers: views 0..T-1).

    One call of the per-pair matcher per (teacher view, run of equally sized student views), with the
    views of a run stacked into its batch: 4 calls for 2 global and any number of local views."""
    batch, num_views = boxes.shape[:2]
    if flips.shape != (batch, num_views) or len(grids) != num_views:
        raise ValueError(f"boxes {tuple(boxes.shape)}, flips {tuple(flips.shape)} and {len(grids)} grids disagree")
    view_sizes = tuple(int(r) * int(c) for r, c in grids)
    index_cols, valid_cols = [], []
    for t in range(num_teachers):
        idx, ok = [], []
        for first, end, grid in _resolution_groups(grids):
            n = end - first
            index, valid = match_geometric(
                boxes[:, first:end].reshape(-1, 4), flips[:, first:end].reshape(-1), grid,
                boxes[:, t].repeat_interleave(n, 0), flips[:, t].repeat_interleave(n, 0), grids[t], hinge=hinge)
            idx.append(index.reshape(batch, -1))
            ok.append(valid.reshape(batch, -1))
        index_cols.append(torch.cat(idx, 1))
        valid_cols.append(torch.cat(ok, 1))
    valid = torch.stack(valid_cols, -1) & _not_self(view_sizes, num_teachers, boxes.device)
    return TokenMatches(torch.stack(index_cols, -1), valid, view_sizes)


def _cosine_similarities(student_tokens: Tensor, teacher_tokens: Tensor) -> Tensor:
    """(B, Ns, D), (B, Nt, D) -> (B, Ns, Nt) cosine similarities, in float32 even under autocast: the
    argmax over them should not depend on bf16 rounding."""
    if student_tokens.ndim != 3 or teacher_tokens.ndim != 3 or student_tokens.shape[0] != teacher_tokens.shape[0] \
            or student_tokens.shape[-1] != teacher_tokens.shape[-1]:
        raise ValueError(f"expected (B, Ns, D) and (B, Nt, D), got {tuple(student_tokens.shape)} and "
                         f"{tuple(teacher_tokens.shape)}")
    with torch.autocast(student_tokens.device.type, enabled=False):
        s = F.normalize(student_tokens.float(), dim=-1)
        t = F.normalize(teacher_tokens.float(), dim=-1)
        return torch.bmm(s, t.transpose(1, 2))


@torch.no_grad()
def match_similarity(student_tokens: Tensor, teacher_tokens: Tensor) -> Tensor:
    """EsViT region matching (docs/algorithms.md §2) for one pair: for each student token, the teacher
    token of highest cosine similarity between L2-normalised backbone output tokens. No hinge.

    ``(B, Ns, D)``, ``(B, Nt, D)`` -> long ``(B, Ns)``; ties go to the lower teacher index
    (``argmax`` returns the first maximum).
    """
    return _cosine_similarities(student_tokens, teacher_tokens).argmax(dim=-1)


@torch.no_grad()
def similarity_matches(student_tokens: Tensor, teacher_tokens: Tensor, view_sizes: Sequence[int],
                       num_teachers: int) -> TokenMatches:
    """EsViT's matching for all pairs of a step: student_tokens (B, N, D) of all student views,
    teacher_tokens (B, T·Nt, D) of the T teacher views; one similarity product for everything, then the
    best token within each teacher view."""
    batch, n = student_tokens.shape[:2]
    per_teacher = teacher_tokens.shape[1] // num_teachers
    if per_teacher * num_teachers != teacher_tokens.shape[1] or sum(view_sizes) != n:
        raise ValueError(f"teacher tokens {tuple(teacher_tokens.shape)} are not {num_teachers} equal views, or "
                         f"student tokens {tuple(student_tokens.shape)} are not views of {tuple(view_sizes)}")
    similarities = _cosine_similarities(student_tokens, teacher_tokens)
    index = similarities.view(batch, n, num_teachers, per_teacher).argmax(dim=-1)
    valid = _not_self(view_sizes, num_teachers, student_tokens.device).expand(batch, -1, -1)
    return TokenMatches(index, valid, tuple(view_sizes))
