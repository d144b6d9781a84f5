"""One tiny pre-trained run shared by the evaluation tests (pre-trained once per session, through the CLI).

Tests that change files of the run (its checkpoint, its feature cache) work on `copy_run(...)`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from tests.cli_helpers import invoke
from tests.conftest import TINY_OVERRIDES

_CACHE: dict[str, Path] = {}


cli = invoke  # the real entry point in-process; returns the exit code


def pretrained_run(tmp_path_factory) -> Path:
    """The run directory of `glsd pretrain` with the tiny test config (2 blocks, 16-px images)."""
    if "run" not in _CACHE:
        out = tmp_path_factory.mktemp("eval-run")
        sets = [arg for item in TINY_OVERRIDES for arg in ("--set", item)]
        assert cli(["pretrain", "--out", str(out), "--name", "run", "--quiet", *sets]) == 0
        _CACHE["run"] = out / "run"
    return _CACHE["run"]


def copy_run(run: Path, dest: Path) -> Path:
    """A private copy of the run's checkpoint and config (no results, no feature cache)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("last.safetensors", "config.json"):
        shutil.copy2(run / name, dest / name)
    return dest
