"""`glsd export`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from glsd_cli.errors import GlsdError


def command(checkpoint: Annotated[Path, typer.Argument(help="a run directory or checkpoint")]) -> None:
    """Export the backbone for downstream use (timm safetensors, ONNX). Not implemented yet (issue 6)."""
    raise GlsdError("`glsd export` is not implemented yet (tracked in issue 6)")
