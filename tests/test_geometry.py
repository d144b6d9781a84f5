"""Token centres and geometric matching (docs/algorithms.md §1–2), checked against hand-computed cases
and against the all-pairs brute force."""
from __future__ import annotations

import pytest
import torch

from glsd_cli.geometry import match_geometric, match_geometric_bruteforce, token_centres


def _t(*boxes: tuple[float, float, float, float]) -> torch.Tensor:
    return torch.tensor(boxes, dtype=torch.float64)


def _grid_of(index: torch.Tensor, rows: int, cols: int) -> list[list[int]]:
    return index.reshape(rows, cols).tolist()


# --------------------------------------------------------------------------- token_centres


def test_token_centres_hand_values() -> None:
    # box top=10, left=20, height=30, width=40, grid 3x2: cell 10 high, 20 wide.
    c = token_centres(_t((10, 20, 30, 40)), torch.tensor([False]), (3, 2))
    assert c.shape == (1, 6, 2)
    expected = [[15, 30], [15, 50], [25, 30], [25, 50], [35, 30], [35, 50]]
    assert c[0].tolist() == expected
    # flipped: columns mirror inside the crop, rows unchanged
    cf = token_centres(_t((10, 20, 30, 40)), torch.tensor([True]), (3, 2))
    assert cf[0].tolist() == [[15, 50], [15, 30], [25, 50], [25, 30], [35, 50], [35, 30]]


def test_token_centres_int_boxes_and_batch() -> None:
    c = token_centres(torch.tensor([[0, 0, 224, 224], [32, 48, 96, 96]]), [False, True], (14, 14))
    assert c.dtype == torch.float64 and c.shape == (2, 196, 2)
    assert c[0, 0].tolist() == [8, 8] and c[0, 195].tolist() == [216, 216]
    assert c[1, 0].tolist() == pytest.approx([32 + 96 / 28, 48 + 96 - 96 / 28], abs=1e-12)


# --------------------------------------------------------------------------- hand-computed matches


def test_identical_crops_identity_all_valid() -> None:
    box = _t((10, 20, 160, 160))
    idx, valid = match_geometric(box, [False], (4, 4), box, [False], (4, 4))
    assert idx[0].tolist() == list(range(16)) and bool(valid.all())


@pytest.mark.parametrize("s_flip,t_flip", [(True, False), (False, True)])
def test_one_view_flipped_mirrors_columns(s_flip: bool, t_flip: bool) -> None:
    box = _t((0, 0, 120, 200))
    idx, valid = match_geometric(box, [s_flip], (3, 5), box, [t_flip], (3, 5))
    assert _grid_of(idx[0], 3, 5) == [[4, 3, 2, 1, 0], [9, 8, 7, 6, 5], [14, 13, 12, 11, 10]]
    assert bool(valid.all())


def test_both_flipped_identity() -> None:
    box = _t((5, 7, 90, 150))
    idx, valid = match_geometric(box, [True], (3, 5), box, [True], (3, 5))
    assert idx[0].tolist() == list(range(15)) and bool(valid.all())


def test_local_inside_global_hand_indices() -> None:
    # Teacher 224 px, 14x14: centres at 8 + 16k. Student (30, 50, 96, 96), 6x6, cell 16:
    # centres y = 38 + 16r, x = 58 + 16c -> teacher row (38+16r)/16 - 0.5 = r + 1.875 -> r + 2,
    # column (58+16c)/16 - 0.5 = c + 3.125 -> c + 3; d^2 = 2^2 + 2^2 = 8 < max(128, 128).
    teacher = _t((0, 0, 224, 224))
    idx, valid = match_geometric(_t((30, 50, 96, 96)), [False], (6, 6), teacher, [False], (14, 14))
    assert _grid_of(idx[0], 6, 6) == [
        [31, 32, 33, 34, 35, 36],
        [45, 46, 47, 48, 49, 50],
        [59, 60, 61, 62, 63, 64],
        [73, 74, 75, 76, 77, 78],
        [87, 88, 89, 90, 91, 92],
        [101, 102, 103, 104, 105, 106],
    ]
    assert bool(valid.all())
    # Same student, teacher flipped: column c_t = 13 - (c + 3) = 10 - c.
    idx, _ = match_geometric(_t((30, 50, 96, 96)), [False], (6, 6), teacher, [True], (14, 14))
    assert _grid_of(idx[0], 6, 6)[0] == [38, 37, 36, 35, 34, 33]
    assert _grid_of(idx[0], 6, 6)[5] == [108, 107, 106, 105, 104, 103]


