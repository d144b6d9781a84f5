"""The packed classification datasets, read from their official on-disk files into memory: CIFAR-10/100
(python pickles), STL-10 (binaries) and (Fashion-)MNIST (IDX, gzipped or not). Nothing is downloaded:
a missing or incomplete root is a `DataError` naming what was expected. Opened through
`sources.open_source` (`cifar10:ROOT`, `stl10:ROOT`, `fashion-mnist:ROOT`, ...).
"""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import torch

from glsd_cli.data.base import ImageSource, no_split_error
from glsd_cli.errors import DataError

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


# ----------------------------------------------------------------------------- CIFAR

class _SafeUnpickler(pickle.Unpickler):
    """The official CIFAR files are (Python 2) pickles of numpy arrays and lists. Pickle is the
    format torchvision reads too; we still only allow the numpy globals those files need, so a
    stray file in a data folder cannot run code when opened."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str):  # type: ignore[override]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="latin1").load()
    except Exception as e:  # noqa: BLE001
        raise DataError(f"'{path}' is not a readable CIFAR pickle file ({e}).") from e
    if not isinstance(obj, dict):
        raise DataError(f"'{path}' is not a CIFAR pickle file: expected a dict.")
    # Files written by Python 3 with bytes keys stay bytes under latin1; normalise to str.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _names(values) -> list[str]:
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values]


class CifarSource(ImageSource):
    """CIFAR-10 / CIFAR-100 (fine labels) from the official python-pickle layout, held in memory."""

    def __init__(self, root: str | Path, split: str = "train", hundred: bool = False):
        root = Path(root)
        name, folder = ("CIFAR-100", "cifar-100-python") if hundred else ("CIFAR-10", "cifar-10-batches-py")
        if split not in ("train", "val"):
            raise no_split_error(name, split)
        if hundred:
            meta, label_key, names_key = "meta", "fine_labels", "fine_label_names"
            files = ["train"] if split == "train" else ["test"]
        else:
            meta, label_key, names_key = "batches.meta", "labels", "label_names"
            files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        base = root / folder if (root / folder).is_dir() else root  # ROOT or the batches folder
        missing = [f for f in [meta, *files] if not (base / f).is_file()]
        if missing:
            raise DataError(f"{name} root '{base}' is incomplete: missing {', '.join(missing)} "
                            f"(expected ROOT/{folder}/ from the python version of {name}).")
        self.split = split
        self.classes = _names(_load_pickle(base / meta).get(names_key, []))
        arrays, labels = [], []
        for f in files:
            d = _load_pickle(base / f)
            if "data" not in d or label_key not in d:
                raise DataError(f"'{base / f}' lacks '{'data' if 'data' not in d else label_key}': "
                                f"expected a {name} batch.")
            data = np.asarray(d["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != len(d[label_key]):
                raise DataError(f"'{base / f}' has data of shape {data.shape} for {len(d[label_key])} "
                                "labels: expected N x 3072.")
            arrays.append(data.reshape(-1, 3, 32, 32))
            labels.extend(int(x) for x in d[label_key])
        self.data = np.concatenate(arrays)
        self.targets = labels
        if labels and not self.classes:
            self.classes = [str(i) for i in range(max(labels) + 1)]
        if labels and (min(labels) < 0 or max(labels) >= len(self.classes)):
            raise DataError(f"{name} labels in '{base}' fall outside 0..{len(self.classes) - 1}.")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # Copy so that in-place transforms can never alter the in-memory dataset.
        return torch.from_numpy(self.data[index].copy()), self.targets[index]

    def image_size(self) -> str:
        return "32x32"


# ----------------------------------------------------------------------------- STL-10

class STL10Source(ImageSource):
    """STL-10 binaries, memory-mapped (the unlabelled split alone is 2.7 GB)."""

    _PIXELS = 3 * 96 * 96

    def __init__(self, root: str | Path, split: str = "train"):
        root = Path(root)
        base = root / "stl10_binary" if (root / "stl10_binary").is_dir() else root
        parts = {"train": [("train_X.bin", "train_y.bin")], "val": [("test_X.bin", "test_y.bin")],
                 "unlabelled": [("unlabeled_X.bin", None)],
                 "train+unlabelled": [("train_X.bin", "train_y.bin"), ("unlabeled_X.bin", None)]}[split]
        needed = [f for pair in parts for f in pair if f]
        missing = [f for f in needed if not (base / f).is_file()]
        if missing:
            raise DataError(f"STL-10 root '{base}' is incomplete: missing {', '.join(missing)} "
                            "(expected ROOT/stl10_binary/ from the binary version of STL-10).")
        self.split = split
        names = base / "class_names.txt"
        self.classes = ([ln.strip() for ln in names.read_text().splitlines() if ln.strip()]
                        if names.is_file() else list(STL10_CLASSES))
        self._files: list[Path] = []
        self._offsets: list[int] = []  # index of each file's first image
        self.targets = []
        for x_name, y_name in parts:
            size = (base / x_name).stat().st_size
            if size == 0 or size % self._PIXELS:
                raise DataError(f"'{base / x_name}' has {size} bytes: expected a non-zero multiple of "
                                "27648 (96x96x3 images).")
            count = size // self._PIXELS
            if y_name:
                y = np.fromfile(base / y_name, dtype=np.uint8).astype(np.int64) - 1  # files are 1-based
                if len(y) != count or (count and (y.min() < 0 or y.max() >= len(self.classes))):
                    raise DataError(f"'{base / y_name}' does not match '{x_name}': expected {count} "
                                    f"labels in 1..{len(self.classes)}.")
                self.targets.extend(y.tolist())
            else:
                self.targets.extend([-1] * count)
            self._offsets.append(len(self.targets) - count)
            self._files.append(base / x_name)
        self._maps: list[np.memmap] | None = None

    def _images(self) -> list[np.memmap]:
        if self._maps is None:  # opened lazily so each DataLoader worker maps the files itself
            self._maps = [np.memmap(f, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96)
                          for f in self._files]
        return self._maps

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = None  # never pickle gigabytes of mapped pixels into worker processes
        return state

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < 0:
            index += len(self.targets)
        k = max(i for i, off in enumerate(self._offsets) if off <= index)
        raw = self._images()[k][index - self._offsets[k]]
        # Stored column-major: transpose H and W exactly as torchvision's STL10 does.
        return torch.from_numpy(np.ascontiguousarray(raw.transpose(0, 2, 1))), self.targets[index]

    def image_size(self) -> str:
        return "96x96"


# ----------------------------------------------------------------------------- IDX (MNIST family)

def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): magic 0x0000 | type 0x08 (ubyte) | ndim, then dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"Cannot read IDX file '{path}' ({e}).") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(f"'{path}' is not an unsigned-byte IDX file with {ndim} dimension(s) "
                        f"(bad magic number {raw[:4].hex() or 'none'}).")
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != header + int(np.prod(dims)):
        raise DataError(f"'{path}' holds {len(raw) - header} data bytes but its header says "
                        f"{'x'.join(map(str, dims))}: the file is truncated or corrupt.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    """Find `stem` (or its '.'-separated variant, optionally .gz) in root or one sub-folder level."""
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    variants = [stem, stem.replace("-idx", ".idx")]
    for folder in folders:
        for v in variants:
            for name in (v, v + ".gz"):
                if (folder / name).is_file():
                    return folder / name
    return None


class IdxSource(ImageSource):
    """MNIST / Fashion-MNIST from IDX files; grayscale replicated to 3 channels."""

    def __init__(self, root: str | Path, split: str = "train", fashion: bool = True):
        root = Path(root)
        name = "Fashion-MNIST" if fashion else "MNIST"
        if not root.is_dir():
            raise DataError(f"{name} root '{root}' is not a folder.")
        if split not in ("train", "val"):
            raise no_split_error(name, split)
        prefix = "train" if split == "train" else "t10k"
        stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
        found = [_find_idx(root, s) for s in stems]
        missing = [s for s, p in zip(stems, found) if p is None]
        if missing:
            raise DataError(f"{name} root '{root}' is incomplete: missing {', '.join(missing)} "
                            "(plain or .gz, in ROOT or one sub-folder).")
        self.split = split
        self.images = _read_idx(found[0], 3)  # type: ignore[arg-type]
        labels = _read_idx(found[1], 1)  # type: ignore[arg-type]
        if len(labels) != len(self.images):
            raise DataError(f"{name}: {len(self.images)} images but {len(labels)} labels in '{root}'.")
        self.classes = list(FASHION_MNIST_CLASSES) if fashion else [str(i) for i in range(10)]
        self.targets = [int(x) for x in labels]
        if self.targets and max(self.targets) >= len(self.classes):
            raise DataError(f"{name} labels in '{found[1]}' exceed {len(self.classes) - 1}.")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(self.images[index].copy())
        return img.unsqueeze(0).repeat(3, 1, 1), self.targets[index]

    def image_size(self) -> str:
        return f"{self.images.shape[1]}x{self.images.shape[2]}" if len(self.images) else "-"
