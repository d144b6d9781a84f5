"""Segmentation data: images with per-pixel class masks, for `glsd dense-eval`.

A `SegmentationSource` is an ordinary image source (pre-training reads its images only) whose
`sample(i)` also returns the mask: uint8 (H, W) class indices, `IGNORE_INDEX` (255) for pixels that
count nowhere. Layouts read from disk, never downloaded:
- `ROOT/{train,val}/{images,masks}/`: masks are PNGs of class indices with the image's file stem;
  class names from `ROOT/classes.txt` (one per line) or, without it, numbered up to the largest
  index in the training masks;
- Pascal VOC (`voc:ROOT`): `JPEGImages/`, `SegmentationClass/` (palette PNGs, 255 = boundary),
  `ImageSets/Segmentation/{train,val}.txt`; 21 classes with background;
- ADE20K (`ade20k:ROOT`): the SceneParsing release `images/{training,validation}/`,
  `annotations/{training,validation}/`; 150 classes, index 0 ("other") ignored and the rest shifted
  down by one, as the benchmark's evaluation (and mmsegmentation's `reduce_zero_label`) does.
Missing masks are reported when a source opens; a mask of another size than its image, or with a
class index the data does not have, when it is read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from glsd_cli.data.base import ImageSource, SubsetSource
from glsd_cli.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from glsd_cli.errors import DataError

IGNORE_INDEX = 255
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]
ADE20K_NUM_CLASSES = 150
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class SegmentationSource(ImageSource):
    """An image source whose images come with class masks. Image labels are -1 unless a subclass knows one."""

    ignore_index = IGNORE_INDEX

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """(image uint8 (3, H, W) RGB, mask uint8 (H, W))."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.sample(index)[0], self.targets[index]


def segmentation_base(source: ImageSource) -> SegmentationSource | None:
    """The segmentation source under any subset wrappers, or None when `source` has no masks."""
    while isinstance(source, SubsetSource):
        source = source.base
    return source if isinstance(source, SegmentationSource) else None


def sample_with_mask(source: ImageSource, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, mask) of item `index` of a segmentation source or of a subset of one."""
    while isinstance(source, SubsetSource):
        source, index = source.base, source.indices[index]
    return source.sample(index)  # type: ignore[attr-defined]


class DenseEvalDataset(Dataset):
    """Item i → (normalised image (3, S, S), mask uint8 (M, M), i).

    The whole image is resized to a square (bicubic; no crop, so every labelled pixel is evaluated)
    and its mask to `mask_size` with nearest-neighbour sampling (class indices must not be blended).
    """

    def __init__(self, source: ImageSource, image_size: int, mask_size: int):
        self.source, self.image_size, self.mask_size = source, image_size, mask_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image, mask = sample_with_mask(self.source, index)
        image = TF.resize(image, [self.image_size, self.image_size], interpolation=InterpolationMode.BICUBIC,
                          antialias=True)
        mask = TF.resize(mask[None], [self.mask_size, self.mask_size], interpolation=InterpolationMode.NEAREST_EXACT)
        return TF.normalize(image.float() / 255.0, IMAGENET_MEAN, IMAGENET_STD), mask[0], index


# ----------------------------------------------------------------------------- reading files

def read_mask(path: Path) -> np.ndarray:
    """A class-index PNG → uint8 (H, W). Palette and grey-level files hold indices; colour files are refused."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA"):
                raise DataError(f"mask '{path}' is a colour image ({im.mode}): expected a PNG of class indices "
                                "(palette or grey-level mode, 255 = ignore)")
            arr = np.asarray(im)
    except OSError as e:
        raise DataError(f"cannot read mask '{path}' ({e})") from None
    if arr.ndim != 2:
        raise DataError(f"mask '{path}' has shape {arr.shape}: expected one channel of class indices")
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise DataError(f"mask '{path}' holds values outside 0..255: expected class indices")
        arr = arr.astype(np.uint8)
    return arr


def _check_pair(image: torch.Tensor, mask: np.ndarray, num_classes: int, image_path: Path, mask_path: Path) -> None:
    if tuple(image.shape[-2:]) != mask.shape:
        raise DataError(f"mask '{mask_path}' is {mask.shape[0]}x{mask.shape[1]} but its image '{image_path}' is "
                        f"{image.shape[-2]}x{image.shape[-1]} (height x width): they must match")
    bad = mask[(mask >= num_classes) & (mask != IGNORE_INDEX)]
    if bad.size:
        raise DataError(f"mask '{mask_path}' holds class {int(bad.max())}, but the data has {num_classes} classes "
                        f"(0..{num_classes - 1}, {IGNORE_INDEX} = ignore)")


class PairedFiles(SegmentationSource):
    """Images and masks given as two parallel lists of files."""

    def __init__(self, images: list[Path], masks: list[Path], classes: list[str], split: str, uri: str,
                 shift_down: bool = False):
        if not images:
            raise DataError(f"{uri} ({split}) has no images")
        self.image_paths, self.mask_paths = images, masks
        self.classes, self.split, self.uri = classes, split, uri
        self.targets = [-1] * len(images)
        self.shift_down = shift_down  # ADE20K: 0 → ignore, k → k - 1

    def mask(self, index: int) -> np.ndarray:
        mask = read_mask(self.mask_paths[index])
        if self.shift_down:
            mask = np.where(mask == 0, IGNORE_INDEX, mask.astype(np.int64) - 1).astype(np.uint8)
        return mask

    def _image(self, index: int) -> torch.Tensor:
        from glsd_cli.data.sources import _decode_file

        path = self.image_paths[index]
        try:
            return _decode_file(path)
        except Exception as e:  # noqa: BLE001 - any decoder failure is the same problem for the user
            raise DataError(f"cannot read image '{path}' ({e})") from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._image(index), -1  # pre-training reads the images only

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.image_paths[index]
        image = self._image(index)
        mask = self.mask(index)
        _check_pair(image, mask, len(self.classes), path, self.mask_paths[index])
        return image, torch.from_numpy(mask.copy())


