"""glsd_export.json and README.md of an export folder: what it holds, where it came from, and the
exact code that loads it; and the preprocessing a timm export's config.json declares."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glsd_cli.export.spec import EXPORT_FILE, EXPORT_MARKER, BackboneSpec

# 2: glsd's record moved from config.json to glsd_export.json; a timm export's config.json is timm's.
LAYOUT_VERSION = 2


def _version() -> str:
    from glsd_cli import __version__

    return __version__


def source_summary(spec: BackboneSpec) -> dict[str, Any]:
    """Where the weights were trained: a re-export points at the original checkpoint, not the export."""
    if "exported_from" in spec.source:
        return spec.source["exported_from"]
    return {"checkpoint": spec.source["file"], "kind": spec.source["kind"], "position": spec.source.get("position")}


def preprocessing(size: int) -> dict[str, Any]:
    """glsd's evaluation transform (EvalTransform), spelled out for other code."""
    from glsd_cli.data.multicrop import IMAGENET_MEAN, IMAGENET_STD

    return {"resize_shorter_side": int(round(size * 256 / 224)), "interpolation": "bicubic",
            "center_crop": size, "scale": "1/255", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def timm_pretrained_cfg(size: int) -> dict[str, Any]:
    """timm's pretrained_cfg fields for glsd's evaluation transform, written into config.json so that
    `timm.data.resolve_data_config(model=...)` gives it. timm resizes to floor(size / crop_pct), glsd
    to round(size·256/224): the same at 224 px (256) and for most sizes, one pixel apart for some."""
    from glsd_cli.data.multicrop import IMAGENET_MEAN, IMAGENET_STD

    return {"input_size": (3, size, size), "interpolation": "bicubic", "crop_pct": 224 / 256, "crop_mode": "center",
            "mean": tuple(IMAGENET_MEAN), "std": tuple(IMAGENET_STD), "num_classes": 0,
            # the architecture's defaults describe timm's own weights: not these
            "tag": None, "license": None}


def export_record(spec: BackboneSpec, fmt: str, weights: str, num_features: int, input_size: int,
                  check: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """glsd_export.json of a backbone export: what was exported, from which run, and how it was checked."""
    prep = preprocessing(input_size)
    return {
        EXPORT_MARKER: LAYOUT_VERSION, "format": fmt, "weights": weights,
        "architecture": spec.arch, "model_kwargs": spec.kwargs,
        "backbone": spec.which, "layer": spec.layer, "num_blocks": spec.num_blocks,
        "representation": spec.representation, "num_features": num_features,
        "input_size": [3, input_size, input_size], "mean": prep["mean"], "std": prep["std"], "preprocessing": prep,
        **extra, "check": check, "source": source_summary(spec), "glsd_version": _version(),
        "glsd_config": json.loads(spec.config.to_json()),
    }


def _call_kwargs(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _header(spec: BackboneSpec, what: str, num_features: int) -> str:
    src = source_summary(spec)
    epoch = (src.get("position") or {}).get("epoch")
    trained = f" after {epoch} epochs" if epoch is not None else ""
    return (f"# {spec.describe()} exported by glsd\n\n"
            f"{what} of `{src['checkpoint']}`{trained}. Output: {num_features}-d features per image, "
            f"the {spec.representation}.\n")


def _preprocessing_text(size: int) -> str:
    p = preprocessing(size)
    return (f"Inputs: RGB float images, shorter side resized to {p['resize_shorter_side']} px ({p['interpolation']}), "
            f"centre-cropped to {size}x{size}, scaled to [0, 1], normalised with mean {p['mean']} and "
            f"std {p['std']} (glsd's evaluation transform).\n")


def timm_readme(spec: BackboneSpec, out: Path, num_features: int) -> str:
    dir_line = f'DIR = "{out.resolve()}"  # this folder'
    size_note = ("any input size works: position embeddings are interpolated (dynamic_img_size=True)"
                 if spec.kwargs.get("dynamic_img_size") else
                 "inputs other than the build size are padded to whole windows (strict_img_size=False), as in training")
    return f"""{_header(spec, "Backbone weights (timm's own folder format)", num_features)}
Load it with timm (1.0.16 or later), which reads the architecture, its arguments and the
preprocessing from config.json and loads model.safetensors strictly:

```python
import timm

{dir_line}
model = timm.create_model(f"local-dir:{{DIR}}", pretrained=True).eval()
```

`features = model(images)` gives a (batch, {num_features}) tensor; {size_note}.
`timm.data.resolve_data_config(model=model)` gives the preprocessing below. The same folder pushed
to the Hugging Face Hub loads with `timm.create_model("hf-hub:USER/REPO", pretrained=True)`.

Or without timm's loader:

```python
import timm
from safetensors.torch import load_file

{dir_line}
model = timm.create_model({spec.arch!r}, pretrained=False, {_call_kwargs(spec.kwargs)}).eval()
model.load_state_dict(load_file(f"{{DIR}}/model.safetensors"), strict=True)
```

Or with glsd: `glsd_cli.load_backbone(DIR)`; `glsd_cli.extract_features(DIR, "path/to/images")`.

{_preprocessing_text(spec.image_size)}
{EXPORT_FILE} (timm ignores it) holds glsd's record: the run's config, the checkpoint the weights
came from and the check made at export.
"""


def onnx_readme(spec: BackboneSpec, out: Path, num_features: int, size: int, check: dict[str, Any]) -> str:
    return f"""{_header(spec, "An ONNX model of the backbone", num_features)}
Fixed input size {size}x{size} (position embeddings resolved for it), any batch size. Input `image`:
float32 (batch, 3, {size}, {size}); output `features`: float32 (batch, {num_features}).
At export, onnxruntime matched PyTorch within {check['max_abs_diff']:.2e} (tolerance {check['tolerance']:.0e}) on
{check['num_inputs']} random inputs.

```python
import numpy as np
import onnxruntime as ort

DIR = "{out.resolve()}"  # this folder
session = ort.InferenceSession(f"{{DIR}}/model.onnx", providers=["CPUExecutionProvider"])
images = np.zeros((2, 3, {size}, {size}), dtype=np.float32)  # your preprocessed images
features = session.run(["features"], {{"image": images}})[0]
```

{_preprocessing_text(size)}"""


def full_readme(meta_config: dict[str, Any], source: str, out: Path, num_tensors: int) -> str:
    return f"""# Full model state exported by glsd

Every tensor of the pre-training method in `{source}` ({num_tensors} tensors): student and teacher
backbones, their heads and the loss centres, for continued self-supervised training elsewhere. The
optimiser and RNG states are left out. Method: {meta_config['method']['name']}, backbone
{meta_config['model']['arch']}.

Keys are the method's `state_dict()` keys behind a `model/` prefix (e.g.
`model/teacher.backbone.model.cls_token`); the `timm` model of either backbone is under
`model/teacher.backbone.model.` / `model/student.backbone.model.`. The safetensors metadata holds
the resolved glsd config (`config`, JSON) and the training position (`position`).

```python
from safetensors import safe_open
from glsd_cli.config import Config
from glsd_cli.methods import build_method

DIR = "{out.resolve()}"  # this folder
with safe_open(f"{{DIR}}/model.safetensors", framework="pt") as f:
    meta = f.metadata()
    state = {{k[len("model/"):]: f.get_tensor(k) for k in f.keys()}}
method = build_method(Config.from_json(meta["config"]))
method.load_state_dict(state, strict=True)
```

`glsd_cli.load_backbone(DIR)` returns the teacher backbone as a timm model (`which="student"` for the student).
"""
