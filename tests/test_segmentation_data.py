"""Segmentation sources: the built-in scenes, and the folder, Pascal VOC and ADE20K layouts on tiny files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glsd_cli.data.scenes import SyntheticScenes
from glsd_cli.data.segmentation import IGNORE_INDEX, VOC_CLASSES, sample_with_mask
from glsd_cli.data.sources import open_source
from glsd_cli.data.subsets import make_subset
from glsd_cli.errors import DataError


# ----------------------------------------------------------------------------- synthetic-scenes

def test_scenes_are_reproducible_and_differ_between_images_seeds_and_splits():
    a = open_source("synthetic-scenes:train=6,val=3,size=32,seed=3", "train")
    b = open_source("synthetic-scenes:train=6,val=3,size=32,seed=3", "train")
    img, mask = a.sample(4)
    img2, mask2 = b.sample(4)
    assert torch.equal(img, img2) and torch.equal(mask, mask2)
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and mask.shape == (32, 32) and mask.dtype == torch.uint8
    assert not torch.equal(a.sample(5)[0], img)
    assert not torch.equal(open_source("synthetic-scenes:seed=4,size=32", "train").sample(4)[0], img)
    assert not torch.equal(open_source("synthetic-scenes:seed=3,size=32", "val").sample(4)[0], img)
    assert len(a) == 6 and len(open_source("synthetic-scenes:train=6,val=3", "val")) == 3


def test_every_scene_has_two_to_four_regions_of_distinct_classes_and_its_label_is_the_largest():
    src = SyntheticScenes("train", num_images=60, size=48, seed=1)
    counts = []
    for i in range(len(src)):
        image, mask = src.sample(i)
        present, area = np.unique(mask.numpy(), return_counts=True)
        counts.append(len(present))
        assert 2 <= len(present) <= 4 and present.max() < 10
        assert src.targets[i] == present[area.argmax()]
        assert src[i][1] == src.targets[i] and torch.equal(src[i][0], image)
        # Each region is one texture: its pixels differ from the other regions' (not one flat colour).
        for c in present:
            assert image[:, mask == int(c)].float().std() > 5
    assert set(counts) == {2, 3, 4}


def test_a_class_cannot_be_read_off_the_position():
    """Over many scenes every class covers the left and the right half, the top and the bottom alike."""
    src = SyntheticScenes("train", num_images=400, size=32, seed=0)
    left = np.zeros(10)
    top = np.zeros(10)
    total = np.zeros(10)
    for i in range(len(src)):
        mask = src._layout(i)[1][src._layout(i)[0]]  # classes of the regions, per pixel: no texture rendering
        for c in range(10):
            where = mask == c
            total[c] += where.sum()
            left[c] += where[:, :16].sum()
            top[c] += where[:16].sum()
    assert np.all(np.abs(left / total - 0.5) < 0.06) and np.all(np.abs(top / total - 0.5) < 0.06)


def test_scene_texture_periods_stay_in_pixels_across_sizes():
    """Horizontal stripes alone (a 2-region scene's region is large): the period in pixels does not grow with size."""
    def stripe_rows(size):
        src = SyntheticScenes("train", num_images=200, size=size, seed=0)
        for i in range(len(src)):
            image, mask = src.sample(i)
            rows = (mask == 0).all(1)  # rows entirely of hstripes
            if rows.sum() >= 20:
                profile = image[0, rows].float().mean(1)
                changes = (np.diff((profile > profile.mean()).numpy().astype(int)) != 0).sum()
                return rows.sum().item() / max(changes, 1)  # about half a period
        pytest.skip("no scene with 20 full rows of stripes")
    assert stripe_rows(64) < 6 and stripe_rows(96) < 6


def test_bad_scene_options_are_refused():
    for uri, text in (("synthetic-scenes:regions=1", "regions"), ("synthetic-scenes:size=8", "size"),
                      ("synthetic-scenes:colour=1", "bad synthetic-scenes option")):
        with pytest.raises(DataError, match=text):
            open_source(uri)


# ----------------------------------------------------------------------------- files on disk

def _save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    im.save(path)


def _image(rng, h=12, w=10) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def write_mask_folder(root: Path, n_train=3, n_val=1, classes=3, size=(12, 10), names=None) -> dict:
    """ROOT/{train,val}/{images,masks}; each mask has an ignore border column. Returns the masks by (split, stem)."""
    rng = np.random.default_rng(0)
    masks = {}
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            mask = rng.integers(0, classes, size=size, dtype=np.uint8)
            mask[:, 0] = IGNORE_INDEX
            if split == "train" and i == 0:
                mask[0, 1] = classes - 1  # the largest class is present in training
            _save(root / split / "images" / f"img{i}.jpg" if i % 2 else root / split / "images" / f"img{i}.png",
                  _image(rng, *size))
            _save(root / split / "masks" / f"img{i}.png", mask, "L")
            masks[(split, f"img{i}")] = mask
    if names:
        (root / "classes.txt").write_text("\n".join(names) + "\n")
    return masks


def test_mask_folder_reads_masks_with_ignore_pixels_and_numbers_classes(tmp_path):
    masks = write_mask_folder(tmp_path, classes=3)
    train = open_source(str(tmp_path), "train")
    val = open_source(str(tmp_path), "val")
    assert len(train) == 3 and len(val) == 1 and train.classes == ["0", "1", "2"]
    image, mask = train.sample(0)
    assert image.shape == (3, 12, 10) and np.array_equal(mask.numpy(), masks[("train", "img0")])
    assert (mask[:, 0] == IGNORE_INDEX).all()
    assert train[1][1] == -1 and train[1][0].shape == (3, 12, 10)  # pre-training sees images only
    # Through a subset, too (the holdout of dense-eval).
    sub = make_subset(train, count=2, seed=0)
    assert torch.equal(sample_with_mask(sub, 1)[1], train.sample(sub.indices[1])[1])


def test_mask_folder_takes_class_names_from_classes_txt(tmp_path):
    write_mask_folder(tmp_path, classes=2, names=["sky", "grass", "road"])
    assert open_source(str(tmp_path)).classes == ["sky", "grass", "road"]


def test_missing_mismatched_and_out_of_range_masks_are_clear_errors(tmp_path):
    write_mask_folder(tmp_path, classes=3)
    (tmp_path / "val" / "masks" / "img0.png").unlink()
    with pytest.raises(DataError, match="1 of 1 images .* have no mask .*img0.png"):
        open_source(str(tmp_path), "val")
    _save(tmp_path / "val" / "masks" / "img0.png", np.zeros((5, 5), np.uint8), "L")
    with pytest.raises(DataError, match="is 5x5 but its image .* is 12x10"):
        open_source(str(tmp_path), "val").sample(0)
    _save(tmp_path / "val" / "masks" / "img0.png", np.full((12, 10), 7, np.uint8), "L")
    with pytest.raises(DataError, match="holds class 7, but the data has 3 classes"):
        open_source(str(tmp_path), "val").sample(0)
    _save(tmp_path / "val" / "masks" / "img0.png", np.zeros((12, 10, 3), np.uint8))
    with pytest.raises(DataError, match="colour image"):
        open_source(str(tmp_path), "val").sample(0)


def _palette_png(path: Path, mask: np.ndarray) -> None:
    im = Image.fromarray(mask, "P")
    im.putpalette([v for i in range(256) for v in (i, (i * 7) % 256, (i * 13) % 256)])
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def write_voc(root: Path) -> dict:
    base = root / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(1)
    masks = {}
    ids = {"train": ["2007_000001", "2007_000002"], "val": ["2007_000003"]}
    for split, names in ids.items():
        (base / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            _save(base / "JPEGImages" / f"{name}.jpg", _image(rng, 9, 11))
            mask = rng.integers(0, 21, size=(9, 11), dtype=np.uint8)
            mask[0] = IGNORE_INDEX  # VOC's boundary label
            _palette_png(base / "SegmentationClass" / f"{name}.png", mask)
            masks[name] = mask
    return masks


def test_pascal_voc_layout(tmp_path):
    masks = write_voc(tmp_path)
    for root in (tmp_path, tmp_path / "VOCdevkit", tmp_path / "VOCdevkit" / "VOC2012"):
        train = open_source(f"voc:{root}", "train")
        assert len(train) == 2 and train.classes == VOC_CLASSES
    val = open_source(f"voc:{tmp_path}", "val")
    image, mask = val.sample(0)
    assert image.shape == (3, 9, 11) and np.array_equal(mask.numpy(), masks["2007_000003"])  # palette indices, not colours
    (tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000002.png").unlink()
    with pytest.raises(DataError, match="1 of the 2 masks listed in train.txt are missing"):
        open_source(f"voc:{tmp_path}", "train")
    with pytest.raises(DataError, match="does not hold the Pascal VOC layout"):
        open_source(f"voc:{tmp_path / 'VOCdevkit' / 'VOC2012' / 'JPEGImages'}", "train")


def write_ade(root: Path) -> dict:
    base = root / "ADEChallengeData2016"
    rng = np.random.default_rng(2)
    masks = {}
    for folder, n in (("training", 2), ("validation", 1)):
        for i in range(n):
            name = f"ADE_{folder}_{i:08d}"
            _save(base / "images" / folder / f"{name}.jpg", _image(rng, 8, 8))
            mask = rng.integers(0, 151, size=(8, 8), dtype=np.uint8)
            mask[0, 0], mask[0, 1], mask[0, 2] = 0, 1, 150
            _save(base / "annotations" / folder / f"{name}.png", mask, "L")
            masks[name] = mask
    return masks


def test_ade20k_layout_ignores_other_and_shifts_classes_down(tmp_path):
    masks = write_ade(tmp_path)
    train = open_source(f"ade20k:{tmp_path}", "train")
    assert len(train) == 2 and len(train.classes) == 150 and train.classes[0] == "class 1"
    _, mask = open_source(f"ade20k:{tmp_path / 'ADEChallengeData2016'}", "val").sample(0)
    raw = masks["ADE_validation_00000000"]
    expected = np.where(raw == 0, IGNORE_INDEX, raw.astype(int) - 1)
    assert np.array_equal(mask.numpy(), expected) and mask[0, 0] == IGNORE_INDEX and mask[0, 1] == 0 and mask[0, 2] == 149
    info = tmp_path / "ADEChallengeData2016" / "objectInfo150.txt"
    info.write_text("Idx\tRatio\tTrain\tVal\tName\n" + "".join(f"{i}\t0.1\t1\t1\tthing{i};alias\n" for i in range(1, 151)))
    assert open_source(f"ade20k:{tmp_path}").classes[:2] == ["thing1", "thing2"]
    with pytest.raises(DataError, match="does not hold the ADE20K layout"):
        open_source(f"ade20k:{tmp_path / 'ADEChallengeData2016' / 'images'}")
