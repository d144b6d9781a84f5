"""`glsd data info`: what a dataset holds, and whether the split asked for is really held out."""
from PIL import Image

from tests.cli_helpers import run_cli


def _folder(root, counts: dict[str, int], size=(8, 6)):
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", size).save(root / cls / f"{i}.png")


def _fields(out: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.strip().splitlines())}


def test_folder_with_splits(tmp_path, capsys):
    _folder(tmp_path / "train", {"cat": 3, "dog": 2})
    _folder(tmp_path / "val", {"cat": 1, "dog": 1})
    code, out, _ = run_cli(["data", "info", str(tmp_path)], capsys)
    assert code == 0
    assert _fields(out) == {"uri": str(tmp_path), "split": "train", "images": "5", "classes": "2 (cat, dog)",
                            "size": "6x8 (height x width)"}  # PIL size (8, 6): 8 wide
    code, out, _ = run_cli(["data", "info", str(tmp_path), "--split", "val"], capsys)
    assert code == 0 and _fields(out)["split"] == "val" and _fields(out)["images"] == "2"


def test_flat_folder_says_its_val_split_is_not_held_out(tmp_path, capsys):
    _folder(tmp_path, {"a": 2, "b": 2})
    code, out, _ = run_cli(["data", "info", str(tmp_path), "--split", "val"], capsys)
    assert code == 0
    assert _fields(out)["split"].startswith("val (the same images as train")
    assert _fields(out)["images"] == "4"
    code, out, _ = run_cli(["data", "info", str(tmp_path)], capsys)
    assert _fields(out)["split"] == "train"


def test_missing_data_is_one_line_and_exit_2(tmp_path, capsys):
    code, _, err = run_cli(["data", "info", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
