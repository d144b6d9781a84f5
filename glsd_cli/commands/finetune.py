"""`glsd finetune`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from glsd_cli.errors import GlsdError


def command(checkpoint: Annotated[Path, typer.Argument(help="a run directory or checkpoint")]) -> None:
    """Fine-tune the backbone with a classifier (DeiT/BEiT recipe). Not implemented yet (issue 5)."""
    raise GlsdError("`glsd finetune` is not implemented yet (tracked in issue 5)")
