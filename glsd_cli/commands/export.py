"""`glsd export`: the CLI face of glsd_cli/export (arguments in, summary lines out)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def command(
    checkpoint: Annotated[Path, typer.Argument(help="a run directory, a .safetensors checkpoint, or an earlier export folder")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder to write; refused when not empty unless --force")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="timm | onnx | safetensors")] = "timm",
    student: Annotated[bool, typer.Option("--student", help="export the student backbone instead of the teacher")] = False,
    layer: Annotated[Optional[int], typer.Option("--layer", help="keep only blocks 1..N of a ViT: its output is then block N's "
                                                  "CLS after the final norm (knn-eval --layers N); -1 = last")] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="onnx: the fixed input size (default: the training size)")] = None,
    tolerance: Annotated[float, typer.Option(help="largest |difference| allowed between the export and glsd's PyTorch backbone")] = 1e-4,
    force: Annotated[bool, typer.Option("--force", help="replace an earlier export in --out (other files there are kept)")] = False,
) -> None:
    """Export a backbone: timm-loadable safetensors, ONNX, or the full model state. Each export is checked before it is written."""
    from glsd_cli.export import run_export

    result = run_export(checkpoint, fmt, out, student=student, layer=layer, image_size=image_size,
                        tolerance=tolerance, force=force)
    for line in result.summary:
        typer.echo(line)
