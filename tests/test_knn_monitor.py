"""The epoch-end k-NN monitor runs only where a real held-out split exists."""
from pathlib import Path

import torch
import torchvision

from glsd_cli.config import resolve
from glsd_cli.engine.pretrain import knn_monitor_hook


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
    with pytest.raises(DataError, match="no held-out split"):
        open_labelled_pair(str(tmp_path), None, None)
    train, val = open_labelled_pair(str(tmp_path), None, str(tmp_path))  # explicit: the user's choice
    assert len(train) == len(val) == 6
