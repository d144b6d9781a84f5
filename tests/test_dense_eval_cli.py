"""`glsd dense-eval` and `glsd visualize segmentation` end to end, on the built-in scenes and tiny files in
the folder, Pascal VOC and ADE20K layouts (one tiny pre-trained run shared by the module)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glsd_cli.data.segmentation import IGNORE_INDEX
from tests.cli_helpers import run_cli
from tests.conftest import TINY_OVERRIDES
from tests.eval_run import copy_run, pretrained_run
from tests.test_segmentation_data import write_ade, write_mask_folder, write_voc

SCENES = "synthetic-scenes:train=24,val=5,size=16"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return pretrained_run(tmp_path_factory)  # 2 blocks, 16-px views of 4-px tokens: a 4x4 grid


def _dense(args: list[str], capsys) -> tuple[int, str, str]:
    return run_cli(["dense-eval", *args, "--epochs", "2", "--quiet"], capsys)


def test_dense_eval_on_the_built_in_scenes_writes_json_and_csv_and_reuses_features(run, tmp_path, capsys):
    mine = copy_run(run, tmp_path / "run")
    code, out, err = _dense([str(mine), "--train-data", SCENES], capsys)
    assert code == 0, err
    result = json.loads((mine / "dense.json").read_text())
    assert result["num_train"] == 24 and result["num_val"] == 5 and result["token_grid"] == 4
    assert [r["block"] for r in result["rows"]] == [2]
    knn, linear = result["knn"]["blocks"][0], result["linear"]["blocks"][0]
    assert knn["num_pixels"] == 5 * 16 * 16  # scenes have no ignored pixels
    for scores in (knn, linear):
        assert 0 <= scores["miou"] <= 100 and 0 <= scores["pixel_acc"] <= 100
    assert linear["lr"] in result["linear"]["lr_grid_per_256"] and "holdout" in result["linear"]["selection"]
    assert set(linear["holdout_miou_by_lr"]) == set(linear["val_by_lr"])
    assert json.loads(out.strip().splitlines()[-1]) == result["summary"]
    rows = list(csv.DictReader(open(mine / "dense.csv")))
    assert float(rows[0]["knn_miou"]) == pytest.approx(knn["miou"], abs=1e-4)
    assert result["feature_cache"]["misses"] == 2

    code, _, err = _dense([str(mine), "--train-data", SCENES], capsys)
    again = json.loads((mine / "dense.json").read_text())
    assert code == 0 and again["feature_cache"]["hits"] == 2 and again["rows"] == result["rows"]

    # Per block: the last block's patch tokens (through forward_intermediates) are the final ones.
    code, _, err = _dense([str(mine), "--train-data", SCENES, "--layers", "all"], capsys)
    layers = json.loads((mine / "dense-layers.json").read_text())
    assert code == 0 and [r["block"] for r in layers["rows"]] == [1, 2]
    assert layers["knn"]["blocks"][1]["miou"] == pytest.approx(knn["miou"])

    code, _, err = _dense([str(mine), "--train-data", SCENES, "--random-init"], capsys)
    assert code == 0 and json.loads((mine / "dense-random-init.json").read_text())["backbone"] == "random-init"

    # Fewer labelled images: a seeded, stratified half of them for the bank and the probe.
    code, _, err = _dense([str(mine), "--train-data", SCENES, "--train-fraction", "0.5"], capsys)
    half = json.loads((mine / "dense-train0.5.json").read_text())
    assert code == 0 and 8 <= half["num_train"] < 24 and half["num_val"] == 5 and half["subset_seed"] == 0


def test_mask_folder_with_ignored_pixels_and_a_single_evaluation_image(run, tmp_path, capsys):
    data = tmp_path / "seg"
    masks = write_mask_folder(data, n_train=6, n_val=1, classes=3, size=(16, 16))
    mine = copy_run(run, tmp_path / "run")
    code, _, err = _dense([str(mine), "--train-data", str(data)], capsys)
    assert code == 0, err
    result = json.loads((mine / "dense.json").read_text())
    assert result["num_val"] == 1 and result["classes"] == ["0", "1", "2"]
    labelled = int((masks[("val", "img0")] != IGNORE_INDEX).sum())  # masks at their own 16 px: no resizing
    assert labelled < 16 * 16
    assert result["knn"]["blocks"][0]["num_pixels"] == labelled
    assert result["linear"]["blocks"][0]["miou"] >= 0


def _halves(root: Path, n_train: int, n_val: int) -> None:
    """Images half dark (class 0) and half bright (class 1), split at a token boundary, a few noisy pixels."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            mask = np.zeros((16, 16), np.uint8)
            cut = 4 * int(rng.integers(1, 4))
            if i % 2:
                mask[:, cut:] = 1
            else:
                mask[cut:] = 1
            image = np.where(mask[..., None] == 1, 200, 40) + rng.integers(-20, 20, size=(16, 16, 3))
            for folder, array in (("images", image.clip(0, 255).astype(np.uint8)), ("masks", mask)):
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / split / folder / f"{i}.png")


