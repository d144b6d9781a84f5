"""The demo's promise (issue 2): pre-training the default preset on the built-in data lifts the k-NN
accuracy of its backbone well above the same network at random initialisation."""
import json

import pytest

from tests.cli_helpers import run_cli


@pytest.mark.slow
def test_default_preset_beats_its_random_init_by_ten_knn_points(tmp_path, capsys):
    # Two of the demo's five epochs (about a minute on 2 cores): the epoch-2 k-NN of the full demo
    # read 69.9 against 30.3 at random init (2026-11-22, lr 5e-3); the full demo gives 79.7. The margin
    # asked for is the README's promise, +10.
    code, _, err = run_cli(["pretrain", "--name", "demo", "--out", str(tmp_path), "--epochs", "2", "-q",
                            "--set", "run.knn_monitor=false"], capsys)
    assert code == 0, err
    results = {}
    for extra in ([], ["--random-init"]):
        code, out, err = run_cli(["knn-eval", str(tmp_path / "demo"), "--k", "20", *extra], capsys)
        assert code == 0, err
        results["random" if extra else "trained"] = json.loads(out.strip().splitlines()[-1])["top1"]
    assert results["trained"] >= results["random"] + 10, results
