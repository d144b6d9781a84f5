"""`glsd linear-eval`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from glsd_cli.errors import GlsdError


def command(checkpoint: Annotated[Path, typer.Argument(help="a run directory or checkpoint")]) -> None:
    """Linear probe on frozen features (DINO protocol). Not implemented yet (issue 5)."""
    raise GlsdError("`glsd linear-eval` is not implemented yet (tracked in issue 5)")
