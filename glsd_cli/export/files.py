"""The export folder: refuse to clobber, stage every file, move them in only once all checks passed.

Rules (so that an export never loses what is already on disk):
- a non-empty folder is refused unless --force;
- even with --force, files named like an export's (model.*, config.json, glsd_export.json,
  README.md) are replaced only when the folder's glsd_export.json says glsd export wrote them — a
  run directory, whose config.json is the run's, is always refused; other files are left alone;
- files are written under their final names into a hidden staging folder inside the out folder
  first, so the checks load exactly what users will (timm's `local-dir:` reads a folder); a failed
  check deletes it and leaves the folder as it was (and removes it again if the export created it).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from glsd_cli.errors import GlsdError
from glsd_cli.export.spec import EXPORT_FILE, read_export_config

EXPORT_FILES = ("model.safetensors", "model.onnx", "config.json", EXPORT_FILE, "README.md")


def check_out_dir(out: Path, force: bool) -> bool:
    """Raise when `out` must not be written; True when it holds an earlier export (to be replaced)."""
    if out.exists() and not out.is_dir():
        raise GlsdError(f"--out {out} is a file; give a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return False
    if not force:
        raise GlsdError(f"{out} is not empty; pass --force to replace an earlier export there, or choose another --out")
    earlier_export = read_export_config(out) is not None
    ours = [name for name in EXPORT_FILES if (out / name).exists()]
    if ours and not earlier_export:
        raise GlsdError(f"{out} holds {', '.join(ours)} that glsd export did not write (a run directory?); "
                        "--force replaces only an earlier export: choose another --out")
    return earlier_export


class Staging:
    """Collects an export's files in a hidden folder inside `out`; `commit()` moves them into `out`."""

    def __init__(self, out: Path, force: bool):
        self.out = Path(out)
        self.replaces_export = check_out_dir(self.out, force)
        self.created = not self.out.exists()
        self.folder = self.out / f".glsd-export-{os.getpid()}"  # same file system: the moves are renames
        self.staged: list[str] = []

    def path(self, name: str) -> Path:
        """Where to write `name` for now: the staging folder, under its final name."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if name not in self.staged:
            self.staged.append(name)
        return self.folder / name

    def write_bytes(self, name: str, data: bytes) -> None:
        self.path(name).write_bytes(data)

    def write_json(self, name: str, obj: dict) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2) + "\n").encode())

    def commit(self) -> list[str]:
        """Move the staged files in (weights first, glsd_export.json last: a folder with it is
        complete), and drop an earlier export's files this one does not rewrite."""
        order = sorted(self.staged, key=lambda n: (n == EXPORT_FILE, n))
        for name in order:
            os.replace(self.folder / name, self.out / name)
        if self.replaces_export:
            for name in EXPORT_FILES:
                if name not in self.staged:
                    (self.out / name).unlink(missing_ok=True)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.staged = []
        return order

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.staged = []
        if self.created and self.out.is_dir() and not any(self.out.iterdir()):
            shutil.rmtree(self.out, ignore_errors=True)

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.staged:
            self.discard()
