"""`--format onnx`: the backbone for one fixed input size, any batch, checked with onnxruntime.

ViT: the graph is traced from a timm model built for that size with `dynamic_img_size=False`, its
position embeddings resampled once here with the same function timm's dynamic path calls at run
time (`resample_abs_pos_embed`, bicubic, antialiased). The ONNX graph then holds no interpolation
at all — the step that commonly breaks ViT exports. Swin: built for 224 px with
`strict_img_size=False`, its windows depend on the input size, so the model glsd trained is traced
as it is at the requested size (a Swin rebuilt for another size would window differently).

The TorchScript exporter (`dynamo=False`) is used: on torch 2.14 it exports ViT and Swin in
seconds, the dynamo exporter takes minutes for Swin-T and gives the same numbers.
"""
from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch import nn

from glsd_cli.errors import GlsdError
from glsd_cli.export import describe
from glsd_cli.export.files import Staging
from glsd_cli.export.spec import EXPORT_FILE, BackboneSpec, build_timm_model, random_images, reference_backbone
from glsd_cli.export.weights import max_abs_diff

OPSET = 17  # LayerNormalization is a single op from 17; every current onnxruntime runs it
CHECK_BATCHES = (3, 1)  # both differ from the traced batch of 2, so the dynamic batch axis is exercised


def fixed_size_model(spec: BackboneSpec, size: int) -> nn.Module:
    if not spec.kwargs.get("dynamic_img_size") or "pos_embed" not in spec.state:
        return build_timm_model(spec)  # nothing to resolve: traced as glsd runs it, at this size
    from timm.layers import resample_abs_pos_embed

    model = build_timm_model(spec)  # glsd's construction: tells the patch grid and prefix tokens
    pos = spec.state["pos_embed"]
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    old_grid = tuple(model.patch_embed.grid_size)
    patch = model.patch_embed.patch_size
    new_grid = (size // patch[0], size // patch[1])
    if new_grid != old_grid:
        pos = resample_abs_pos_embed(pos, new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=prefix)
    fixed = replace(spec, state={**spec.state, "pos_embed": pos.contiguous()})
    return build_timm_model(fixed, img_size=size, dynamic_img_size=False)


@torch.no_grad()
def export_onnx(spec: BackboneSpec, staging: Staging, image_size: int | None, tolerance: float) -> dict:
    try:
        import onnx  # noqa: F401  (the TorchScript exporter needs it)
        import onnxruntime as ort
    except ImportError as e:
        raise GlsdError(f"--format onnx needs onnx and onnxruntime to export and check the model "
                        f"(pip install 'glsd[onnx]'): {e}") from None
    size = spec.image_size if image_size is None else int(image_size)
    reference = reference_backbone(spec)
    if size <= 0 or (spec.is_vit and size % reference.patch_size):
        raise GlsdError(f"--image-size {size} must be a positive multiple of the patch size "
                        f"({reference.patch_size if spec.is_vit else 1})")
    model = fixed_size_model(spec, size)

    tmp = staging.path("model.onnx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter, not actionable by users
            torch.onnx.export(model, (random_images(2, size),), str(tmp), dynamo=False, opset_version=OPSET,
                              input_names=["image"], output_names=["features"],
                              dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}})
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    except Exception as e:  # exporter/runtime failures come in many types; all mean "no usable file"
        raise GlsdError(f"ONNX export of {spec.arch} at {size}x{size} failed: {str(e).splitlines()[0]}") from None

    diff, num_features = 0.0, None
    for seed, batch in enumerate(CHECK_BATCHES, start=1):
        x = random_images(batch, size, seed=seed)
        try:
            expected = reference(x)
        except Exception as e:
            raise GlsdError(f"{spec.arch} does not run at {size}x{size}: {str(e).splitlines()[0]}") from None
        got = torch.from_numpy(session.run(["features"], {"image": x.numpy()})[0])
        diff = max(diff, max_abs_diff(expected, got))
        num_features = int(expected.shape[-1])
    if not diff <= tolerance:  # also catches NaN and a wrong output shape (inf)
        raise GlsdError(f"the ONNX model differs from PyTorch by up to {diff:.2e} on random inputs "
                        f"(tolerance {tolerance:.0e}); nothing was written")

    check = {"max_abs_diff": diff, "tolerance": tolerance, "num_inputs": sum(CHECK_BATCHES),
             "how": "onnxruntime (CPU) vs glsd's PyTorch backbone on random inputs, batches " +
                    ", ".join(map(str, CHECK_BATCHES))}
    staging.write_json(EXPORT_FILE, describe.export_record(
        spec, "onnx", "model.onnx", num_features, size, check, opset=OPSET,
        input={"name": "image", "shape": ["batch", 3, size, size], "dtype": "float32"},
        output={"name": "features", "shape": ["batch", num_features], "dtype": "float32"}))
    staging.write_bytes("README.md", describe.onnx_readme(spec, staging.out, num_features, size, check).encode())
    return {"num_features": num_features, "max_abs_diff": diff, "image_size": size,
            "summary": f"onnxruntime vs PyTorch on {sum(CHECK_BATCHES)} random {size}x{size} inputs: "
                       f"max |diff| = {diff:.1e} (tolerance {tolerance:.0e})"}
