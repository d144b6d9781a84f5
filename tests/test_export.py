"""`glsd export` end to end: timm, ONNX and full-state exports of a real (tiny) run, each loaded back by
the consumer's own code (timm's pretrained loader, plain load_state_dict, onnxruntime, the README's
snippets) and compared with glsd's own Backbone; clear errors for bad inputs; the out folder rules."""
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from glsd_cli.config import Config
from glsd_cli.engine.checkpoint import read_checkpoint, save_tensors
from glsd_cli.eval.loading import load_pretrained
from tests.cli_helpers import run_cli
from tests.conftest import TINY_OVERRIDES

_RUN: dict[str, Path] = {}


class _NoCapture:
    """run_cli reads the output through capsys; module-scoped fixtures have none to give."""

    def readouterr(self):
        return "", ""


def pretrained_run(tmp_path_factory) -> Path:
    """One tiny pre-training run through the real CLI, shared by this module and test_api.py."""
    if "run" not in _RUN:
        out = tmp_path_factory.mktemp("export-run")
        args = ["pretrain", "--out", str(out), "--name", "run", "--quiet"]
        for item in TINY_OVERRIDES + ["run.epochs=1"]:
            args += ["--set", item]
        assert run_cli(args, _NoCapture())[0] == 0
        _RUN["run"] = out / "run"
    return _RUN["run"]


def export(args: list[str]) -> int:
    return run_cli(["export", *args], _NoCapture())[0]


def python_blocks(readme: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)


def run_snippet(code: str) -> dict:
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return pretrained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def backbones(run_dir):
    _, method, _ = load_pretrained(run_dir)
    return {"teacher": method.backbone("teacher").eval(), "student": method.backbone("student").eval()}


