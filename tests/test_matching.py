"""The step-level matching tables (glsd_cli/matching.py) against the per-pair matchers they batch."""
from __future__ import annotations

import pytest
import torch

from glsd_cli.geometry import match_geometric
from glsd_cli.matching import TokenMatches, geometric_matches, match_similarity, similarity_matches

B = 3
GRIDS = [(4, 4), (4, 4), (2, 2), (2, 2), (2, 2)]  # 2 globals, 3 locals
SIZES = [r * c for r, c in GRIDS]


def _views(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sides = torch.tensor([60, 60, 20, 20, 20])
    corner = torch.randint(0, 50, (B, 5, 2), generator=g)
    size = sides[None, :, None].expand(B, 5, 2) + torch.randint(0, 10, (B, 5, 2), generator=g)
    return torch.cat((corner, size), -1).float(), torch.rand(B, 5, generator=g) < 0.5


@pytest.mark.parametrize("hinge", [True, False])
def test_geometric_table_equals_every_pair_matched_alone(hinge):
    boxes, flips = _views(0)
    table = geometric_matches(boxes, flips, GRIDS, 2, hinge=hinge)
    assert table.index.shape == (B, sum(SIZES), 2) and table.num_pairs == 2 * 4
    starts = [sum(SIZES[:v]) for v in range(5)]
    for t in range(2):
        for s in range(5):
            rows = slice(starts[s], starts[s] + SIZES[s])
            if s == t:  # a view is not its own target
                assert not table.valid[:, rows, t].any()
                continue
            index, valid = match_geometric(boxes[:, s], flips[:, s], GRIDS[s], boxes[:, t], flips[:, t], GRIDS[t],
                                           hinge=hinge)
            assert torch.equal(table.index[:, rows, t], index) and torch.equal(table.valid[:, rows, t], valid)
    if hinge:
        assert 0 < table.valid.float().mean() < 1  # the fixture exercises the hinge


def test_similarity_table_equals_every_pair_matched_alone():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(B, sum(SIZES), 6, generator=g), torch.randn(B, 2 * 16, 6, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the argmax is taken in float32 all the same
        table = similarity_matches(student, teacher, SIZES, 2)
    for t in range(2):
        want = match_similarity(student, teacher[:, 16 * t:16 * (t + 1)])
        assert torch.equal(table.index[..., t], want)
    starts = [sum(SIZES[:v]) for v in range(5)]
    for s in range(5):
        rows = slice(starts[s], starts[s] + SIZES[s])
        assert table.valid[:, rows].tolist() == [[[s != 0, s != 1]] * SIZES[s]] * B


def test_token_weights_make_the_mean_over_pairs_images_and_tokens():
    table = geometric_matches(*_views(2), GRIDS, 2, hinge=False)
    w = table.token_weights()
    # Without the hinge every pair's tokens weigh 1 / (pairs * B * N_s) and all weights sum to 1.
    assert w.sum().item() == pytest.approx(1.0)
    assert w[0, 0, 1].item() == pytest.approx(1 / (8 * B * 16)) and w[0, -1, 0].item() == pytest.approx(1 / (8 * B * 4))
    assert w[0, 0, 0] == 0  # global view 0 with itself


def test_from_pairs_needs_every_pair_and_shapes_that_fit():
    index = torch.zeros(B, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="pairs must be exactly"):
        TokenMatches.from_pairs({(0, 1): (index, None)}, [4, 4, 4], 2)
    with pytest.raises(ValueError, match="do not fit"):
        TokenMatches(torch.zeros(B, 5, 2, dtype=torch.long), torch.ones(B, 5, 2, dtype=torch.bool), (4, 4))
