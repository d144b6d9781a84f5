"""Data sources, subsets and size defaults on tiny generated files in each official layout."""
from __future__ import annotations

import gzip
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glsd_cli.data.size_defaults import (auto_momentum_teacher, auto_out_dim, auto_teacher_temp,
                                         resolve_size_defaults)
from glsd_cli.data.sources import FolderSource, describe_schemes, open_source
from glsd_cli.data.subsets import make_subset, read_class_file, save_file_list, split_holdout
from glsd_cli.errors import DataError


# ----------------------------------------------------------------------------- writers

def _cifar_images(n: int, offset: int = 0) -> np.ndarray:
    rng = np.random.default_rng(offset)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _write_cifar10(root: Path, per_batch: int = 2) -> tuple[list[np.ndarray], list[int]]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    images, labels = [], []
    for b in range(1, 6):
        data = _cifar_images(per_batch, b)
        lab = [(b + i) % 3 for i in range(per_batch)]
        (d / f"data_batch_{b}").write_bytes(pickle.dumps({b"data": data, b"labels": lab}))
        images.extend(data)
        labels.extend(lab)
    (d / "test_batch").write_bytes(pickle.dumps({b"data": _cifar_images(3, 9), b"labels": [0, 1, 2]}))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane", b"automobile", b"bird"]}))
    return images, labels


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    kind = {1: 0x0801, 3: 0x0803}[arr.ndim]
    raw = kind.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def _png(path: Path, value: int, size: int = 8, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, (size, size), color).save(path)


def _labelled_folder(root: Path, counts: dict[str, int]) -> None:
    for cls, n in counts.items():
        for i in range(n):
            _png(root / cls / ("deep" if i % 2 else "") / f"{i}.png", 10 * i)


# ----------------------------------------------------------------------------- sources

def test_cifar10_reads_pickles_and_meta(tmp_path: Path) -> None:
    images, labels = _write_cifar10(tmp_path)
    src = open_source(f"cifar10:{tmp_path}")
    assert len(src) == 10 and src.targets == labels and src.classes == ["airplane", "automobile", "bird"]
    img, lab = src[3]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and lab == labels[3]
    assert torch.equal(img, torch.from_numpy(images[3].reshape(3, 32, 32)))
    val = open_source(f"cifar10:{tmp_path / 'cifar-10-batches-py'}", split="val")  # batches folder itself
    assert len(val) == 3 and val.split == "val"
    assert len(open_source(f"cifar10:{tmp_path}?split=test")) == 3


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    data = _cifar_images(4)
    (d / "train").write_bytes(pickle.dumps({b"data": data, b"fine_labels": [0, 1, 1, 0], b"coarse_labels": [0] * 4}))
    (d / "test").write_bytes(pickle.dumps({b"data": data[:1], b"fine_labels": [1]}))
    (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"apple", b"aquarium_fish"]}))
    src = open_source(f"cifar100:{tmp_path}")
    assert src.targets == [0, 1, 1, 0] and src.classes == ["apple", "aquarium_fish"]
    assert open_source(f"cifar100:{tmp_path}", "val").targets == [1]


