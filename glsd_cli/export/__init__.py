"""Export a trained backbone for downstream use (`glsd export`).

Formats (all written to one folder with a glsd_export.json — what was exported, from which run, how
it was checked — and a README.md):
- timm:        timm's own folder format: model.safetensors under timm's key names and the config.json
               timm writes, so `timm.create_model("local-dir:FOLDER", pretrained=True)` loads it strictly;
- onnx:        model.onnx for one fixed input size and any batch, checked against PyTorch with onnxruntime;
- safetensors: every tensor of the pre-training method (student, teacher, heads, centres) with its config.
Each export checks itself before anything is moved into place (see files.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from glsd_cli.errors import GlsdError

FORMATS = ("timm", "onnx", "safetensors")


@dataclass
class ExportResult:
    out: Path
    format: str
    files: list[str]
    summary: list[str] = field(default_factory=list)  # lines for the CLI
    details: dict = field(default_factory=dict)


def run_export(checkpoint: str | Path, fmt: str, out: str | Path, *, student: bool = False,
               layer: int | None = None, image_size: int | None = None, tolerance: float = 1e-4,
               force: bool = False) -> ExportResult:
    fmt = fmt.strip().lower()
    if fmt not in FORMATS:
        raise GlsdError(f"unknown export format '{fmt}': choose one of {', '.join(FORMATS)}")
    if fmt == "safetensors" and (student or layer is not None or image_size is not None):
        raise GlsdError("--student, --layer and --image-size choose a backbone; --format safetensors writes the "
                        "whole model (both backbones and heads)")
    if fmt == "timm" and image_size is not None:
        raise GlsdError("--image-size is for --format onnx; a timm export keeps the model's own input handling")
    if not tolerance > 0:
        raise GlsdError(f"--tolerance must be positive, got {tolerance}")

    from glsd_cli.export.files import Staging
    from glsd_cli.export.spec import read_backbone

    out = Path(out)
    # The input is checked before the output folder: a bad checkpoint never touches --out.
    if fmt == "safetensors":
        from glsd_cli.export.weights import read_full

        full = read_full(checkpoint)
    else:
        spec = read_backbone(checkpoint, "student" if student else "teacher", layer)
    source_file = Path(full[0] if fmt == "safetensors" else spec.source["file"])
    if source_file.resolve().parent == out.resolve():
        raise GlsdError(f"--out {out} is the folder the checkpoint is read from; choose another folder")
    with Staging(out, force) as staging:
        if fmt == "safetensors":
            from glsd_cli.export.weights import export_full

            details = export_full(*full, staging)
            what = "full model state"
        elif fmt == "timm":
            from glsd_cli.export.weights import export_timm

            details = export_timm(spec, staging, tolerance)
            what = f"{spec.describe()}, {details['num_features']}-d features"
        else:
            from glsd_cli.export.onnx_format import export_onnx

            details = export_onnx(spec, staging, image_size, tolerance)
            what = f"{spec.describe()}, {details['image_size']}x{details['image_size']} input, " \
                   f"{details['num_features']}-d features"
        files = staging.commit()
    summary = [f"exported {what} as {fmt} to {out}", f"  check: {details['summary']}",
               f"  files: {', '.join(sorted(files))}"]
    return ExportResult(out, fmt, files, summary, details)
