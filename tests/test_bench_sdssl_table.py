"""The per-block table of bench/sdssl_layers.py: means, sample stds and seed-paired differences against a
hand-computed example (the benchmark's runs themselves are far too slow for the test suite)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "sdssl_layers.py"
_spec = importlib.util.spec_from_file_location("sdssl_layers", _PATH)
sdssl_layers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sdssl_layers)

# seed -> per-block top-1 (blocks 1 and 2), as the benchmark collects them
BASELINE = {0: [60.0, 70.0], 1: [62.0, 71.0], 2: [64.0, 69.0]}
SD = {0: [61.0, 70.0], 1: [62.0, 73.0], 2: [66.0, 68.0]}


def test_paired_rows_match_a_hand_computation():
    block1, block2 = sdssl_layers.paired_rows(BASELINE, SD)
    # block 1: baseline 60, 62, 64; SD 61, 62, 66; differences 1, 0, 2 (a tie is not "higher")
    assert block1["block"] == 1 and block1["seeds"] == 3
    assert block1["reference_mean"] == pytest.approx(62.0) and block1["reference_std"] == pytest.approx(2.0)
    assert block1["other_mean"] == pytest.approx(63.0) and block1["other_std"] == pytest.approx(math.sqrt(7))
    assert block1["diff_mean"] == pytest.approx(1.0) and block1["diff_std"] == pytest.approx(1.0)
    assert block1["other_higher"] == 2
    # block 2: differences 0, +2, -1: mean 1/3, sample std sqrt(((-1/3)² + (5/3)² + (-4/3)²) / 2)
    assert block2["diff_mean"] == pytest.approx(1 / 3)
    assert block2["diff_std"] == pytest.approx(math.sqrt(42 / 18))
    assert block2["other_higher"] == 1
    # pairing, not the difference of means' spread: the paired std (1.0) is far below either arm's (2, √7)
    assert block1["diff_std"] < min(block1["reference_std"], block1["other_std"])


def test_one_seed_has_zero_spread_and_mismatched_seeds_are_refused():
    (row,) = sdssl_layers.paired_rows({3: [50.0]}, {3: [50.5]})
    assert (row["diff_mean"], row["diff_std"], row["reference_std"], row["other_higher"]) == (pytest.approx(0.5), 0.0, 0.0, 1)
    with pytest.raises(ValueError, match="different seeds"):
        sdssl_layers.paired_rows({0: [1.0], 1: [2.0]}, {0: [1.0], 2: [2.0]})


def test_method_table_prints_each_block_with_both_metrics():
    rows = sdssl_layers.paired_rows(BASELINE, SD)
    text = sdssl_layers.method_table(rows, rows)
    lines = text.strip().splitlines()
    assert len(lines) == 2 + 2  # header, rule, one line per block
    assert lines[2] == ("| 1 | 62.00 ± 2.00 | 63.00 ± 2.65 | +1.00 ± 1.00 (2/3) "
                        "| 62.00 ± 2.00 | 63.00 ± 2.65 | +1.00 ± 1.00 (2/3) |")
