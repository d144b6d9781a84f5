"""The three arms of the paper's comparison train end to end through the CLI (tiny presets)."""
import csv
import json

import pytest

from tests.cli_helpers import run_cli
from tests.conftest import TINY_OVERRIDES


@pytest.mark.slow
@pytest.mark.parametrize("preset,local", [("tiny-dino", False), ("tiny-geo", True), ("tiny-sim", True)])
def test_arm_trains_through_cli(preset, local, tmp_path, capsys):
    sets = []
    for item in TINY_OVERRIDES + ["run.epochs=1"]:
        sets += ["--set", item]
    code, _, err = run_cli(["pretrain", "--preset", preset, "--out", str(tmp_path), "--name", "r", "-q", *sets], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["method"]["local"]["matching"] == {"tiny-dino": "none", "tiny-geo": "geometric", "tiny-sim": "similarity"}[preset]
    steps = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 3
    for s in steps:
        assert s["loss"] > 0 and s["loss_global"] > 0
        if local:
            assert s["loss_local"] > 0
            koleo = config["method"]["loss"]["koleo_weight"] * s.get("loss_koleo", 0.0)  # the presets' KoLeo term
            assert s["loss"] == pytest.approx(0.5 * s["loss_global"] + 0.5 * s["loss_local"] + koleo, rel=1e-4)
            if preset == "tiny-geo":
                assert 0 < s["local_valid_fraction"] < 1  # local crops fall partly outside the other view
        else:
            assert "loss_local" not in s
    row = list(csv.DictReader(open(tmp_path / "r" / "results.csv")))[0]
    assert ("loss_local" in row) == local
