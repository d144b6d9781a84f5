"""Run the real `glsd` entry point in-process and capture its exit code and output."""
from __future__ import annotations

import sys

import pytest

from glsd_cli.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    old = sys.argv
    sys.argv = ["glsd", *args]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
            raise SystemExit(0)
        code = exc.value.code or 0
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return int(code), out, err