def test_exact_ties_go_to_lower_flat_index() -> None:
    # Student (20, 40, 48, 48) 6x6, cell 8: y = 24 + 8r, x = 44 + 8c. Teacher 224/14, cell 16.
    # rows: (24+8r)/16 - 0.5 = 1 + r/2 -> 1, tie(1|2)->1, 2, tie(2|3)->2, 3, tie(3|4)->3.
    # cols: (44+8c)/16 - 0.5 = 2.25 + c/2 -> 2, 3, 3, 4, 4, 5 (no ties).
    teacher = _t((0, 0, 224, 224))
    idx, valid = match_geometric(_t((20, 40, 48, 48)), [False], (6, 6), teacher, [False], (14, 14))
    rows = [1, 1, 2, 2, 3, 3]
    cols = [2, 3, 3, 4, 4, 5]
    assert _grid_of(idx[0], 6, 6) == [[r * 14 + c for c in cols] for r in rows]
    assert bool(valid.all())
    # Transposed box: now the COLUMNS tie: x = 24 + 8c -> u = 1, tie(1|2), 2, tie(2|3), 3, tie(3|4).
    student = _t((40, 20, 48, 48))
    idx, _ = match_geometric(student, [False], (6, 6), teacher, [False], (14, 14))
    assert _grid_of(idx[0], 6, 6)[0] == [2 * 14 + u for u in [1, 1, 2, 2, 3, 3]]
    # Flipped teacher: c = 13 - u, so the lower flat index is the HIGHER u at a tie.
    idx, _ = match_geometric(student, [False], (6, 6), teacher, [True], (14, 14))
    assert _grid_of(idx[0], 6, 6)[0] == [2 * 14 + c for c in [12, 11, 11, 10, 10, 9]]
    # Row tie and column tie at once (four equidistant teacher centres): lowest flat index.
    idx, _ = match_geometric(_t((8, 8, 16, 16)), [False], (1, 1), _t((0, 0, 32, 32)), [False], (2, 2))
    assert idx.tolist() == [[0]]
    idx, _ = match_geometric(_t((8, 8, 16, 16)), [False], (1, 1), _t((0, 0, 32, 32)), [True], (2, 2))
    assert idx.tolist() == [[0]]


def test_partly_outside_teacher_invalid() -> None:
    # Teacher (100, 100, 64, 64) 4x4: centres 108, 124, 140, 156. Student (136, 136, 64, 64) 4x4:
    # centres 144, 160, 176, 192 -> teacher rows/cols 2, 3, 3, 3 with offsets 4, 4, 20, 36.
    # D_t = D_s = 8^2 + 8^2 = 128: valid iff both offsets are 4 (d^2 = 32).
    idx, valid = match_geometric(_t((136, 136, 64, 64)), [False], (4, 4), _t((100, 100, 64, 64)), [False], (4, 4))
    assert _grid_of(idx[0], 4, 4) == [[10, 11, 11, 11], [14, 15, 15, 15], [14, 15, 15, 15], [14, 15, 15, 15]]
    assert _grid_of(valid[0].long(), 4, 4) == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert valid.float().mean() == 4 / 16
    _, no_hinge = match_geometric(_t((136, 136, 64, 64)), [False], (4, 4), _t((100, 100, 64, 64)), [False], (4, 4), hinge=False)
    assert bool(no_hinge.all())


def test_hinge_is_strict() -> None:
    # Student (140, 140, 64, 64): its top-left token is exactly 8 px off in y and x: d^2 = 128 = D.
    _, valid = match_geometric(_t((140, 140, 64, 64)), [False], (4, 4), _t((100, 100, 64, 64)), [False], (4, 4))
    assert not bool(valid.any())


