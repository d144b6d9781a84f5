"""The common shape of every image source.

A source is a map-style dataset of `(image, label)` where `image` is a uint8 tensor (3, H, W)
in RGB (grayscale sources replicate their channel) and `label` is an int (-1 when unlabelled).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from glsd_cli.errors import DataError


@dataclass
class SourceInfo:
    """What `glsd data info` prints about a source."""

    uri: str
    num_images: int
    num_classes: int
    classes: list[str] = field(default_factory=list)
    image_size: str = "?"
    split: str = "train"
    notes: str = ""


class ImageSource(Dataset):
    """Base class: subclasses fill `targets` (one int per image, -1 if unlabelled) and `classes`."""

    uri: str = ""
    split: str = "train"
    targets: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def labelled(self) -> bool:
        return len(self.classes) > 0 and all(t >= 0 for t in self.targets)

    def image_size(self) -> str:
        """A short description of image sizes, e.g. '32x32' (subclasses with fixed sizes override)."""
        if len(self) == 0:
            return "-"
        img, _ = self[0]
        return f"{img.shape[-2]}x{img.shape[-1]}"

    def info(self) -> SourceInfo:
        return SourceInfo(
            uri=self.uri,
            num_images=len(self),
            num_classes=len(self.classes),
            classes=list(self.classes),
            image_size=self.image_size(),
            split=self.split,
        )


class SubsetSource(ImageSource):
    """A view of another source restricted to the given indices (labels remapped if asked)."""

    def __init__(self, base: ImageSource, indices: list[int], label_map: dict[int, int] | None = None,
                 classes: list[str] | None = None):
        self.base = base
        self.indices = list(indices)
        self.uri = base.uri
        self.split = base.split
        self.label_map = label_map
        self.classes = classes if classes is not None else list(base.classes)
        self.targets = [self._map(base.targets[i]) for i in self.indices]

    def _map(self, t: int) -> int:
        if self.label_map is None or t < 0:
            return t
        return self.label_map[t]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, t = self.base[self.indices[index]]
        return img, self._map(t)

    def image_size(self) -> str:
        return self.base.image_size()


def innermost(source: ImageSource, index: int | None = None) -> tuple[ImageSource, int | None]:
    """The source under any subsets, and `index` mapped into it."""
    while isinstance(source, SubsetSource):
        source, index = source.base, (None if index is None else source.indices[index])
    return source, index


# Unreadable images: one bad file is always tolerated, and the fraction is judged only once a fair
# sample was read (so a few unlucky early files in a large shuffled dataset whose overall bad fraction
# is within the tolerance do not abort a long run). Applied by the folder source to what one loader
# worker reads and by the training loop to what all workers and processes read in an epoch.
UNREADABLE_SAMPLE = 1000


def too_many_unreadable(unreadable: int, read: int, max_fraction: float, sample: int) -> bool:
    """Whether `unreadable` of `read` images break the tolerance, judged once `sample` images were read
    (UNREADABLE_SAMPLE, or all there are when fewer)."""
    return unreadable > 1 and read >= sample and unreadable > max_fraction * read


def root_file_list(source: ImageSource) -> list[str] | None:
    """The files behind a source (through subsets), or None for sources that are not file-backed."""
    source, _ = innermost(source)
    paths = getattr(source, "paths", None)
    return [str(p) for p in paths] if paths is not None else None


def same_files(a: ImageSource, b: ImageSource) -> bool:
    """Whether two sources read the same image files (a folder without train/ and val/ serves both splits)."""
    files = root_file_list(a)
    return files is not None and files == root_file_list(b)


def no_split_error(name: str, split: str) -> DataError:
    return DataError(f"{name} has no '{split}' split: expected train or val (test).")
