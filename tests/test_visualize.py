"""`glsd visualize`: the attention drawn is the model's, the match lines are match_geometric's, and every
command writes PNGs of the documented size (one tiny pre-trained run shared by the module)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from glsd_cli.cli import main
from glsd_cli.data.multicrop import MultiCrop
from glsd_cli.geometry import match_geometric, token_centres
from glsd_cli.viz import embedding as ve
from glsd_cli.viz import matches as vm
from glsd_cli.viz.attention import last_block_cls_attention
from glsd_cli.viz.drawing import palette
from tests.cli_helpers import run_cli
from tests.conftest import TINY_OVERRIDES


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One epoch of the geometric-matching preset at the tiny test size (patch 4, 16-px globals)."""
    out = tmp_path_factory.mktemp("visualize")
    sets = [a for item in TINY_OVERRIDES + ["run.epochs=1"] for a in ("--set", item)]
    old, sys.argv = sys.argv, ["glsd", "pretrain", "--preset", "tiny-geo", "--out", str(out), "--name", "run",
                               "--quiet", *sets]
    try:  # run_cli needs the function-scoped capsys; this is the same entry point without it
        with pytest.raises(SystemExit) as exc:
            main()
            raise SystemExit(0)
    finally:
        sys.argv = old
    assert (exc.value.code or 0) == 0
    return out / "run"


