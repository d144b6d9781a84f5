"""Open an image source from a URI: image folders, segmentation layouts, the packed datasets (packed.py), synthetic.

Every source yields `(uint8 tensor (3, H, W) RGB, int label)` with label -1 when unlabelled. The
dataset readers parse the official on-disk layouts themselves and never download anything, so a
missing or incomplete root is a `DataError` naming what was expected.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from glsd_cli.data.base import UNREADABLE_SAMPLE, ImageSource, no_split_error, too_many_unreadable
from glsd_cli.data.packed import CifarSource, IdxSource, STL10Source
from glsd_cli.data.segmentation import Ade20kSource, MaskFolderSource, VocSource, is_mask_folder
from glsd_cli.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
SCHEMES = ("folder", "synthetic", "synthetic-scenes", "voc", "ade20k", "cifar10", "cifar100", "stl10", "fashion-mnist", "mnist")
_SPLITS = ("train", "val", "unlabelled", "train+unlabelled")


def describe_schemes() -> str:
    """Help text listing the URI forms `open_source` understands."""
    return "\n".join([
        "PATH or folder:PATH       image folder (class sub-folders -> labelled; else unlabelled;"
        " train/ and val/ inside are picked by split)",
        "synthetic[:OPTIONS]       built-in generated grey-level textures (no files needed)",
        "synthetic-scenes[:OPTIONS] built-in scenes of 2-4 texture regions with per-pixel masks (segmentation)",
        "PATH (segmentation)       PATH/{train,val}/{images,masks}/: masks are PNGs of class indices named like"
        " their images, 255 = ignore; class names from PATH/classes.txt if present",
        "voc:ROOT                  Pascal VOC segmentation (JPEGImages, SegmentationClass, ImageSets/Segmentation)",
        "ade20k:ROOT               ADE20K SceneParsing (images/ and annotations/ {training,validation})",
        "cifar10:ROOT              ROOT/cifar-10-batches-py (python pickle version)",
        "cifar100:ROOT             ROOT/cifar-100-python (fine labels)",
        "stl10:ROOT                ROOT/stl10_binary (split: train, val, unlabelled, train+unlabelled)",
        "fashion-mnist:ROOT        IDX files (optionally .gz) in ROOT or one sub-folder",
        "mnist:ROOT                IDX files, same layout as fashion-mnist",
        "Append ?split=train|val|test|unlabelled to override the split (test means the held-out split).",
    ])


def _normalise_split(split: str) -> str:
    s = split.strip().lower().replace("unlabeled", "unlabelled")
    if s == "test":  # "val" is the dataset's held-out split, whatever the dataset calls it
        s = "val"
    if s not in _SPLITS:
        raise DataError(f"Unknown split '{split}': expected one of train, val, test, unlabelled, "
                        "train+unlabelled.")
    return s


def _parse_uri(uri: str) -> tuple[str, str, str | None]:
    """Split a URI into (scheme, rest, split override); a bare path gets scheme 'folder'."""
    rest, query = uri, None
    if "?" in uri:
        head, _, tail = uri.rpartition("?")
        if tail.startswith("split="):
            rest, query = head, tail[len("split="):]
        elif "=" in tail and not os.path.exists(uri):
            raise DataError(f"Unknown URI option '{tail}' in '{uri}': only ?split=NAME is supported.")
    scheme, sep, body = rest.partition(":")
    if not sep:
        return (rest, "", query) if rest in ("synthetic", "synthetic-scenes") else ("folder", rest, query)
    # A one-letter scheme is a Windows drive letter; an existing path containing ':' is a path.
    if len(scheme) <= 1 or os.path.exists(rest):
        return "folder", rest, query
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise DataError(f"Unknown data scheme '{scheme}:' in '{uri}': expected a folder path or one of "
                        + ", ".join(s + ":" for s in SCHEMES) + ".")
    return scheme, body, query


def open_source(uri: str, split: str = "train") -> ImageSource:
    """Open the image source named by `uri` for `split` ("train" or "val"; `?split=` overrides)."""
    scheme, body, query = _parse_uri(uri.strip())
    split = _normalise_split(query if query is not None else split)
    if scheme == "synthetic":
        from glsd_cli.data.synthetic import SyntheticTextures  # lazy: written separately by the lead
        return SyntheticTextures.from_uri(body, split)
    if scheme == "synthetic-scenes":
        from glsd_cli.data.scenes import SyntheticScenes
        return SyntheticScenes.from_uri(body, split)
    if not body:
        raise DataError(f"'{uri}' names no path: expected {scheme}:ROOT.")
    root = Path(body).expanduser()
    if not root.exists():
        raise DataError(f"Data path '{root}' does not exist (from '{uri}').")
    if scheme in ("voc", "ade20k") or (scheme == "folder" and root.is_dir() and is_mask_folder(root)):
        if split not in ("train", "val"):
            raise no_split_error("Segmentation data", split)
        cls = {"voc": VocSource, "ade20k": Ade20kSource, "folder": MaskFolderSource}[scheme]
        src: ImageSource = cls(root, split)
    elif scheme == "folder":
        src = FolderSource(root, split)
    elif scheme in ("cifar10", "cifar100"):
        src = CifarSource(root, split, hundred=scheme == "cifar100")
    elif scheme == "stl10":
        src = STL10Source(root, split)
    else:
        src = IdxSource(root, split, fashion=scheme == "fashion-mnist")
    src.uri = uri
    return src


# ----------------------------------------------------------------------------- image folders

def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _find_images(folder: Path) -> list[Path]:
    """All image files under `folder`, recursively, in a deterministic (sorted) order."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image(f))
    return found