def test_hinge_uses_larger_cell() -> None:
    # Small teacher cells (D_t = 2), large student cell (D_s = 50): the student's D decides.
    student, teacher = _t((0, 0, 10, 10)), _t((0, 0, 2, 2))  # student centre (5, 5); teacher 1x1 at (1, 1)
    _, valid = match_geometric(student, [False], (1, 1), teacher, [False], (1, 1))
    assert valid.tolist() == [[True]]  # d^2 = 32 < max(2, 50)
    _, valid = match_geometric(student, [False], (1, 1), _t((0, 0, 2, 2)), [False], (2, 2))
    assert valid.tolist() == [[True]]  # nearest centre (1.5, 1.5): d^2 = 24.5 < 50


def test_non_square_grids() -> None:
    box = _t((0, 0, 30, 50))
    # teacher 3x5 (cells 10x10, centres y 5,15,25; x 5..45), student 4x2 (y 3.75, 11.25, 18.75,
    # 26.25; x 12.5, 37.5): rows 0,1,1,2; cols 1,3.
    idx, valid = match_geometric(box, [False], (4, 2), box, [False], (3, 5))
    assert _grid_of(idx[0], 4, 2) == [[1, 3], [6, 8], [6, 8], [11, 13]]
    assert bool(valid.all())
    # reverse: teacher 4x2, student 3x5. rows: y/7.5 - 0.5 = 0.17, 1.5 (tie -> 1), 2.83 -> 0, 1, 3;
    # cols: x/25 - 0.5 = -0.3, 0.1, 0.5 (tie -> 0), 0.9, 1.3 -> 0, 0, 0, 1, 1.
    idx, _ = match_geometric(box, [False], (3, 5), box, [False], (4, 2))
    assert _grid_of(idx[0], 3, 5) == [[0, 0, 0, 1, 1], [2, 2, 2, 3, 3], [6, 6, 6, 7, 7]]
    # flipped teacher: c = 1 - u, the column tie at x = 25 now goes to u = 1 (c = 0).
    idx, _ = match_geometric(box, [False], (3, 5), box, [True], (4, 2))
    assert _grid_of(idx[0], 3, 5) == [[1, 1, 0, 0, 0], [3, 3, 2, 2, 2], [7, 7, 6, 6, 6]]


def test_degenerate_boxes_are_finite_and_agree_with_bruteforce() -> None:
    student = _t((10, 10, 5, 5), (0, 0, 0, 0), (3, 3, 1e-300, 1e-300), (50, 50, 20, 20), (1, 2, 3, 4))
    teacher = _t((10, 10, 0, 0), (0, 0, 1e-300, 1e-300), (0, 0, 100, 100), (50, 50, 1e-12, 20), (0, 0, 0, 7))
    for s_flip, t_flip in [([False] * 5, [False] * 5), ([True] * 5, [True, False, True, False, True])]:
        idx, valid = match_geometric(student, s_flip, (2, 3), teacher, t_flip, (3, 4))
        ref_idx, ref_valid = match_geometric_bruteforce(student, s_flip, (2, 3), teacher, t_flip, (3, 4))
        assert ((idx >= 0) & (idx < 12)).all()
        assert torch.equal(idx, ref_idx) and torch.equal(valid, ref_valid)
    # A zero-size teacher has all centres at one point: every token ties, index 0, and D_t = 0.
    assert idx[0].tolist() == [0] * 6


# --------------------------------------------------------------------------- brute-force agreement


def _random_boxes(gen: torch.Generator, n: int, dyadic_cells: tuple[int, int] | None = None) -> torch.Tensor:
    top = torch.randint(0, 400, (n,), generator=gen).double()
    left = torch.randint(0, 400, (n,), generator=gen).double()
    if dyadic_cells is None:  # continuous sizes, some of them tiny
        h = torch.rand(n, generator=gen, dtype=torch.float64) * 300 + 0.5
        w = torch.rand(n, generator=gen, dtype=torch.float64) * 300 + 0.5
        top, left = top + torch.rand(n, generator=gen, dtype=torch.float64), left + torch.rand(n, generator=gen, dtype=torch.float64)
    else:  # cells of k/2 px on a coarse lattice: every centre and squared distance is exact and
        # exact ties are frequent
        rows, cols = dyadic_cells
        top, left = top % 40, left % 40
        h = torch.randint(1, 40, (n,), generator=gen).double() / 2 * rows
        w = torch.randint(1, 40, (n,), generator=gen).double() / 2 * cols
    return torch.stack((top, left, h, w), dim=-1)


