"""One pydantic config tree for every command.

Defaults are DINO's ViT-S/16 100-epoch recipe (docs/algorithms.md §3); presets in `presets/*.toml`
(package data `glsd_cli/presets`, see pyproject.toml) set only what differs.
Overrides: `--set section.key=value` (values parsed as TOML, else string).
"""
from __future__ import annotations

import difflib
import json
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, published as tomli before it joined the standard library in 3.11
    import tomli as tomllib

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveInt, ValidationError, model_validator

from glsd_cli.errors import ConfigError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

DEFAULT_PRESET = "tiny-dino"

Auto = Literal["auto"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    arch: str = Field("vit_small_patch16_224", description="timm architecture name (created with pretrained=False)")
    patch_size: int | None = Field(None, description="override the architecture's patch size (tiny CPU models)")
    embed_dim: int | None = Field(None, description="override the embedding width (tiny CPU models)")
    depth: int | None = Field(None, description="override the number of transformer blocks")
    num_heads: int | None = Field(None, description="override the number of attention heads")
    drop_path_rate: float = Field(0.1, ge=0, lt=1, description="stochastic depth in the student (DINO: 0.1)")


class DataConfig(Section):
    train: str = Field("synthetic", description="dataset URI or path used for pre-training")
    global_crop_size: int = Field(224, gt=0, description="side of the global views in pixels")
    local_crop_size: int = Field(96, gt=0, description="side of the local views in pixels")
    num_local_crops: int = Field(8, ge=0, description="local views per image (DINO: 8)")
    global_crop_scale: tuple[float, float] = Field((0.4, 1.0), description="RandomResizedCrop area scale of global views")
    local_crop_scale: tuple[float, float] = Field((0.05, 0.4), description="RandomResizedCrop area scale of local views")
    color_jitter: bool = Field(True, description="colour jitter, grayscale, blur and solarize (off: geometry only)")
    batch_size: int = Field(64, gt=0, description="images per step over all processes")
    num_workers: int = Field(2, ge=0, description="data-loading worker processes")
    augment_on: Literal["auto", "workers", "device"] = Field(
        "auto", description="where colour jitter, grayscale, blur, solarize and normalisation run: workers (in "
                            "the loader, per image) or device (batched on the training device; workers only "
                            "decode and crop); auto: device on a GPU, workers on a CPU")
    fraction: float | None = Field(None, gt=0, le=1, description="keep this fraction of each class (low-data regimes)")
    per_class: int | None = Field(None, gt=0, description="keep this many images of each class")
    count: int | None = Field(None, gt=0, description="keep this many images in all (stratified)")
    classes_file: str | None = Field(None, description="a file with one class name per line to keep")
    subset_seed: int = Field(0, description="seed of the subset selection (independent of run.seed)")


class HeadConfig(Section):
    out_dim: Union[int, Auto] = Field(65536, description="prototypes K of the global DINO head ('auto': from data size)")
    hidden_dim: int = Field(2048, gt=0, description="hidden width of the head MLP")
    bottleneck_dim: int = Field(256, gt=0, description="bottleneck before the prototype layer")
    num_layers: int = Field(3, ge=1, description="MLP layers before the bottleneck")
    norm_last_layer: bool = Field(True, description="fix the weight-norm gain of the prototype layer to 1")
    freeze_last_layer_epochs: int = Field(1, ge=0, description="epochs during which the prototype layer is frozen")


class DinoLossConfig(Section):
    student_temp: float = Field(0.1, gt=0, description="student softmax temperature τ_s")
    teacher_temp: Union[float, Auto] = Field(0.04, description="final teacher temperature τ_t ('auto': from data size)")
    warmup_teacher_temp: float = Field(0.04, gt=0, description="teacher temperature at the start of its warm-up")
    warmup_teacher_temp_epochs: int = Field(0, ge=0, description="epochs of the linear teacher-temperature warm-up")
    center_momentum: float = Field(0.9, ge=0, lt=1, description="EMA momentum of the output centre")
    centering: Literal["ema", "sinkhorn"] = Field(
        "ema", description="teacher targets of the global and the local loss: ema (DINO's centres) or "
                           "sinkhorn (Sinkhorn-Knopp over the batch's images and tokens, as DINOv2)")
    sinkhorn_iterations: int = Field(3, ge=1, description="Sinkhorn-Knopp iterations (centering = sinkhorn)")
    koleo_weight: float = Field(
        0.0, ge=0, description="weight of the KoLeo term on the student's global-view CLS tokens (DINOv2: 0.1; 0 = off)")


class LocalConfig(Section):
    matching: Literal["none", "geometric", "similarity"] = Field(
        "none", description="how patch tokens of two views are paired: none (plain DINO), geometric (GLSD), similarity (EsViT)")
    hinge: bool = Field(True, description="geometric matching only: drop pairs farther than a token's half-diagonal")
    weight: float = Field(0.5, ge=0, le=1, description="w in L = (1 - w)·L_global + w·L_local")
    out_dim: Union[int, Auto] = Field(8192, description="prototypes of the dense head (iBOT uses 8192 for patch tokens)")
    chunk_tokens: Union[PositiveInt, Auto] = Field(
        "auto", description="student tokens per chunk of dense logits, rounded to whole images (at least one); "
                            "'auto': from the device's memory (CPU: 16 MiB chunks; GPU: a quarter of free memory)")
    recompute_above_mib: Union[NonNegativeFloat, Auto] = Field(
        "auto", description="recompute a chunk's dense logits in backward when its float32 logits exceed this "
                            "many MiB (0 = always); 'auto': CPU 32, GPU only when keeping every chunk's "
                            "buffers would take over a quarter of free memory")


class SDConfig(Section):
    enabled: bool = Field(False, description="self-distil intermediate layers toward the final layer (SDSSL)")
    layers: list[int] | Literal["all"] = Field("all", description="0-based blocks to distil; 'all' = every block but the last")
    ratio: float = Field(0.8, ge=0, description="r of the ramp λ(t) = r·(1 - cos(πt/T))/2")


class ContrastiveSDConfig(SDConfig):
    predictor_only_term: bool = Field(True, description="BYOL/MoCo v3: also train every predictor on detached projections")


class ContrastiveConfig(Section):
    temperature: float = Field(0.2, gt=0, description="InfoNCE / NT-Xent temperature")
    proj_hidden_dim: int = Field(4096, gt=0, description="hidden width of the final layer's projector")
    layer_proj_hidden_dim: int = Field(2048, gt=0, description="hidden width of the intermediate layers' projectors")
    pred_hidden_dim: int = Field(4096, gt=0, description="hidden width of the predictors (BYOL, MoCo v3)")
    out_dim: int = Field(256, gt=0, description="projection dimension")
    freeze_patch_embed: bool = Field(False, description="MoCo v3: keep the random patch embedding frozen")
    sincos_pos_embed: bool = Field(False, description="MoCo v3: fixed 2-D sin-cos position embeddings")


class DinoMethodConfig(Section):
    """DINO's global self-distillation, with GLSD's or EsViT's local loss and SDSSL's layer terms."""

    name: Literal["dino"] = Field(
        "dino", description="dino: global(-local) self-distillation; simclr/byol/mocov3: SDSSL's two-view methods")
    loss: DinoLossConfig = Field(default_factory=DinoLossConfig)
    local: LocalConfig = Field(default_factory=LocalConfig)
    sd: SDConfig = Field(default_factory=SDConfig)


class ContrastiveMethodConfig(Section):
    """SDSSL's two-view methods (SimCLR, BYOL, MoCo v3), with or without self-distillation."""

    name: Literal["simclr", "byol", "mocov3"]
    sd: ContrastiveSDConfig = Field(default_factory=ContrastiveSDConfig)
    contrastive: ContrastiveConfig = Field(default_factory=ContrastiveConfig)


# The method section holds the settings of the chosen method only (pydantic picks the model by
# `name`), so a setting that method would ignore is refused, not silently accepted.
MethodConfig = Annotated[Union[DinoMethodConfig, ContrastiveMethodConfig], Field(discriminator="name")]
METHOD_MODELS = {"dino": DinoMethodConfig, "simclr": ContrastiveMethodConfig, "byol": ContrastiveMethodConfig,
                 "mocov3": ContrastiveMethodConfig}


class OptimConfig(Section):
    lr: float = Field(5e-4, gt=0, description="learning rate per 256 images (scaled by batch_size/256)")
    min_lr: float = Field(1e-6, ge=0, description="final learning rate of the cosine decay")
    warmup_epochs: float = Field(10, ge=0, description="linear learning-rate warm-up")
    weight_decay: float = Field(0.04, ge=0, description="weight decay at the start (cosine to weight_decay_end)")
    weight_decay_end: float = Field(0.4, ge=0, description="weight decay at the end")
    clip_grad: float = Field(3.0, ge=0, description="per-parameter gradient norm clip (0: off)")
    momentum_teacher: Union[float, Auto] = Field(0.996, description="starting EMA momentum of the teacher (cosine to 1)")


class RunConfig(Section):
    epochs: int = Field(100, gt=0, description="training epochs")
    seed: int = Field(0, description="seed of initialisation and augmentation")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast precision; auto: bf16 on AMX/AVX512-BF16 CPUs and Ampere+ GPUs, fp16 on older GPUs, else fp32")
    out: str = Field("runs", description="parent folder of run directories")
    name: str | None = Field(None, description="run directory name (default: preset name and time)")
    checkpoint_every_steps: int = Field(0, ge=0, description="also checkpoint every N steps (0: epoch ends only)")
    log_every_steps: int = Field(10, gt=0, description="write a metrics.jsonl line every N steps")
    knn_monitor: bool = Field(True, description="k-NN accuracy on the held-out split at each epoch end when labels exist")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimiser step; data.batch_size is split among them")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="non-finite loss or gradient: stop (last good checkpoint kept) or skip the step and count it")
    max_bad_image_fraction: float = Field(0.01, ge=0, le=1, description="unreadable images tolerated per epoch before the run stops")
    compile: bool = Field(False, description="torch.compile the transformer blocks (faster steps after a slow first one)")


class Config(Section):
    description: str = Field("", description="one line shown by `glsd presets`")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    method: MethodConfig = Field(default_factory=DinoMethodConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="before")
    @classmethod
    def _dino_unless_named(cls, data: Any) -> Any:
        """A method section without a name is DINO's (the default method)."""
        if isinstance(data, dict) and isinstance(data.get("method"), dict) and "name" not in data["method"]:
            data = {**data, "method": {"name": "dino", **data["method"]}}
        return data

    @model_validator(mode="after")
    def _two_view_methods_use_no_dino_settings(self) -> "Config":
        """A two-view method ignores the DINO head and local crops: refuse them instead."""
        name = self.method.name
        if name == "dino":
            return self
        changed = [f"head.{k}" for k, v in self.head if v != HeadConfig.model_fields[k].default]
        if self.data.num_local_crops:
            changed.append("data.num_local_crops")
        if changed:
            raise ValueError(f"method '{name}' uses two global views and its own projector, not "
                             f"{' or '.join(changed)}: leave {'them' if len(changed) > 1 else 'it'} at "
                             f"the default{' (0 local crops)' if 'data.num_local_crops' in changed else ''}")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return validate(_one_method_layout(json.loads(text)), source="checkpoint config")


def _one_method_layout(data: Any) -> Any:
    """A checkpoint config written before the method section held one method's settings only (glsd
    before 2026-11-27 saved every method's sections with every run) → today's layout, so those runs
    still load: the other methods' sections go, and a two-view run's DINO head and local crops, which
    it never used, return to their defaults."""
    method = data.get("method") if isinstance(data, dict) else None
    if not isinstance(method, dict) or not {"loss", "local"} <= method.keys() or "contrastive" not in method:
        return data
    name = method.get("name", "dino")
    if name == "dino":
        sd = {k: v for k, v in method.get("sd", {}).items() if k != "predictor_only_term"}
        return {**data, "method": {"name": name, "loss": method["loss"], "local": method["local"], "sd": sd}}
    data = {**data, "method": {"name": name, "sd": method.get("sd", {}), "contrastive": method["contrastive"]},
            "head": {}}
    return {**data, "data": {**data.get("data", {}), "num_local_crops": 0}}


# ---------------------------------------------------------------- presets and overrides


def list_presets() -> dict[str, Traversable]:
    """The named presets shipped with glsd: the TOML files of the package `glsd_cli.presets`, found
    through the import system, so an installed wheel, an editable install and a source tree on
    PYTHONPATH each read their own."""
    folder = resources.files("glsd_cli") / "presets"
    files = [f for f in folder.iterdir() if f.name.endswith(".toml")] if folder.is_dir() else []
    return {f.name[: -len(".toml")]: f for f in sorted(files, key=lambda f: f.name)}


def _read_toml(path: Path | Traversable) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise ConfigError(f"cannot read preset {path}: {e.strerror}") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def preset_dict(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings of a preset given by name (in presets/) or by a path to a TOML file.

    A preset may start from another with `extends = "NAME"`: its own keys override the base's.
    """
    data = _preset_file_dict(name_or_path)
    base = data.pop("extends", None)
    if base is None:
        return data
    if base in _seen:
        raise ConfigError(f"preset '{name_or_path}' extends itself through {' -> '.join(_seen + (base,))}")
    return _merge(preset_dict(base, _seen + (name_or_path,)), data)


def _preset_file_dict(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"preset file {path} does not exist")
        return _read_toml(path)
    presets = list_presets()
    if name_or_path not in presets:
        hint = difflib.get_close_matches(name_or_path, presets, n=1)
        did = f" Did you mean '{hint[0]}'?" if hint else ""
        raise ConfigError(f"unknown preset '{name_or_path}'.{did} Run `glsd presets` to list them.")
    return _read_toml(presets[name_or_path])


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a config model (both methods' keys for the method section)."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if ann is not None and get_origin(ann) is Annotated:
            ann = get_args(ann)[0]
        members = get_args(ann) if get_origin(ann) is Union else (ann,)
        models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        if models:
            for m in models:
                keys += [k for k in _known_keys(m, f"{prefix}{name}.") if k not in keys]
        else:
            keys.append(prefix + name)
    return keys


def _suggest(key: str) -> str:
    hint = difflib.get_close_matches(key, _known_keys(Config), n=1, cutoff=0.5)
    if not hint:
        leaf = key.rsplit(".", 1)[-1]
        hint = [k for k in _known_keys(Config) if k.endswith("." + leaf)][:1]
    return f" Did you mean '{hint[0]}'?" if hint else ""


def validate(data: dict[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = list(err["loc"])
        method = None
        if loc[:1] == ["method"] and len(loc) > 1 and loc[1] in METHOD_MODELS:
            method = loc.pop(1)  # the union's tag: which method's section was being validated
        key = ".".join(str(p) for p in loc if not isinstance(p, int) or len(loc) == 1)
        if err["type"] == "extra_forbidden":
            if method is not None and key.count(".") >= 1 and _is_method_key(key):
                raise ConfigError(f"{source}: method '{method}' does not use '{key}' (a setting of "
                                  f"{_methods_using(key)}): remove it, or choose that method") from None
            raise ConfigError(f"{source}: unknown key '{key}'.{_suggest(key)}") from None
        if err["type"] == "union_tag_invalid":
            raise ConfigError(f"{source}: method.name: expected one of {', '.join(METHOD_MODELS)} "
                              f"(got {err.get('input', {}).get('name')!r})") from None
        if err["type"] == "value_error" and not loc:
            raise ConfigError(f"{source}: {str(err['msg']).removeprefix('Value error, ')}") from None
        raise ConfigError(f"{source}: {key}: {err['msg']} (got {err.get('input')!r})") from None


def _is_method_key(key: str) -> bool:
    return any(k == key or k.startswith(key + ".") for k in _known_keys(Config))


def _methods_using(key: str) -> str:
    names = [n for n, model in METHOD_MODELS.items()
             if any(k == key.removeprefix("method.") or k.startswith(key.removeprefix("method.") + ".")
                    for k in _known_keys(model))]
    return "method " + " / ".join(f"'{n}'" for n in names)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` → (['a', 'b'], value); the value is read as TOML when it parses, else a string."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"'{'.'.join(path)}': '{part}' is a value, not a section")
        node = nxt
    node[path[-1]] = value


def resolve(preset: str | None = None, overrides: list[str] | None = None,
            flags: dict[str, Any] | None = None) -> Config:
    """Defaults ← preset ← common flags (a dict of dotted keys) ← `--set` overrides."""
    data = preset_dict(preset or DEFAULT_PRESET)
    for key, value in (flags or {}).items():
        if value is not None:
            _set_path(data, key.split("."), value)
    for text in overrides or []:
        path, value = parse_override(text)
        _set_path(data, path, value)
    return validate(data, source=f"preset '{preset or DEFAULT_PRESET}' with overrides")