def _pair_by_stem(image_dir: Path, mask_dir: Path, what: str) -> tuple[list[Path], list[Path]]:
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in _IMAGE_EXTENSIONS
                    and not p.name.startswith("."))
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() == ".png"}
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        raise DataError(f"{what}: {len(missing)} of {len(images)} images in '{image_dir}' have no mask "
                        f"'<same name>.png' in '{mask_dir}', e.g. {', '.join(missing[:3])}")
    return images, [masks[p.stem] for p in images]


class MaskFolderSource(PairedFiles):
    """ROOT/{train,val}/{images,masks}/ with masks named like their images (.png)."""

    def __init__(self, root: Path, split: str):
        if split not in ("train", "val"):
            raise DataError(f"a segmentation folder has splits train and val, not '{split}'")
        split_dir = _split_dir(root, split)
        images, masks = _pair_by_stem(split_dir / "images", split_dir / "masks", f"segmentation folder '{root}'")
        super().__init__(images, masks, _folder_classes(root), split, str(root))


def is_mask_folder(root: Path) -> bool:
    """Whether `root` has the ROOT/train/{images,masks} layout."""
    return (root / "train" / "images").is_dir() and (root / "train" / "masks").is_dir()


def _split_dir(root: Path, split: str) -> Path:
    names = ["train"] if split == "train" else ["val", "test"]
    for name in names:
        if (root / name / "images").is_dir() and (root / name / "masks").is_dir():
            return root / name
    raise DataError(f"segmentation folder '{root}' has no {split} split: expected {root}/{names[0]}/images/ and "
                    f"{root}/{names[0]}/masks/")


def _folder_classes(root: Path) -> list[str]:
    """Class names from ROOT/classes.txt, else '0'..'C-1' with C from the training masks' largest index."""
    listed = root / "classes.txt"
    if listed.is_file():
        from glsd_cli.data.subsets import read_class_file

        return read_class_file(listed)
    _, masks = _pair_by_stem(_split_dir(root, "train") / "images", _split_dir(root, "train") / "masks",
                             f"segmentation folder '{root}'")
    largest = -1
    for path in masks:
        values = np.unique(read_mask(path))
        values = values[values != IGNORE_INDEX]
        if values.size:
            largest = max(largest, int(values.max()))
    if largest < 0:
        raise DataError(f"the training masks of '{root}' hold no class (every pixel is {IGNORE_INDEX} = ignore)")
    return [str(i) for i in range(largest + 1)]


def _find_root(root: Path, marker: list[str], candidates: list[str], name: str, expected: str) -> Path:
    """`root` or the first of its candidate sub-folders that holds every `marker` path."""
    for base in [root] + [root / c for c in candidates]:
        if all((base / m).exists() for m in marker):
            return base
    raise DataError(f"'{root}' does not hold the {name} layout: expected {expected}")


class VocSource(PairedFiles):
    """Pascal VOC segmentation: the image ids of ImageSets/Segmentation/{train,val}.txt."""

    def __init__(self, root: Path, split: str):
        if split not in ("train", "val"):
            raise DataError(f"Pascal VOC has segmentation splits train and val, not '{split}'")
        base = _find_root(root, ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation"],
                          ["VOC2012", "VOCdevkit/VOC2012", "VOC2007", "VOCdevkit/VOC2007"], "Pascal VOC",
                          "JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/ in it or in VOC2012/")
        listing = base / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listing.is_file():
            raise DataError(f"Pascal VOC root '{base}' has no {listing.relative_to(base)}")
        ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
        images = [base / "JPEGImages" / f"{i}.jpg" for i in ids]
        masks = [base / "SegmentationClass" / f"{i}.png" for i in ids]
        for kind, paths in (("image", images), ("mask", masks)):
            missing = [p.name for p in paths if not p.is_file()]
            if missing:
                raise DataError(f"Pascal VOC: {len(missing)} of the {len(ids)} {kind}s listed in {listing.name} are "
                                f"missing from '{paths[0].parent}', e.g. {', '.join(missing[:3])}")
        super().__init__(images, masks, list(VOC_CLASSES), split, f"voc:{root}")


class Ade20kSource(PairedFiles):
    """ADE20K SceneParsing (ADEChallengeData2016): 150 classes, annotation 0 ignored."""

    def __init__(self, root: Path, split: str):
        if split not in ("train", "val"):
            raise DataError(f"ADE20K has splits train and val, not '{split}'")
        folder = "training" if split == "train" else "validation"
        base = _find_root(root, [f"images/{folder}", f"annotations/{folder}"], ["ADEChallengeData2016"], "ADE20K",
                          f"images/{folder}/ and annotations/{folder}/ in it or in ADEChallengeData2016/")
        images, masks = _pair_by_stem(base / "images" / folder, base / "annotations" / folder, f"ADE20K '{base}'")
        super().__init__(images, masks, _ade_classes(base), split, f"ade20k:{root}", shift_down=True)


def _ade_classes(base: Path) -> list[str]:
    """The 150 names from objectInfo150.txt (Idx, Ratio, Train, Val, Name) when the release has it."""
    info = base / "objectInfo150.txt"
    if info.is_file():
        rows = [line.split("\t") for line in info.read_text().splitlines()[1:] if line.strip()]
        names = [r[-1].split(";")[0].strip() for r in rows if len(r) >= 5]
        if len(names) == ADE20K_NUM_CLASSES:
            return names
    return [f"class {i}" for i in range(1, ADE20K_NUM_CLASSES + 1)]
