"""Arguments and options that several subcommands take, so they read and parse the same everywhere."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Callable, TypeVar

import typer

from glsd_cli.errors import GlsdError

CheckpointArg = Annotated[Path, typer.Argument(help="a run directory or a .safetensors checkpoint")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]

Number = TypeVar("Number", int, float)


def parse_list(text: str, kind: Callable[[str], Number], what: str) -> tuple[Number, ...]:
    """'10,20, 100' -> (10, 20, 100); a one-line error naming the option otherwise."""
    try:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise GlsdError(f"{what} must be a comma-separated list of {noun}, got '{text}'") from None
