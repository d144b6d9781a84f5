"""The epoch-end k-NN monitor runs only where a real held-out split exists."""
from pathlib import Path

import torch
import torchvision

from glsd_cli.config import resolve
from glsd_cli.commands.pretrain import knn_monitor_hook
from glsd_cli.pretraining import build_pretraining, open_training_source


def _folder(root: Path, split: str = "") -> None:
    for label in ("a", "b"):
        d = root / split / label
        d.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            torchvision.io.write_png(torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8), str(d / f"{i}.png"))


def test_folder_without_splits_has_no_monitor(tmp_path):
    # Without train/ and val/ the folder serves both splits: "held-out" accuracy would be on training images.
    _folder(tmp_path)
    assert knn_monitor_hook(resolve("tiny-dino", [f'data.train="{tmp_path}"']), None, torch.device("cpu")) is None


def test_folder_with_splits_and_synthetic_data_have_one(tmp_path):
    _folder(tmp_path, "train")
    _folder(tmp_path, "val")
    assert knn_monitor_hook(resolve("tiny-dino", [f'data.train="{tmp_path}"']), None, torch.device("cpu")) is not None
    assert knn_monitor_hook(resolve("tiny-dino"), None, torch.device("cpu")) is not None
    assert knn_monitor_hook(resolve("tiny-dino", ["run.knn_monitor=false"]), None, torch.device("cpu")) is None


def test_evaluation_refuses_a_folder_without_held_out_split(tmp_path):
    import pytest

    from glsd_cli.errors import DataError
    from glsd_cli.eval.splits import open_labelled_pair

    _folder(tmp_path)
    cfg = resolve("tiny-dino", [f'data.train="{tmp_path}"'])
    with pytest.raises(DataError, match="no held-out split"):
        open_labelled_pair(cfg, None, None)
    train, val = open_labelled_pair(cfg, None, str(tmp_path))  # explicit: the user's choice
    assert len(train) == len(val) == 6


def test_evaluation_bank_is_the_runs_own_subset_unless_told_otherwise(tmp_path):
    from glsd_cli.eval.splits import open_labelled_pair

    data = "synthetic:train=100,val=30,size=8"
    cfg = resolve("tiny-dino", [f'data.train="{data}"', "data.count=40", "data.subset_seed=1"])
    bank, val = open_labelled_pair(cfg, None, None)
    assert len(bank) == 40 and len(val) == 30  # the 40 images the run trained on; all held-out images
    assert list(bank.indices) == list(open_training_source(cfg).indices)
    full, _ = open_labelled_pair(cfg, data, None)  # an explicit --train-data is taken whole
    assert len(full) == 100
    classes = tmp_path / "classes.txt"
    classes.write_text("hstripes\nvstripes\n")
    cfg = resolve("tiny-dino", [f'data.train="{data}"', f'data.classes_file="{classes}"'])
    bank, val = open_labelled_pair(cfg, None, None)  # a class subset restricts the held-out split too
    assert bank.classes == val.classes == ["hstripes", "vstripes"] and len(bank) == 20 and len(val) == 6


def test_segmentation_folder_without_image_labels_gets_the_patch_monitor_only(tmp_path):
    from tests.test_segmentation_data import write_mask_folder

    write_mask_folder(tmp_path, n_train=4, n_val=2, size=(16, 16))
    cfg = resolve("tiny-dino", [f'data.train="{tmp_path}"', "data.global_crop_size=16", "model.patch_size=4",
                                "model.depth=1"])
    method = build_pretraining(cfg, 4).method
    row = knn_monitor_hook(cfg, method, torch.device("cpu"))(0)
    assert set(row) == {"patch_knn_miou"} and 0 <= row["patch_knn_miou"] <= 100