GRIDS = [(14, 14), (6, 6), (3, 5), (4, 2), (1, 1), (1, 7), (7, 1), (2, 3)]


def test_agrees_with_bruteforce_random() -> None:
    gen = torch.Generator().manual_seed(0)
    n_compared = 0
    for i, (s_grid, t_grid) in enumerate([(s, t) for s in GRIDS for t in GRIDS]):
        n = 64
        sb, tb = _random_boxes(gen, n), _random_boxes(gen, n)
        sf = torch.rand(n, generator=gen) < 0.5
        tf = torch.rand(n, generator=gen) < 0.5
        idx, valid = match_geometric(sb, sf, s_grid, tb, tf, t_grid)
        ref_idx, ref_valid = match_geometric_bruteforce(sb, sf, s_grid, tb, tf, t_grid)
        assert torch.equal(valid, ref_valid)
        # Index must agree unless the two best distances are tied within 1e-4 (then both are nearest).
        s = token_centres(sb, sf, s_grid)
        t = token_centres(tb, tf, t_grid)
        d2 = ((s[:, :, None] - t[:, None]) ** 2).sum(-1)
        best = d2.min(-1).values
        tied = (d2 <= best[..., None] + 1e-4).sum(-1) > 1
        assert torch.equal(idx[~tied], ref_idx[~tied])
        chosen = d2.gather(-1, idx[..., None])[..., 0]
        assert torch.allclose(chosen, best, rtol=0, atol=1e-4)
        n_compared += int((~tied).sum())
    assert n_compared > 100_000


def test_agrees_with_bruteforce_exact_ties() -> None:
    # Integer offsets and dyadic cells make ties frequent and exact: full index agreement required.
    gen = torch.Generator().manual_seed(1)
    n_ties = 0
    for s_grid, t_grid in [(s, t) for s in GRIDS[:5] for t in GRIDS[:5]]:
        n = 48
        sb, tb = _random_boxes(gen, n, s_grid), _random_boxes(gen, n, t_grid)
        sf = torch.rand(n, generator=gen) < 0.5
        tf = torch.rand(n, generator=gen) < 0.5
        for hinge in (True, False):
            idx, valid = match_geometric(sb, sf, s_grid, tb, tf, t_grid, hinge=hinge)
            ref_idx, ref_valid = match_geometric_bruteforce(sb, sf, s_grid, tb, tf, t_grid, hinge=hinge)
            assert torch.equal(idx, ref_idx) and torch.equal(valid, ref_valid)
        s, t = token_centres(sb, sf, s_grid), token_centres(tb, tf, t_grid)
        d2 = ((s[:, :, None] - t[:, None]) ** 2).sum(-1)
        n_ties += int(((d2 == d2.min(-1, keepdim=True).values).sum(-1) > 1).sum())
    assert n_ties > 500  # the test really exercises ties


def test_float32_boxes_and_large_grids_without_pairwise_matrix() -> None:
    # 200x200 grids: an all-pairs matrix would need 2 * 40000^2 * 2 doubles (~50 GB); the separable
    # matcher needs O(tokens).
    sb = torch.tensor([[0.0, 0.0, 600.0, 600.0], [10.0, 20.0, 300.0, 450.0]], dtype=torch.float32)
    idx, valid = match_geometric(sb, [False, True], (200, 200), sb, [False, False], (200, 200))
    assert idx.shape == (2, 40000)
    assert torch.equal(idx[0], torch.arange(40000))
    assert torch.equal(idx[1].view(200, 200), torch.arange(40000).view(200, 200).flip(-1))
    assert bool(valid.all())


def test_input_validation() -> None:
    with pytest.raises(ValueError):
        match_geometric(torch.zeros(2, 3), [False] * 2, (2, 2), torch.zeros(2, 4), [False] * 2, (2, 2))
    with pytest.raises(ValueError):
        match_geometric(torch.ones(2, 4), [False], (2, 2), torch.ones(2, 4), [False] * 2, (2, 2))
    with pytest.raises(ValueError):
        token_centres(torch.ones(1, 4), [False], (0, 2))
