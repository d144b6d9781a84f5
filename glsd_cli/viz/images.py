"""The one image a picture is made of: a file of any format Pillow reads, or `synthetic:INDEX`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from glsd_cli.errors import DataError

SYNTHETIC_PREFIX = "synthetic:"


def read_image(spec: str, synthetic_size: int = 224) -> torch.Tensor:
    """uint8 (3, H, W) RGB. `synthetic:INDEX` renders the built-in data's val image INDEX at
    `synthetic_size` px, so the commands can be tried without an image at hand."""
    if spec.startswith(SYNTHETIC_PREFIX):
        return _synthetic(spec[len(SYNTHETIC_PREFIX):], synthetic_size)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"image {path} does not exist")
    if not path.is_file():
        raise DataError(f"image {path} is not a file")
    from PIL import Image

    try:
        with Image.open(path) as im:
            # convert() decodes fully: a truncated file fails here, not later while drawing.
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, OSError, DecompressionBombError, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot read {path} as an image ({reason})") from None
    if arr.ndim != 3 or min(arr.shape[:2]) < 1:
        raise DataError(f"image {path} is empty")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _synthetic(body: str, size: int) -> torch.Tensor:
    from glsd_cli.data.synthetic import SyntheticTextures

    if not body.strip().isdigit():
        raise DataError(f"'synthetic:{body}' is not an image: expected synthetic:INDEX with INDEX a number, e.g. synthetic:3")
    index = int(body)
    source = SyntheticTextures("val", size=max(8, size))
    if index >= len(source):
        raise DataError(f"synthetic:{index} does not exist: the built-in val set has images 0..{len(source) - 1}")
    return source[index][0]
