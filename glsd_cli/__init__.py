"""glsd: GLSD / SDSSL pre-training, evaluation and export of Vision Transformers.

Python API (see glsd_cli/api.py): `load_backbone(path)` → a ready timm model from any glsd
checkpoint or export; `extract_features(path_or_model, data)` → (features, labels). Both are
imported on first use, so `import glsd_cli` (and every `glsd` command) does not pay for torch.
"""
from __future__ import annotations

import os as _os
from importlib import metadata as _metadata

# OpenMP threads that spin while waiting for work steal the CPU from data-loading workers and from
# other processes: on a shared 2-core machine a training step ran 6x slower, a batch of multi-crop
# views 25x slower, than with passive waiting (measured; see README "CPU notes"). It must be set
# before torch loads OpenMP; a user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    __version__ = _metadata.version("glsd")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__", "extract_features", "load_backbone"]
_API = ("load_backbone", "extract_features")


def __getattr__(name: str):
    if name in _API:
        from glsd_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'glsd_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_API))
