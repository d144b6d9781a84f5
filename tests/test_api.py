"""The Python API: `glsd_cli.load_backbone` on checkpoints and on every export, and
`glsd_cli.extract_features` against glsd's own feature extraction and an independent computation."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import glsd_cli
from glsd_cli.data.multicrop import EvalTransform
from glsd_cli.data.sources import open_source
from glsd_cli.errors import CheckpointError, GlsdError
from glsd_cli.eval.features import extract_features as glsd_features
from tests.test_export import backbones, export, run_dir  # noqa: F401  (shared module fixtures)

DATA = "synthetic:train=96,val=48,size=16"  # the tiny run's own data (tests/conftest.py)


@pytest.fixture(scope="module")
def exports(run_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("api-exports")
    made = {}
    for name, args in {"timm": [], "student": ["--student"], "full": ["-f", "safetensors"]}.items():
        assert export([str(run_dir), *args, "--out", str(root / name)]) == 0
        made[name] = root / name
    return made


def images(batch, size=16, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_import_is_light_and_exposes_the_api():
    code = ("import sys, glsd_cli; assert 'torch' not in sys.modules, 'import glsd_cli pulled in torch'; "
            "print(glsd_cli.__version__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == glsd_cli.__version__ and glsd_cli.__version__[0].isdigit()
    from glsd_cli import api

    assert glsd_cli.load_backbone is api.load_backbone and glsd_cli.extract_features is api.extract_features
    with pytest.raises(AttributeError):
        glsd_cli.no_such_thing


@torch.no_grad()
def test_load_backbone_from_a_run_and_a_checkpoint_file(run_dir, backbones):
    teacher = glsd_cli.load_backbone(run_dir)
    assert type(teacher).__name__ == "VisionTransformer" and not teacher.training
    student = glsd_cli.load_backbone(run_dir / "last.safetensors", which="student")
    x = images(3)
    assert torch.equal(teacher(x), backbones["teacher"](x))
    assert torch.equal(student(x), backbones["student"](x))
    assert not torch.equal(teacher(x), student(x))


@torch.no_grad()
def test_load_backbone_from_every_export(exports, backbones):
    x = images(2, seed=1)
    for path in (exports["timm"], exports["timm"] / "model.safetensors", exports["full"]):
        assert torch.equal(glsd_cli.load_backbone(path)(x), backbones["teacher"](x)), path
    assert torch.equal(glsd_cli.load_backbone(exports["full"], which="student")(x), backbones["student"](x))
    # A timm export holds one backbone: the student export loads as the student whatever `which` says.
    assert torch.equal(glsd_cli.load_backbone(exports["student"])(x), backbones["student"](x))


@torch.no_grad()
def test_load_backbone_layer(run_dir, exports, backbones):
    x = images(2, seed=2)
    first = backbones["teacher"].forward_layers(x, [0]).layer_cls[0]
    for path in (run_dir, exports["timm"]):
        model = glsd_cli.load_backbone(path, layer=1)
        assert len(model.blocks) == 1
        assert torch.allclose(model(x), first, atol=1e-6, rtol=0)


def test_extract_features_matches_glsd(run_dir, backbones):
    feats, labels = glsd_cli.extract_features(run_dir, DATA, split="val", batch_size=20)
    source = open_source(DATA, "val")
    expected, expected_labels = glsd_features(backbones["teacher"], source, 16, torch.device("cpu"))
    assert feats.shape == (48, 48) and torch.equal(labels, expected_labels)
    assert torch.allclose(feats, expected, atol=1e-6, rtol=0)
    # Per-block features: block numbers as knn-eval takes them (1 = first, -1 = last).
    per_block, _ = glsd_cli.extract_features(run_dir, DATA, split="val", layers=[1, -1])
    expected_blocks, _ = glsd_features(backbones["teacher"], source, 16, torch.device("cpu"), layers=[0, 1])
    assert per_block.shape == (2, 48, 48)
    assert torch.allclose(per_block, expected_blocks, atol=1e-6, rtol=0)
    assert torch.allclose(per_block[-1], expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_extract_features_on_an_image_folder_with_a_loaded_model(exports, tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            path = tmp_path / "imgs" / cls / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(path)
            files.append(path)
    model = glsd_cli.load_backbone(exports["timm"])
    feats, labels = glsd_cli.extract_features(model, str(tmp_path / "imgs"))
    assert labels.tolist() == [0, 0, 1, 1]
    # Independently: read each file, glsd's eval transform, the model.
    transform = EvalTransform(16)
    batch = torch.stack([transform(torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1))
                         for p in files])
    assert torch.allclose(feats, model(batch), atol=1e-5, rtol=0)
    bigger, _ = glsd_cli.extract_features(model, str(tmp_path / "imgs"), image_size=24)
    assert bigger.shape == (4, 48) and not torch.allclose(bigger, feats)


def test_api_errors(run_dir, exports, tmp_path):
    with pytest.raises(GlsdError, match="'teacher' or 'student'"):
        glsd_cli.load_backbone(run_dir, which="ema")
    with pytest.raises(GlsdError, match="holds only the teacher backbone"):
        glsd_cli.load_backbone(exports["timm"], which="student")
    with pytest.raises(CheckpointError, match="does not exist"):
        glsd_cli.load_backbone(tmp_path / "missing")
    with pytest.raises(GlsdError, match="blocks 1..2"):
        glsd_cli.extract_features(run_dir, DATA, layers=[3])
    with pytest.raises(GlsdError, match="expected a path or a torch model"):
        glsd_cli.extract_features(42, DATA)


def test_onnx_export_is_not_a_backbone_to_load(run_dir, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (glsd[onnx])")
    assert export([str(run_dir), "-f", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    with pytest.raises(CheckpointError, match="ONNX export"):
        glsd_cli.load_backbone(tmp_path / "onnx")