def test_probe_and_knn_segment_what_even_random_features_separate(run, tmp_path, capsys):
    data = tmp_path / "halves"
    _halves(data, n_train=40, n_val=6)
    mine = copy_run(run, tmp_path / "run")
    code, _, err = run_cli(["dense-eval", str(mine), "--train-data", str(data), "--random-init", "--quiet",
                            "--epochs", "10", "-b", "8"], capsys)
    assert code == 0, err
    result = json.loads((mine / "dense-random-init.json").read_text())
    # Only pixels next to the cut can blend with the other side's token: nearly all are right.
    assert result["summary"]["knn_miou"] > 90 and result["summary"]["linear_miou"] > 90


def test_pascal_voc_and_ade20k_layouts(run, tmp_path, capsys):
    write_voc(tmp_path / "voc")
    write_ade(tmp_path / "ade")
    for uri, classes in ((f"voc:{tmp_path / 'voc'}", 21), (f"ade20k:{tmp_path / 'ade'}", 150)):
        mine = copy_run(run, tmp_path / uri.split(":")[0])
        code, _, err = _dense([str(mine), "--train-data", uri, "--holdout-fraction", "0"], capsys)
        assert code == 0, err
        result = json.loads((mine / "dense.json").read_text())
        assert len(result["classes"]) == classes and result["num_val"] == 1
        assert result["linear"]["selection"].startswith("none") and result["rows"][0]["linear_lr"] == 0.1


def test_user_errors_are_one_line_and_exit_2(run, tmp_path, capsys):
    mine = copy_run(run, tmp_path / "run")
    code, _, err = _dense([str(mine)], capsys)  # the run's own data has no masks
    assert code == 2 and "needs images with masks" in err and "Traceback" not in err
    data = tmp_path / "seg"
    write_mask_folder(data, n_train=1, n_val=1, classes=2, size=(16, 16))
    code, _, err = _dense([str(mine), "--train-data", str(data)], capsys)
    assert code == 2 and "--holdout-fraction 0" in err
    (data / "val" / "masks" / "img0.png").unlink()
    code, _, err = _dense([str(mine), "--train-data", str(data), "--holdout-fraction", "0"], capsys)
    assert code == 2 and "have no mask" in err
    code, _, err = _dense([str(mine), "--train-data", SCENES, "--k", "0"], capsys)
    assert code == 2 and "--k must be positive" in err
    assert not (mine / "dense.json").exists()


def test_visualize_segmentation_draws_knn_and_then_the_probe(run, tmp_path, capsys):
    mine = copy_run(run, tmp_path / "run")
    code, out, err = run_cli(["visualize", "segmentation", str(mine), "-o", str(tmp_path / "pics"),
                              "--train-data", SCENES, "-n", "3"], capsys)
    assert code == 0, err
    assert "no linear probe" in err
    first = Image.open(out.strip())
    assert _dense([str(mine), "--train-data", SCENES], capsys)[0] == 0
    code, out, err = run_cli(["visualize", "segmentation", str(mine), "-o", str(tmp_path / "pics"),
                              "--train-data", SCENES, "-n", "3"], capsys)
    assert code == 0 and "linear probe of" in err
    second = Image.open(out.strip())
    assert second.width > first.width  # one more column: the probe's


def test_pretraining_on_scenes_monitors_patch_knn_miou_as_dense_eval_measures_it(tmp_path, capsys):
    # Whole splits smaller than the monitor's subsets: the last epoch's monitor saw the same teacher,
    # bank and queries as dense-eval's k-NN afterwards, so the two must agree.
    sets = [a for item in TINY_OVERRIDES + [f'data.train="{SCENES}"', "run.epochs=1", "run.knn_monitor=true",
                                            "data.batch_size=8"] for a in ("--set", item)]
    code, _, err = run_cli(["pretrain", "--out", str(tmp_path), "--name", "scenes", "--quiet", *sets], capsys)
    assert code == 0, err
    row = list(csv.DictReader(open(tmp_path / "scenes" / "results.csv")))[-1]
    code, _, err = _dense([str(tmp_path / "scenes")], capsys)
    assert code == 0, err
    knn = json.loads((tmp_path / "scenes" / "dense.json").read_text())["knn"]["blocks"][0]
    assert float(row["patch_knn_miou"]) == pytest.approx(knn["miou"], abs=1e-3)


@pytest.mark.parametrize("command", ["dense-eval", "knn-eval", "linear-eval"])
def test_an_output_that_cannot_take_the_result_is_refused_before_any_work(command, run, tmp_path, capsys):
    """--output names the result JSON; a folder or another suffix once crashed dense-eval after its whole
    evaluation (the probes' run folder took the JSON's name)."""
    mine = copy_run(run, tmp_path / "run")
    before = sorted(p.name for p in mine.iterdir())
    folder = tmp_path / "results"
    folder.mkdir()
    for output, needle in ((folder, "is a folder"), (tmp_path / "result", "must end in .json")):
        code, out, err = run_cli([command, str(mine), "--train-data", SCENES, "--output", str(output), "-q"], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in mine.iterdir()) == before and not any(folder.iterdir())
    assert not (tmp_path / "result").exists()
