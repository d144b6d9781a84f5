"""The export folder: refuse to clobber, stage every file, move them in only once all checks passed.

Rules (so that an export never loses what is already on disk):
- a non-empty folder is refused unless --force;
- even with --force, files named like an export's (model.*, config.json, README.md) are replaced
  only when the folder's config.json says glsd export wrote them — a run directory, whose
  config.json is the run's, is always refused; other files in the folder are left alone;
- files are written as hidden temporaries first; a failed check deletes them and leaves the folder
  as it was (and removes it again if the export created it).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from glsd_cli.errors import GlsdError
from glsd_cli.export.spec import read_export_config

EXPORT_FILES = ("model.safetensors", "model.onnx", "config.json", "README.md")


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
    """Collects an export's files as temporaries in `out`; `commit()` moves them to their names."""

    def __init__(self, out: Path, force: bool):
        self.out = Path(out)
        self.replaces_export = check_out_dir(self.out, force)
        self.created = not self.out.exists()
        self.staged: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        """Where to write `name` for now; the suffix is kept (timm picks its loader by extension)."""
        self.out.mkdir(parents=True, exist_ok=True)
        stem, dot, ext = name.rpartition(".")
        tmp = self.out / f".{stem}.tmp-{os.getpid()}{dot}{ext}"
        self.staged[name] = tmp
        return tmp

    def write_bytes(self, name: str, data: bytes) -> None:
        self.path(name).write_bytes(data)

    def write_json(self, name: str, obj: dict) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2) + "\n").encode())

    def commit(self) -> list[str]:
        """Move the staged files in (weights first, config.json last: a folder with a config.json is
        complete), and drop an earlier export's files this one does not rewrite."""
        order = sorted(self.staged, key=lambda n: (n == "config.json", n))
        for name in order:
            os.replace(self.staged[name], self.out / name)
        if self.replaces_export:
            for name in EXPORT_FILES:
                if name not in self.staged:
                    (self.out / name).unlink(missing_ok=True)
        written = list(order)
        self.staged = {}
        return written

    def discard(self) -> None:
        for tmp in self.staged.values():
            tmp.unlink(missing_ok=True)
        self.staged = {}
        if self.created and self.out.is_dir() and not any(self.out.iterdir()):
            shutil.rmtree(self.out, ignore_errors=True)

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.staged:
            self.discard()