def _decode_file(path: Path) -> torch.Tensor:
    """Decode one image to uint8 (3, H, W) RGB: torchvision's fast decoders, PIL for the rest."""
    if path.suffix.lower() not in (".tif", ".tiff"):  # torchvision cannot decode TIFF
        try:
            from torchvision.io import ImageReadMode, decode_image, read_file
            with warnings.catch_warnings():  # torchvision 0.29 deprecates these; they still work
                warnings.simplefilter("ignore", DeprecationWarning)
                img = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
            if img.ndim == 4:  # animated GIF: keep the first frame
                img = img[0]
            if img.ndim == 3 and img.shape[0] == 3:
                return img
        except Exception:  # noqa: BLE001 - any decoder failure falls back to PIL
            pass
    from PIL import Image
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class FolderSource(ImageSource):
    """Images in a folder tree; labelled by top-level sub-folder when there is a class structure.

    Unreadable files are skipped: `__getitem__` returns the next readable image (index+1, wrapping)
    and counts the file in `num_unreadable` / `unreadable_paths`, so one bad JPEG in a million does
    not kill a long run, while a broken dataset (more than `max_bad_fraction` of what was seen,
    always tolerating one file) stops with a DataError.
    """

    def __init__(self, root: str | Path, split: str = "train", max_bad_fraction: float = 0.01):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"Image folder '{root}' does not exist or is not a folder.")
        self.uri, self.split, self.max_bad_fraction = str(root), split, max_bad_fraction
        self.root = self._pick_split_dir(root, split)
        direct = [p for p in sorted(self.root.iterdir()) if p.is_file() and _is_image(p.name)]
        subdirs = [p for p in sorted(self.root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        self.paths: list[Path] = []
        self.targets, self.classes = [], []
        if direct:  # images directly in the root (maybe plus deeper ones): no class structure
            self.paths = _find_images(self.root)
            self.targets = [-1] * len(self.paths)
        else:
            for d in subdirs:
                imgs = _find_images(d)
                if imgs:  # empty sub-folders are not classes
                    self.classes.append(d.name)
                    self.paths.extend(imgs)
                    self.targets.extend([len(self.classes) - 1] * len(imgs))
        if not self.paths:
            raise DataError(f"No images found in '{self.root}': expected files with extensions "
                            + " ".join(e[1:] for e in IMAGE_EXTENSIONS) + ".")
        # 0 = not tried yet, 1 = readable, 2 = unreadable; one byte per image keeps this cheap.
        self._status = bytearray(len(self.paths))
        self._num_seen = 0
        self.num_unreadable = 0
        self.unreadable_paths: list[str] = []

    @staticmethod
    def _pick_split_dir(root: Path, split: str) -> Path:
        """With train/ and val/ (or test/) inside, use the one for the split; otherwise the root."""
        held = [root / n for n in ("val", "test") if (root / n).is_dir()]
        if not ((root / "train").is_dir() and held):
            return root  # no split structure: the folder is the split the user pointed at
        if split == "val":
            return held[0]
        if split == "train":
            return root / "train"
        raise DataError(f"Image folder '{root}' has no '{split}' split: expected train or val.")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.paths)
        for step in range(n):
            i = (index + step) % n
            if self._status[i] == 2:
                continue
            try:
                img = _decode_file(self.paths[i])
            except Exception:  # noqa: BLE001 - corrupt/truncated/unsupported files are all skipped
                self._mark(i, bad=True)
                continue
            if self._status[i] == 0:
                self._mark(i, bad=False)
            return img, self.targets[i]
        raise DataError(f"None of the {n} images in '{self.root}' could be read.")

    def _mark(self, i: int, bad: bool) -> None:
        """Record a first read (or a failure) and stop if too many of the images seen are bad."""
        self._num_seen += self._status[i] == 0
        self._status[i] = 2 if bad else 1
        if bad:
            self.num_unreadable += 1
            self.unreadable_paths.append(str(self.paths[i]))
        seen = self._num_seen
        if too_many_unreadable(self.num_unreadable, seen, self.max_bad_fraction, min(len(self.paths), UNREADABLE_SAMPLE)):
            few = ", ".join(self.unreadable_paths[:3])
            raise DataError(f"{self.num_unreadable} of {seen} images read so far in '{self.root}' are "
                            f"unreadable (more than {self.max_bad_fraction:.1%}), e.g. {few}.")