@pytest.fixture
def photo(tmp_path):
    """A non-square 40x24 RGB PNG: at --size 16 it becomes 26x16, cropped to whole 4-px patches: 24x16."""
    path = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((24, 40, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _png(path) -> Image.Image:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()  # decodes every byte: a truncated file fails here
        return im.copy()


def _error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


# --------------------------------------------------------------------------- attention

def test_recomputed_attention_is_the_models_own(run_dir):
    from glsd_cli.eval.loading import load_pretrained

    _, method, _ = load_pretrained(run_dir)
    backbone = method.backbone("teacher")
    model = backbone.model
    x = torch.randn(2, 3, 16, 24)  # non-square: a 4x6 grid through the dynamic position embeddings
    att = last_block_cls_attention(backbone, x)
    # The recomputed last block reproduces the model's features (the final norm applied on top).
    assert torch.allclose(model.norm(att.tokens), model.forward_features(x), atol=1e-5, rtol=0)
    # Independently of the recomputation: timm's own probabilities, caught on their way through
    # attn_drop in its unfused path, have the same CLS row.
    last = model.blocks[-1].attn
    seen = []
    hook = last.attn_drop.register_forward_hook(lambda mod, inp, out: seen.append(out))
    last.fused_attn = False
    try:
        model.forward_features(x)
    finally:
        hook.remove()
        last.fused_attn = True
    assert torch.allclose(att.probs, seen[0][:, :, 0, :], atol=1e-6, rtol=0)
    # One softmax row per head over ALL tokens, the CLS itself included: sums to 1 before any display scaling.
    heads = model.blocks[-1].attn.num_heads
    assert att.probs.shape == (2, heads, 1 + 4 * 6) and att.grid == (4, 6)
    assert torch.allclose(att.probs.sum(-1), torch.ones(2, heads), atol=1e-6)
    patch = att.patch_maps()
    assert patch.shape == (2, heads, 4, 6) and bool((patch >= 0).all())
    # The patch part alone sums to 1 minus the CLS's attention to itself.
    assert torch.allclose(patch.sum((-2, -1)), 1 - att.probs[:, :, 0], atol=1e-6)


def test_attention_command_writes_one_png_per_head_and_the_mean(run_dir, photo, tmp_path, capsys):
    out = tmp_path / "att"
    code, stdout, err = run_cli(["visualize", "attention", str(run_dir), str(photo), "--out", str(out)], capsys)
    assert code == 0, err
    paths = stdout.split()
    names = [p.rsplit("/", 1)[-1] for p in paths]
    assert names == ["image.png", "attention-head01.png", "attention-head02.png", "attention-head03.png",
                     "attention-mean.png", "attention.png"]
    for p in paths[:-1]:  # the maps are at the image's size as fed to the model (24x16, a 6x4 grid)
        assert _png(p).size == (24, 16)
    assert _png(paths[-1]).size[0] > 24  # the overview sheet, enlarged for reading
    # A head's picture is 0.4 image + 0.6 colour map, and the map is constant over each 4x4 patch
    # (the model's resolution, upsampled by repetition) while differing between patches.
    heat = (np.asarray(_png(paths[1]), dtype=float) - 0.4 * np.asarray(_png(paths[0]), dtype=float)) / 0.6
    cells = heat.reshape(4, 4, 6, 4, 3).transpose(0, 2, 1, 3, 4).reshape(4, 6, 16, 3)
    assert (cells.max(2) - cells.min(2)).max() <= 2  # only PNG rounding within a patch
    assert np.ptp(cells.mean(2), axis=(0, 1)).max() > 20


def test_attention_refuses_a_backbone_without_cls(tmp_path, photo, capsys):
    from glsd_cli.config import resolve
    from glsd_cli.engine.checkpoint import save_tensors
    from glsd_cli.methods import build_method

    # A small random Swin checkpoint: the geometric-matching preset on Swin-T, slimmed to 24 channels.
    cfg = resolve("swint-geo", ["model.embed_dim=24", "data.global_crop_size=32", "data.local_crop_size=32",
                                "head.out_dim=16", "head.hidden_dim=16", "head.bottleneck_dim=8",
                                "method.local.out_dim=16"])
    method = build_method(cfg)
    ckpt = tmp_path / "swin.safetensors"
    save_tensors(ckpt, {f"model/{k}": v for k, v in method.state_dict().items()},
                 {"kind": "pretrain", "config": cfg.to_json()})
    line = _error_line(*run_cli(["visualize", "attention", str(ckpt), str(photo), "--out", str(tmp_path / "o")],
                                capsys)[::2])
    assert "no CLS token" in line and "swin" in line
    assert not (tmp_path / "o").exists()


def test_image_errors_are_one_line(run_dir, tmp_path, capsys):
    missing = tmp_path / "nope.png"
    line = _error_line(*run_cli(["visualize", "attention", str(run_dir), str(missing), "--out", str(tmp_path)],
                                capsys)[::2])
    assert "does not exist" in line
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a PNG")
    line = _error_line(*run_cli(["visualize", "matches", str(run_dir), str(garbage), "--out", str(tmp_path)],
                                capsys)[::2])
    assert "cannot read" in line and "garbage.png" in line
    line = _error_line(*run_cli(["visualize", "attention", str(run_dir), "synthetic:x", "--out", str(tmp_path)],
                                capsys)[::2])
    assert "synthetic:INDEX" in line


# --------------------------------------------------------------------------- matches

def test_match_lines_are_match_geometric_in_view_pixels():
    """Real multi-crop geometry (224-px globals, 96-px locals, ViT-S/16 grids): every segment joins
    the view-pixel centre of student token i and of the teacher token match_geometric picked, and
    those points are the original-image token centres the matcher measured."""
    transform = MultiCrop(224, 96, 2, color=False)
    image = torch.zeros(3, 300, 400, dtype=torch.uint8)
    flips_seen = set()
    for seed in range(6):
        pair = vm.sample_views(transform, image, seed, "local")
        s_grid, t_grid = (6, 6), (14, 14)
        m = vm.geometric_matches(pair, s_grid, t_grid)
        index, valid = match_geometric(pair.student_box[None], torch.tensor([pair.student_flip]), s_grid,
                                       pair.teacher_box[None], torch.tensor([pair.teacher_flip]), t_grid)
        assert torch.equal(m.index, index[0]) and torch.equal(m.valid, valid[0])
        for i in (0, 5, 17, 35):  # a few endpoints against the token-centre formula, by hand
            r, c = divmod(i, 6)
            assert m.segments[i, :2].tolist() == [(r + 0.5) * 96 / 6, (c + 0.5) * 96 / 6]
            tr, tc = divmod(int(index[0, i]), 14)
            assert m.segments[i, 2:].tolist() == [(tr + 0.5) * 224 / 14, (tc + 0.5) * 224 / 14]
        # Back in the original image the endpoints are glsd_cli.geometry's token centres (flip included) ...
        s_orig = vm.view_to_original(m.segments[:, :2], pair.student_box, pair.student_flip, 96)
        t_orig = vm.view_to_original(m.segments[:, 2:], pair.teacher_box, pair.teacher_flip, 224)
        s_ref = token_centres(pair.student_box[None].double(), torch.tensor([pair.student_flip]), s_grid)[0]
        t_ref = token_centres(pair.teacher_box[None].double(), torch.tensor([pair.teacher_flip]), t_grid)[0]
        assert torch.allclose(s_orig, s_ref, atol=1e-9) and torch.allclose(t_orig, t_ref[m.index], atol=1e-9)
        # ... and a valid pair is closer than the larger half-diagonal of a token cell (the hinge).
        d2 = ((s_orig - t_orig) ** 2).sum(-1)
        _, _, th, tw = pair.teacher_box.double().tolist()
        _, _, sh, sw = pair.student_box.double().tolist()
        limit = max((th / 14 / 2) ** 2 + (tw / 14 / 2) ** 2, (sh / 6 / 2) ** 2 + (sw / 6 / 2) ** 2)
        assert bool((d2[m.valid] < limit).all()) and bool((d2[~m.valid] >= limit).all())
        back = vm.original_to_view(s_orig, pair.student_box, pair.student_flip, 96)
        assert torch.allclose(back, m.segments[:, :2], atol=1e-9)
        flips_seen.add((pair.student_flip, pair.teacher_flip))
    assert len({f for pair in flips_seen for f in pair}) == 2  # both flipped and unflipped views were checked


def test_matches_command_writes_two_pictures(run_dir, tmp_path, capsys):
    code, stdout, err = run_cli(["visualize", "matches", str(run_dir), "synthetic:3", "--out", str(tmp_path),
                                 "--seed", "1"], capsys)
    assert code == 0, err
    paths = stdout.split()
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["matches-geometric.png", "matches-similarity.png"]
    for p in paths:
        assert _png(p).size == vm.canvas_size()
    assert "student tokens matched" in err


# --------------------------------------------------------------------------- embedding

def test_pca_recovers_the_dominant_directions():
    gen = torch.Generator().manual_seed(0)
    # Two zero-mean, exactly uncorrelated directions of spread 5 and 2, planted in 8 dimensions.
    raw = torch.randn(200, 2, generator=gen, dtype=torch.float64)
    base = torch.linalg.qr(raw - raw.mean(0))[0] * torch.tensor([5.0, 2.0], dtype=torch.float64) * 200 ** 0.5
    rot = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))[0][:2]
    feats = base @ rot + 0.01 * torch.randn(200, 8, generator=gen, dtype=torch.float64)
    points, explained = ve.pca_2d(feats)
    assert explained[0] > explained[1] > 0.1 and explained.sum() > 0.99
    for k in range(2):  # each axis is the planted one up to sign
        assert abs(np.corrcoef(points[:, k], base[:, k].numpy())[0, 1]) > 0.999
    assert ve.evenly_spaced(10, 4) == [0, 3, 6, 9] and ve.evenly_spaced(3, 10) == [0, 1, 2]