@pytest.fixture(scope="module")
def timm_dir(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("timm-export") / "teacher"
    assert export([str(run_dir), "--out", str(out)]) == 0
    return out


def images(batch, size, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ timm


def record(folder: Path) -> dict:
    return json.loads((folder / "glsd_export.json").read_text())


@torch.no_grad()
def test_timm_export_loads_strictly_and_gives_glsd_features(run_dir, backbones, tmp_path, capsys):
    out = tmp_path / "exp"
    code, stdout, err = run_cli(["export", str(run_dir), "--format", "timm", "--out", str(out)], capsys)
    assert code == 0, err
    assert "max |diff| = 0.0e+00" in stdout
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "glsd_export.json", "README.md"}
    kwargs = {"num_classes": 0, "img_size": 16, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3,
              "dynamic_img_size": True}
    # glsd's record, where timm does not look.
    rec = record(out)
    assert rec["architecture"] == "vit_tiny_patch16_224" and rec["format"] == "timm" and rec["model_kwargs"] == kwargs
    assert rec["input_size"] == [3, 16, 16] and rec["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert rec["num_features"] == 48 and rec["backbone"] == "teacher" and rec["glsd_config"]["model"]["depth"] == 2
    assert rec["source"]["checkpoint"] == str(run_dir / "last.safetensors") and rec["check"]["max_abs_diff"] == 0
    # timm's config.json, as timm's save_for_hf writes it.
    timm_cfg = json.loads((out / "config.json").read_text())
    assert timm_cfg["architecture"] == "vit_tiny_patch16_224" and timm_cfg["num_classes"] == 0
    assert timm_cfg["num_features"] == 48
    assert {k: timm_cfg["model_args"][k] for k in kwargs if k != "img_size"} == {k: v for k, v in kwargs.items()
                                                                                 if k != "img_size"}
    pretrained_cfg = timm_cfg["pretrained_cfg"]
    assert pretrained_cfg["input_size"] == [3, 16, 16] and pretrained_cfg["crop_pct"] == 0.875
    assert pretrained_cfg["mean"] == [0.485, 0.456, 0.406] and pretrained_cfg["std"] == [0.229, 0.224, 0.225]
    assert "glsd_export" not in json.dumps(timm_cfg)

    reference = backbones["teacher"]
    via_local_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    data_cfg = timm.data.resolve_data_config({}, model=via_local_dir)
    assert tuple(data_cfg["input_size"]) == (3, 16, 16) and tuple(data_cfg["mean"]) == (0.485, 0.456, 0.406)
    assert data_cfg["interpolation"] == "bicubic"
    # The README's snippets: timm's local-dir loader first, then plain load_state_dict(strict=True).
    blocks = python_blocks(out / "README.md")
    assert 'local-dir:' in blocks[0]
    readme_local_dir = run_snippet(blocks[0])["model"]
    readme_plain = run_snippet(blocks[1])["model"]
    for size in (16, 24):  # the training size and another one (dynamic position embeddings)
        x = images(3, size)
        expected = reference(x)
        for model in (via_local_dir, readme_local_dir, readme_plain):
            assert torch.equal(model(x), expected)


def test_timm_local_dir_loading_is_strict(timm_dir, tmp_path):
    """What makes the export's check meaningful: timm's local-dir loader refuses a missing key."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for p in timm_dir.iterdir():
        (damaged / p.name).write_bytes(p.read_bytes())
    state = load_file(damaged / "model.safetensors")
    del state["norm.weight"]
    save_file(state, str(damaged / "model.safetensors"))
    with pytest.raises(RuntimeError, match="norm.weight"):
        timm.create_model(f"local-dir:{damaged}", pretrained=True)


@torch.no_grad()
def test_student_export(run_dir, backbones, tmp_path):
    out = tmp_path / "student"
    assert export([str(run_dir), "--student", "--out", str(out)]) == 0
    assert record(out)["backbone"] == "student"
    model = run_snippet(python_blocks(out / "README.md")[0])["model"]
    x = images(2, 16)
    assert torch.equal(model(x), backbones["student"](x))
    assert not torch.equal(model(x), backbones["teacher"](x))


@torch.no_grad()
def test_layer_truncation_matches_per_block_features(run_dir, backbones, tmp_path):
    teacher = backbones["teacher"]
    x = images(3, 16)
    for layer, block in ((1, 0), (-1, 1)):
        out = tmp_path / f"layer{layer}"
        assert export([str(run_dir), "--layer", str(layer), "--out", str(out)]) == 0
        cfg = record(out)
        assert cfg["layer"] == block + 1 and cfg["num_blocks"] == block + 1
        assert cfg["model_kwargs"]["depth"] == block + 1
        assert set(load_file(out / "model.safetensors")) == set(
            timm.create_model(cfg["architecture"], **cfg["model_kwargs"]).state_dict())
        model = run_snippet(python_blocks(out / "README.md")[0])["model"]
        per_block = teacher.forward_layers(x, [block]).layer_cls[0]
        assert torch.allclose(model(x), per_block, atol=1e-6, rtol=0)
    assert torch.allclose(model(x), teacher(x), atol=1e-6, rtol=0)  # the last block is the final CLS


def test_layer_out_of_range_is_a_clear_error(run_dir, tmp_path, capsys):
    code, _, err = run_cli(["export", str(run_dir), "--layer", "3", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "blocks 1..2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ ONNX


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:  # the [onnx] extra is not installed
        pytest.skip(f"onnxruntime cannot be imported ({e}); install glsd[onnx]")
    return onnxruntime


@torch.no_grad()
def test_onnx_round_trip_with_onnxruntime(run_dir, backbones, tmp_path, capsys):
    ort = _onnxruntime()
    out = tmp_path / "onnx"
    code, stdout, err = run_cli(["export", str(run_dir), "-f", "onnx", "--out", str(out)], capsys)
    assert code == 0, err
    assert re.search(r"max \|diff\| = \d\.\de-\d\d \(tolerance 1e-04\)", stdout)
    cfg = record(out)
    assert cfg["format"] == "onnx" and cfg["check"]["max_abs_diff"] <= 1e-4
    assert {p.name for p in out.iterdir()} == {"model.onnx", "glsd_export.json", "README.md"}
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "image" and session.get_inputs()[0].shape == ["batch", 3, 16, 16]
    x = images(5, 16, seed=7)  # a batch size the export never saw
    got = torch.from_numpy(session.run(["features"], {"image": x.numpy()})[0])
    assert got.shape == (5, 48)
    assert torch.allclose(got, backbones["teacher"](x), atol=1e-4, rtol=0)


@torch.no_grad()
def test_onnx_at_another_size_has_position_embeddings_resolved(run_dir, backbones, tmp_path):
    ort = _onnxruntime()
    import onnx

    out = tmp_path / "onnx24"
    assert export([str(run_dir), "-f", "onnx", "--image-size", "24", "--layer", "1", "--out", str(out)]) == 0
    graph_ops = {node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node}
    assert "Resize" not in graph_ops  # no interpolation left in the graph: resampled once at export
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = images(2, 24, seed=3)
    got = torch.from_numpy(session.run(["features"], {"image": x.numpy()})[0])
    # glsd interpolates the 4x4 grid to 6x6 at run time; the ONNX model has it baked in.
    expected = backbones["teacher"].forward_layers(x, [0]).layer_cls[0]
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)


def test_onnx_over_tolerance_fails_and_keeps_the_earlier_export(run_dir, timm_dir, tmp_path, capsys):
    _onnxruntime()
    out = tmp_path / "earlier"
    out.mkdir()
    for p in timm_dir.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run_cli(["export", str(run_dir), "-f", "onnx", "--tolerance", "1e-12", "--force",
                            "--out", str(out)], capsys)
    assert code == 2 and "differs from PyTorch" in err and "nothing was written" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no model.onnx, no temporaries


# ------------------------------------------------------------------ full state


def test_full_safetensors_export(run_dir, tmp_path):
    out = tmp_path / "full"
    assert export([str(run_dir), "--format", "safetensors", "--out", str(out)]) == 0
    source, source_meta = read_checkpoint(run_dir)
    tensors, meta = read_checkpoint(out / "model.safetensors")
    assert meta["kind"] == "export-full" and meta["config"] == source_meta["config"]
    assert json.loads(meta["position"]) == json.loads(source_meta["position"])
    model_keys = {k for k in source if k.startswith("model/")}
    assert set(tensors) == model_keys and all(torch.equal(tensors[k], source[k]) for k in model_keys)
    assert {"model/dino_loss.center", "model/teacher.head.mlp.0.weight", "model/student.head.mlp.0.weight"} <= set(tensors)
    # The README's snippet rebuilds the method and loads every tensor strictly.
    method = run_snippet(python_blocks(out / "README.md")[0])["method"]
    assert torch.equal(method.dino_loss.center, source["model/dino_loss.center"])
    assert Config.from_json(meta["config"]).model.depth == 2


# ------------------------------------------------------------------ bad input


def test_unknown_format_lists_the_formats(run_dir, tmp_path, capsys):
    code, _, err = run_cli(["export", str(run_dir), "--format", "tflite", "--out", str(tmp_path / "x")], capsys)
    assert code == 2
    assert "unknown export format 'tflite': choose one of timm, onnx, safetensors" in err
    assert not (tmp_path / "x").exists()


def test_safetensors_file_that_is_not_glsd(tmp_path, capsys):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(foreign))
    code, _, err = run_cli(["export", str(foreign), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "not a glsd checkpoint" in err and len(err.strip().splitlines()) == 1


class _Payload:
    """Unpickling this creates a folder: proof that a file was (or was not) unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_file_is_refused_and_never_unpickled(writer, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    bad = tmp_path / "model.pt"
    if writer == "pickle":
        bad.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
        proof = tmp_path / "proof"
        pickle.loads(pickle.dumps(_Payload(proof)))  # the payload does run when unpickled
        assert proof.is_dir()
    else:
        torch.save({"state_dict": _Payload(marker)}, bad)
    code, _, err = run_cli(["export", str(bad), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "never unpickles" in err
    assert not marker.exists()


def test_missing_checkpoint_and_misplaced_options(run_dir, tmp_path, capsys):
    code, _, err = run_cli(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(["export", str(run_dir), "-f", "safetensors", "--student", "--out", str(tmp_path / "x")],
                           capsys)
    assert code == 2 and "whole model" in err


# ------------------------------------------------------------------ the out folder


def test_out_folder_is_not_overwritten_without_force(run_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run_cli(["export", str(run_dir), "--out", str(out)], capsys)
    assert code == 2 and "--force" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    # --force adds the export and keeps the user's file.
    assert export([str(run_dir), "--out", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "keep me" and (out / "model.safetensors").is_file()


def test_force_never_overwrites_a_run_directory_or_the_source(run_dir, timm_dir, capsys):
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    code, _, err = run_cli(["export", str(timm_dir), "--out", str(run_dir), "--force"], capsys)
    assert code == 2 and "did not write" in err  # the run's own config.json is not an export's
    code, _, err = run_cli(["export", str(run_dir), "--out", str(run_dir), "--force"], capsys)
    assert code == 2 and "read from" in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    exported = {p.name: p.read_bytes() for p in timm_dir.iterdir()}
    code, _, err = run_cli(["export", str(timm_dir), "-f", "onnx", "--out", str(timm_dir), "--force"], capsys)
    assert code == 2 and "read from" in err
    assert {p.name: p.read_bytes() for p in timm_dir.iterdir()} == exported


def test_force_replaces_an_earlier_export_of_another_format(run_dir, timm_dir, tmp_path):
    _onnxruntime()
    out = tmp_path / "again"
    out.mkdir()
    for p in timm_dir.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    assert export([str(run_dir), "-f", "onnx", "--force", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"model.onnx", "glsd_export.json", "README.md"}  # timm's config.json is gone
    assert record(out)["format"] == "onnx"


@torch.no_grad()
def test_layout_1_export_folder_is_still_read_and_replaced(run_dir, timm_dir, tmp_path):
    """Exports written before glsd_export.json kept glsd's record in config.json."""
    import glsd_cli

    old = tmp_path / "old"
    old.mkdir()
    for name in ("model.safetensors", "README.md"):
        (old / name).write_bytes((timm_dir / name).read_bytes())
    (old / "config.json").write_text(json.dumps({**record(timm_dir), "glsd_export": 1}))
    x = images(2, 16)
    assert torch.equal(glsd_cli.load_backbone(old)(x), glsd_cli.load_backbone(timm_dir)(x))
    assert export([str(run_dir), "--out", str(old), "--force"]) == 0
    assert record(old)["glsd_export"] == 2 and "pretrained_cfg" in json.loads((old / "config.json").read_text())


# ------------------------------------------------------------------ every backbone glsd trains (slow)


def _random_checkpoint(arch: str, path: Path) -> Config:
    """A glsd checkpoint holding a randomly initialised teacher backbone of `arch` at 224 px."""
    from glsd_cli.models.backbone import Backbone

    cfg = Config.model_validate({"model": {"arch": arch}, "data": {"global_crop_size": 224}})
    backbone = Backbone(cfg.model, 224)
    tensors = {f"model/teacher.backbone.model.{k}": v for k, v in backbone.model.state_dict().items()}
    save_tensors(path, tensors, {"kind": "pretrain", "config": cfg.to_json(), "position": json.dumps({"epoch": 0})})
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("arch,size,onnx_size", [
    ("vit_small_patch16_224", 32, 64),
    ("vit_base_patch16_224", 32, None),   # ONNX of ViT-B works the same; skipped for its 350 MB file
    ("swin_tiny_patch4_window7_224", 96, 224),
])
@torch.no_grad()
def test_every_backbone_round_trips(arch, size, onnx_size, tmp_path):
    from glsd_cli.models.backbone import Backbone

    ckpt = tmp_path / "ckpt.safetensors"
    cfg = _random_checkpoint(arch, ckpt)
    reference = Backbone(cfg.model, 224).eval()
    prefix = "model/teacher.backbone.model."
    reference.model.load_state_dict({k[len(prefix):]: v for k, v in load_file(ckpt).items()})
    out = tmp_path / "timm"
    assert export([str(ckpt), "--out", str(out)]) == 0
    cfg_json = record(out)
    # Same keys and shapes as timm's stock model: public weights and these are interchangeable.
    stock = timm.create_model(arch, pretrained=False, num_classes=0).state_dict()
    exported = load_file(out / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in stock.items()}
    model = run_snippet(python_blocks(out / "README.md")[0])["model"]
    x = images(2, size)
    assert torch.allclose(model(x), reference(x), atol=1e-5, rtol=0)
    assert cfg_json["representation"].startswith("CLS" if arch.startswith("vit") else "mean")
    if arch.startswith("swin"):
        assert export([str(ckpt), "--layer", "1", "--out", str(tmp_path / "layer")]) == 2  # no CLS, no blocks
    if onnx_size is not None:
        ort = _onnxruntime()
        out = tmp_path / "onnx"
        assert export([str(ckpt), "-f", "onnx", "--image-size", str(onnx_size), "--out", str(out)]) == 0
        session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        x = images(2, onnx_size, seed=5)
        got = torch.from_numpy(session.run(["features"], {"image": x.numpy()})[0])
        assert torch.allclose(got, reference(x), atol=1e-4, rtol=0)
