"""`--format timm` (the backbone under timm's key names) and `--format safetensors` (everything)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from glsd_cli.config import Config
from glsd_cli.engine.checkpoint import load_state_strict, read_checkpoint, save_tensors, sub_dict
from glsd_cli.errors import CheckpointError, GlsdError
from glsd_cli.export import describe
from glsd_cli.export.files import Staging
from glsd_cli.export.spec import (EXPORT_FILE, BackboneSpec, build_timm_model, locate, random_images,
                                  reference_backbone)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.double() - b.double()).abs().max())


def load_with_timm(folder: Path) -> torch.nn.Module:
    """The user's path, exactly as the README writes it: `timm.create_model("local-dir:...", pretrained=True)`."""
    import timm

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    except (RuntimeError, ValueError, KeyError, TypeError, FileNotFoundError) as e:
        raise GlsdError(f"timm cannot load the export folder strictly: {str(e).splitlines()[0]}") from None
    return model.eval()


def write_timm_config(spec: BackboneSpec, path: Path) -> None:
    """config.json as timm writes it for its own folders (`save_config_for_hf`, what `push_to_hf_hub`
    uses): architecture, num_classes, num_features, model_args and the pretrained_cfg with glsd's
    preprocessing."""
    from timm.models._hub import save_config_for_hf

    model = build_timm_model(spec, pretrained_cfg_overlay=describe.timm_pretrained_cfg(spec.image_size))
    save_config_for_hf(model, Path(path), model_args=dict(spec.kwargs))


@torch.no_grad()
def export_timm(spec: BackboneSpec, staging: Staging, tolerance: float) -> dict:
    info = {"architecture": spec.arch, "model_kwargs": spec.kwargs, "image_size": spec.image_size,
            "which": spec.which, "layer": spec.layer, "source": describe.source_summary(spec)}
    # glsd metadata rides along in the weights (timm ignores it), so the file alone is enough for load_backbone.
    save_tensors(staging.path("model.safetensors"), spec.state,
                 {"kind": "export-timm", "config": spec.config.to_json(), "export": json.dumps(info)})
    write_timm_config(spec, staging.path("config.json"))

    model = load_with_timm(staging.folder)
    x = random_images(2, spec.image_size)
    ours, theirs = reference_backbone(spec)(x), model(x)
    diff = max_abs_diff(ours, theirs)
    if not diff <= tolerance:  # also catches NaN
        raise GlsdError(f"timm's model differs from glsd's backbone by up to {diff:.2e} (tolerance {tolerance:.0e}); "
                        "nothing was written")
    num_features = int(theirs.shape[-1])
    check = {"max_abs_diff": diff, "tolerance": tolerance, "num_inputs": 2,
             "how": 'timm.create_model("local-dir:<export>", pretrained=True) vs glsd\'s Backbone'}
    staging.write_json(EXPORT_FILE, describe.export_record(
        spec, "timm", "model.safetensors", num_features, spec.image_size, check))
    staging.write_bytes("README.md", describe.timm_readme(spec, staging.out, num_features).encode())
    return {"num_features": num_features, "max_abs_diff": diff,
            "summary": f"timm local-dir strict load checked against glsd's backbone: max |diff| = {diff:.1e}"}


def read_full(path: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """(file, model tensors, metadata) of a pre-training checkpoint or an earlier full export."""
    file = locate(path)
    tensors, meta = read_checkpoint(file)
    if meta.get("kind") not in ("pretrain", "export-full"):
        raise CheckpointError(f"{file} is of kind '{meta.get('kind')}'; --format safetensors needs a pre-training "
                              "checkpoint (a run directory or its .safetensors)")
    return file, {k: v for k, v in tensors.items() if k.startswith("model/")}, meta


def export_full(file: Path, model: dict[str, torch.Tensor], meta: dict[str, str], staging: Staging) -> dict:
    """All `model/` tensors (optimiser and RNG state left out) with the config and training position."""
    cfg = Config.from_json(meta["config"])
    tmp = staging.path("model.safetensors")
    save_tensors(tmp, model, {"kind": "export-full", "config": meta["config"],
                              "position": meta.get("position", "null"), "source": str(file)})

    # Read back what was written and load it strictly into a freshly built method: the file is complete.
    from glsd_cli.methods import build_method

    back, back_meta = read_checkpoint(tmp)
    if set(back) != set(model) or not all(torch.equal(back[k], model[k]) for k in model):
        raise GlsdError("the written file does not read back identically; nothing was written")
    load_state_strict(build_method(cfg), sub_dict(back, "model/"), f"the full export of {file}")

    position = json.loads(meta.get("position") or "null")
    staging.write_json(EXPORT_FILE, {
        describe.EXPORT_MARKER: describe.LAYOUT_VERSION, "format": "safetensors", "weights": "model.safetensors",
        "kind": "export-full", "architecture": cfg.model.arch, "method": cfg.method.name,
        "num_tensors": len(model), "key_prefix": "model/",
        "source": {"checkpoint": str(file), "kind": meta.get("kind"), "position": position},
        "glsd_version": describe._version(), "glsd_config": json.loads(cfg.to_json())})
    staging.write_bytes("README.md", describe.full_readme(json.loads(cfg.to_json()), str(file), staging.out,
                                                          len(model)).encode())
    return {"num_tensors": len(model),
            "summary": f"{len(model)} tensors (student, teacher, heads, centres); loads strictly into a fresh "
                       f"'{cfg.method.name}' method"}