def test_embedding_command_draws_every_class(run_dir, tmp_path, capsys):
    code, stdout, err = run_cli(["visualize", "embedding", str(run_dir), "--data", "synthetic:val=40,size=16",
                                 "--out", str(tmp_path), "--max-images", "30"], capsys)
    assert code == 0, err
    (path,) = stdout.split()
    picture = _png(path)
    assert path.endswith("embedding-pca.png") and picture.size == ve.canvas_size()
    # Every one of the ten classes has dots of its legend colour inside the plot area.
    plot = np.asarray(picture)[ve.TOP:, :ve.PLOT].reshape(-1, 3)
    colours = {tuple(c) for c in plot.tolist()}
    assert all(c in colours for c in palette(10))
    code, _, err = run_cli(["visualize", "embedding", str(run_dir), "--out", str(tmp_path), "--method", "umap"], capsys)
    assert "pca or tsne" in _error_line(code, err)


def test_tsne_without_scikit_learn_is_a_clear_error(run_dir, tmp_path, capsys):
    args = ["visualize", "embedding", str(run_dir), "--data", "synthetic:val=20,size=16", "--out", str(tmp_path),
            "--method", "tsne"]
    try:
        import sklearn  # noqa: F401
    except ImportError:
        line = _error_line(*run_cli(args, capsys)[::2])
        assert "scikit-learn" in line
        return
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert _png(stdout.split()[0]).size == ve.canvas_size()
