"""Run the real `glsd` entry point in-process and capture its exit code and output."""
from __future__ import annotations

import sys

import pytest

from glsd_cli.cli import main


def invoke(args: list[str]) -> int:
    """The real entry point in-process with `args`; returns its exit code (output goes to pytest's capture)."""
    old = sys.argv
    sys.argv = ["glsd", *args]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
            raise SystemExit(0)
    finally:
        sys.argv = old
    return int(exc.value.code or 0)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = invoke(args)
    out, err = capsys.readouterr()
    return code, out, err