def test_cifar_incomplete_root_names_missing_files(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        open_source(f"cifar10:{tmp_path}")
    with pytest.raises(DataError, match="unlabelled"):
        open_source(f"cifar10:{tmp_path}?split=unlabelled")


def test_cifar_pickle_with_foreign_globals_is_refused(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(pickle.dumps({b"x": Path("a")}))
    with pytest.raises(DataError, match="not a readable CIFAR pickle"):
        open_source(f"cifar10:{tmp_path}")


def test_stl10_orientation_labels_and_unlabelled(tmp_path: Path) -> None:
    d = tmp_path / "stl10_binary"
    d.mkdir()
    # torchvision's convention: bytes are (N, 3, 96, 96) then axes 2 and 3 swapped, i.e. the byte
    # at channel c, offset x*96 + y is pixel (row y, column x). Write one marked byte per image.
    train = np.zeros((2, 3, 96, 96), dtype=np.uint8).reshape(2, -1)
    train[0, 0 * 9216 + 5 * 96 + 0] = 200  # image 0, channel 0, row 0, column 5
    train[1, 2 * 9216 + 1 * 96 + 7] = 99  # image 1, channel 2, row 7, column 1
    (d / "train_X.bin").write_bytes(train.tobytes())
    (d / "train_y.bin").write_bytes(bytes([1, 10]))  # 1-based in the files
    (d / "test_X.bin").write_bytes(train[:1].tobytes())
    (d / "test_y.bin").write_bytes(bytes([3]))
    (d / "unlabeled_X.bin").write_bytes(np.full((3, 27648), 5, dtype=np.uint8).tobytes())
    (d / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    src = open_source(f"stl10:{tmp_path}")
    assert src.targets == [0, 9] and src.classes[9] == "c9"
    img0, _ = src[0]
    assert img0.shape == (3, 96, 96) and img0[0, 0, 5] == 200 and img0[0, 5, 0] == 0
    assert int(img0.sum()) == 200
    assert src[1][0][2, 7, 1] == 99
    assert open_source(f"stl10:{tmp_path}", "val").targets == [2]
    unl = open_source(f"stl10:{tmp_path}?split=unlabelled")
    assert unl.targets == [-1] * 3 and not unl.labelled and int(unl[2][0][1, 3, 4]) == 5
    both = open_source(f"stl10:{tmp_path}?split=train+unlabelled")
    assert both.targets == [0, 9, -1, -1, -1] and both[1][0][2, 7, 1] == 99 and both[4][1] == -1
    clone = pickle.loads(pickle.dumps(both))  # DataLoader workers receive a pickled copy
    assert torch.equal(clone[0][0], img0)
    (d / "unlabeled_X.bin").unlink()
    with pytest.raises(DataError, match="unlabeled_X.bin"):
        open_source(f"stl10:{tmp_path}?split=unlabelled")


@pytest.mark.parametrize("gz,nested", [(False, False), (True, True)])
def test_fashion_mnist_idx(tmp_path: Path, gz: bool, nested: bool) -> None:
    folder = tmp_path / "fashion-mnist" if nested else tmp_path
    folder.mkdir(exist_ok=True)
    imgs = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28).astype(np.uint8)
    _write_idx(folder / "train-images-idx3-ubyte", imgs, gz)
    _write_idx(folder / "train-labels-idx1-ubyte", np.array([9, 0, 4], dtype=np.uint8), gz)
    _write_idx(folder / "t10k-images-idx3-ubyte", imgs[:2], gz)
    _write_idx(folder / "t10k-labels-idx1-ubyte", np.array([1, 2], dtype=np.uint8), gz)
    src = open_source(f"fashion-mnist:{tmp_path}")
    assert src.targets == [9, 0, 4] and src.classes[9] == "Ankle boot" and len(src.classes) == 10
    img, lab = src[1]
    assert img.shape == (3, 28, 28) and lab == 0
    assert torch.equal(img[0], torch.from_numpy(imgs[1])) and torch.equal(img[0], img[2])
    assert open_source(f"mnist:{tmp_path}", "val").classes == [str(i) for i in range(10)]


def test_idx_bad_header_and_truncation(tmp_path: Path) -> None:
    imgs = np.zeros((2, 4, 4), dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte", imgs, False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, dtype=np.uint8), False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        open_source(f"fashion-mnist:{tmp_path}")
    p.write_bytes(b"\x00\x00\x0d\x03" + bytes(40))  # float type code
    with pytest.raises(DataError, match="magic"):
        open_source(f"fashion-mnist:{tmp_path}")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        open_source(f"fashion-mnist:{tmp_path}", "val")


def test_labelled_folder_recursive_with_corrupt_image(tmp_path: Path) -> None:
    _labelled_folder(tmp_path, {"dog": 3, "cat": 2})
    _png(tmp_path / "cat" / "gray.PNG", 77, mode="L")
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"not an image at all")
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    (tmp_path / "empty").mkdir()  # a sub-folder without images is not a class
    src = open_source(str(tmp_path))
    assert src.classes == ["cat", "dog"] and src.targets.count(0) == 4 and src.targets.count(1) == 3
    assert isinstance(src, FolderSource)
    gray_i = next(i for i, p in enumerate(src.paths) if p.name == "gray.PNG")
    gray, _ = src[gray_i]
    assert gray.shape == (3, 8, 8) and torch.all(gray == 77)
    bad = next(i for i, p in enumerate(src.paths) if p.name == "broken.jpg")
    img, lab = src[bad]  # the next readable image stands in for the broken one
    expected, _ = src[(bad + 1) % len(src)]
    assert torch.equal(img, expected) and src.num_unreadable == 1
    assert src.unreadable_paths[0].endswith("broken.jpg")
    for i in range(len(src)):  # one bad file is always tolerated
        src[i]
    assert src.num_unreadable == 1


def test_folder_with_too_many_bad_files_raises(tmp_path: Path) -> None:
    _png(tmp_path / "ok.png", 1)
    for i in range(3):
        (tmp_path / f"bad{i}.png").write_bytes(b"\x89PNG garbage")
    src = FolderSource(tmp_path)
    with pytest.raises(DataError, match="unreadable"):
        for i in range(len(src)):
            src[i]
    allbad = tmp_path / "allbad"
    (allbad / "x").mkdir(parents=True)
    (allbad / "x" / "a.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="could be read"):
        FolderSource(allbad)[0]


def test_unlabelled_folder_and_split_subfolders(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    _png(flat / "a.jpg", 3)
    _png(flat / "sub" / "b.webp", 4)  # mixed depths: no class structure, found recursively
    src = open_source(f"folder:{flat}")
    assert len(src) == 2 and src.targets == [-1, -1] and src.classes == [] and not src.labelled
    tree = tmp_path / "tree"
    _labelled_folder(tree / "train", {"a": 2, "b": 2})
    _labelled_folder(tree / "val", {"a": 1, "b": 1})
    assert len(open_source(str(tree))) == 4
    assert len(open_source(str(tree), split="val")) == 2
    assert len(open_source(f"folder:{tree}?split=test")) == 2


def test_uri_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        open_source(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="cifar10:"):
        open_source("imagenet21k:/data")
    with pytest.raises(DataError, match="No images"):
        open_source(str(tmp_path))
    with pytest.raises(DataError, match="split"):
        open_source(str(tmp_path), split="holdout")
    with pytest.raises(DataError, match="incomplete"):
        open_source(f"stl10:{tmp_path}")
    assert "fashion-mnist:ROOT" in describe_schemes()


# ----------------------------------------------------------------------------- subsets

def _cifar_source(tmp_path: Path, per_batch: int = 20):
    _write_cifar10(tmp_path, per_batch=per_batch)
    return open_source(f"cifar10:{tmp_path}")


def test_subsets_are_seeded_and_stratified(tmp_path: Path) -> None:
    src = _cifar_source(tmp_path)  # 100 images over 3 classes
    counts = np.bincount(src.targets)
    a = make_subset(src, per_class=5, seed=1)
    b = make_subset(src, per_class=5, seed=1)
    c = make_subset(src, per_class=5, seed=2)
    assert a.indices == b.indices and a.indices != c.indices and a.indices == sorted(a.indices)
    assert np.bincount(a.targets).tolist() == [5, 5, 5]
    f = make_subset(src, fraction=0.1, seed=0)
    assert np.bincount(f.targets).tolist() == [max(1, round(0.1 * n)) for n in counts]
    k = make_subset(src, count=30, seed=0)
    assert len(k) == 30 and all(abs(x - 30 * n / 100) < 1 for x, n in zip(np.bincount(k.targets), counts))
    assert len(set(k.indices)) == 30
    with pytest.raises(DataError, match="only one"):
        make_subset(src, fraction=0.5, count=3)
    with pytest.raises(DataError, match="at most"):
        make_subset(src, count=1000)


def test_class_selection_remaps_and_suggests(tmp_path: Path) -> None:
    src = _cifar_source(tmp_path)
    listing = tmp_path / "classes.txt"
    listing.write_text("# my two classes\nbird\n\nairplane  # first class\n")
    names = read_class_file(listing)
    assert names == ["bird", "airplane"]
    sub = make_subset(src, classes=names, per_class=2, seed=0)
    assert sub.classes == ["bird", "airplane"] and sorted(sub.targets) == [0, 0, 1, 1]
    for i, t in enumerate(sub.targets):
        assert src.targets[sub.indices[i]] == (2 if t == 0 else 0) and sub[i][1] == t
    # a class's pick does not depend on which other classes were selected
    alone = make_subset(src, classes=["bird"], per_class=2, seed=0)
    assert set(alone.indices) <= set(sub.indices)
    with pytest.raises(DataError, match="Did you mean 'airplane'"):
        make_subset(src, classes=["airplan"])
    with pytest.raises(DataError, match="does not exist"):
        read_class_file(tmp_path / "missing.txt")


def test_unlabelled_subset_is_uniform(tmp_path: Path) -> None:
    for i in range(10):
        _png(tmp_path / f"{i}.png", i)
    src = open_source(str(tmp_path))
    a, b = make_subset(src, count=4, seed=3), make_subset(src, fraction=0.4, seed=3)
    assert len(a) == 4 and a.indices == b.indices
    with pytest.raises(DataError, match="labelled"):
        make_subset(src, per_class=2)


def test_split_holdout_disjoint_and_stratified(tmp_path: Path) -> None:
    src = _cifar_source(tmp_path)
    train, hold = split_holdout(src, 0.2, seed=5)
    assert not set(train.indices) & set(hold.indices)
    assert sorted(train.indices + hold.indices) == list(range(len(src)))
    counts = np.bincount(src.targets)
    assert np.bincount(hold.targets).tolist() == [round(0.2 * n) for n in counts]
    assert split_holdout(src, 0.2, seed=5)[1].indices == hold.indices
    assert split_holdout(src, 0.2, seed=6)[1].indices != hold.indices


def test_save_file_list_records_paths_and_base_indices(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _labelled_folder(data, {"a": 3, "b": 3})
    src = open_source(str(data))
    sub = make_subset(make_subset(src, classes=["b"]), per_class=2, seed=0)
    out = tmp_path / "run" / "files.txt"
    save_file_list(sub, out)
    rows = [ln.split("\t") for ln in out.read_text().splitlines() if not ln.startswith("#")]
    assert len(rows) == 2
    for idx, label, path in rows:
        assert src.targets[int(idx)] == 1 and label == "0" and Path(path) == src.paths[int(idx)]
    plain = _cifar_source(tmp_path / "c")
    save_file_list(make_subset(plain, count=3), tmp_path / "c.txt")
    assert all(len(ln.split("\t")) == 2 for ln in (tmp_path / "c.txt").read_text().splitlines()[2:])


# ----------------------------------------------------------------------------- size defaults

def test_size_defaults_anchors_and_monotone() -> None:
    assert auto_out_dim(100) == auto_out_dim(20_000) == 1024
    assert auto_out_dim(500_000) == auto_out_dim(10**8) == 65536
    assert auto_teacher_temp(1_000) == 0.02 and auto_teacher_temp(1_281_167) == 0.07
    assert auto_momentum_teacher(20_000) == 0.99 and auto_momentum_teacher(14_000_000) == 0.996
    t = (math.log(100_000) - math.log(20_000)) / (math.log(500_000) - math.log(20_000))
    assert auto_out_dim(100_000) == 2 ** round(10 + 6 * t)
    t = (math.log(100_000) - math.log(20_000)) / (math.log(1_281_167) - math.log(20_000))
    assert auto_teacher_temp(100_000) == pytest.approx(0.02 + 0.05 * t, abs=1e-4)
    assert auto_momentum_teacher(100_000) == pytest.approx(0.99 + 0.006 * t, abs=1e-4)
    ns = [1, 5_000, 20_000, 50_000, 105_000, 300_000, 700_000, 1_281_167, 10**7]
    for key in ("out_dim", "teacher_temp", "momentum_teacher"):
        vals = [resolve_size_defaults(n)[key] for n in ns]
        assert vals == sorted(vals)
    assert all(d & (d - 1) == 0 for d in (auto_out_dim(n) for n in ns))


@pytest.mark.parametrize("preset,reported", [("tiny-dino", False), ("tiny-geo", True)])
def test_auto_values_are_concrete_but_reported_only_where_used(preset, reported) -> None:
    """`pretrain` prints what `auto` resolved to; a dense head's size is news only where one is built."""
    from glsd_cli.config import resolve
    from glsd_cli.pretraining import prepare

    cfg, resolved = prepare(resolve(preset, ['method.local.out_dim="auto"']), 2000)
    assert cfg.method.local.out_dim == auto_out_dim(2000)  # the saved config has no 'auto' left
    assert ("method.local.out_dim" in resolved) == reported
