"""`glsd finetune`: layer-wise lr decay, mixup/cutmix, RandAugment, and the CLI end to end."""
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glsd_cli.config import resolve
from glsd_cli.data.multicrop import EvalTransform
from glsd_cli.data.sources import open_source
from glsd_cli.engine.checkpoint import read_checkpoint
from glsd_cli.eval.finetune import FinetuneOptions, FinetuneTask, build_classifier, layer_decay_groups, load_finetuned
from glsd_cli.eval.train_data import AugmentedImages
from tests.cli_helpers import run_cli
from tests.conftest import TINY_OVERRIDES
from tests.eval_run import copy_run, pretrained_run

SMOOTHING, CLASSES = 0.1, 10


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return pretrained_run(tmp_path_factory)


@pytest.mark.parametrize("depth,decay", [(2, 0.65), (4, 0.75)])
def test_layer_decay_scales_match_the_formula(depth, decay):
    model = build_classifier(resolve("tiny-dino", TINY_OVERRIDES + [f"model.depth={depth}"]), CLASSES, 0.1)
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=decay)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(scale) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        # BEiT's layer ids: embeddings 0, block b -> b + 1, head depth + 1 (timm puts the final norm with the last block).
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            layer = 0
        elif m := re.match(r"blocks\.(\d+)\.", name):
            layer = int(m[1]) + 1
        elif name.startswith("norm."):
            layer = depth
        else:
            assert name.startswith("head."), name
            layer = depth + 1
        assert scale[id(p)] == pytest.approx(decay ** (depth + 1 - layer)), name
        no_decay = p.ndim <= 1 or name in ("cls_token", "pos_embed")
        assert decay_of[id(p)] == (0.0 if no_decay else 0.05), name


def _smooth(labels):
    return F.one_hot(labels, CLASSES).float() * (1 - SMOOTHING) + SMOOTHING / CLASSES


def test_mixup_follows_its_formula():
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8)
    task = FinetuneTask(nn.Identity(), CLASSES, FinetuneOptions(mixup=0.8, cutmix=0.0, smoothing=SMOOTHING))
    mixed, targets = task.mix(images.clone(), labels, step=3)
    # Image 0 keeps the weight lam of its own label: target = lam (1 - s + s/C) + (1 - lam) s/C.
    lam = float(targets[0, 0] - SMOOTHING / CLASSES) / (1 - SMOOTHING)
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
    torch.testing.assert_close(targets, lam * _smooth(labels) + (1 - lam) * _smooth(labels.flip(0)))


def test_cutmix_follows_its_formula_and_is_seeded_by_step():
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8)
    task = FinetuneTask(nn.Identity(), CLASSES, FinetuneOptions(mixup=0.0, cutmix=1.0, smoothing=SMOOTHING))
    mixed, targets = task.mix(images.clone(), labels, step=5)
    box = (mixed != images).any(1)  # (B, H, W): pixels pasted from the mirrored image
    assert box.any() and all(torch.equal(box[0], b) for b in box)  # one box for the whole batch
    rows, cols = box[0].any(1).nonzero().flatten(), box[0].any(0).nonzero().flatten()
    rectangle = torch.zeros_like(box[0])
    rectangle[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    assert torch.equal(box[0], rectangle)
    expected = images.clone()
    expected[:, :, box[0]] = images.flip(0)[:, :, box[0]]
    assert torch.equal(mixed, expected)
    lam = 1 - float(box[0].float().mean())  # the label weight is the area kept
    torch.testing.assert_close(targets, lam * _smooth(labels) + (1 - lam) * _smooth(labels.flip(0)))
    again = task.mix(images.clone(), labels, step=5)
    other = task.mix(images.clone(), labels, step=6)
    assert torch.equal(again[0], mixed) and not torch.equal(other[1], targets)


def test_randaugment_is_reproducible_and_leaves_the_global_rng_alone():
    source = open_source("synthetic:train=20,val=4,size=16", "train")
    plain = AugmentedImages(source, 16, seed=1)
    strong = AugmentedImages(source, 16, seed=1, randaugment_magnitude=9)
    state = torch.get_rng_state()
    first = [strong[i]["image"] for i in range(20)]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, strong[i]["image"]) for i, a in enumerate(first))
    assert sum(not torch.equal(a, plain[i]["image"]) for i, a in enumerate(first)) >= 15
    strong.set_epoch(1)
    assert not torch.equal(first[0], strong[0]["image"])


def test_finetune_batches_are_mixed(run, tmp_path, capsys, monkeypatch):
    batches = []
    real_mix = FinetuneTask.mix

    def recording(self, images, labels, step):
        out = real_mix(self, images, labels, step)
        batches.append((labels.clone(), out[1].detach().clone()))
        return out

    monkeypatch.setattr(FinetuneTask, "mix", recording)
    mine = copy_run(run, tmp_path / "run")
    code, out, err = run_cli(["finetune", str(mine), "--epochs", "1", "--batch-size", "16", "--num-workers", "0",
                              "--quiet"], capsys)
    assert code == 0, err
    assert len(batches) == 86 // 16  # 96 images minus a 10% holdout, full batches only
    lams = []
    for labels, targets in batches:
        # Soft targets of two labels: lam for each image's own, 1 - lam for its mirror's in the batch.
        row = int(torch.nonzero(labels != labels.flip(0))[0])
        lam = float(targets[row, labels[row]] - SMOOTHING / CLASSES) / (1 - SMOOTHING)
        torch.testing.assert_close(targets, lam * _smooth(labels) + (1 - lam) * _smooth(labels.flip(0)))
        lams.append(lam)
    assert sum(0.001 < lam < 0.999 for lam in lams) >= len(lams) - 1, lams  # a cut box may clip to nothing
    saved = json.loads((mine / "finetune" / "finetune.json").read_text())
    assert saved["settings"]["mixup"] == 0.8 and saved["settings"]["cutmix"] == 1.0
    assert saved["summary"]["epochs"] == 1 and "best_epoch" in saved["summary"]


@pytest.mark.slow
def test_finetune_beats_chance_and_saves_a_classifier(run, tmp_path, capsys):
    mine = copy_run(run, tmp_path / "run")
    # The heavy regularisers (mixup, cutmix, RandAugment, 8% crops) need far more than 600 steps on
    # 16-px images; this test checks that the loop learns, so they are switched off.
    code, out, err = run_cli(["finetune", str(mine), "--train-data", "synthetic:train=2000,val=500,size=16",
                              "--epochs", "10", "--batch-size", "32", "--lr", "8e-3", "--warmup-epochs", "1",
                              "--mixup", "0", "--cutmix", "0", "--randaug-magnitude", "0", "--min-crop-scale", "0.5",
                              "--drop-path", "0", "--layer-decay", "0.75", "--num-workers", "0", "--quiet"], capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    # 500 test images: chance (10%) has a standard deviation of 1.3 points; 20% is 7 of them above.
    assert summary["final_top1"] > 20, summary
    path = mine / "finetune" / "classifier.safetensors"
    assert read_checkpoint(path)[1]["kind"] == "finetune"
    model, meta = load_finetuned(path)
    assert json.loads(meta["classes"])[0] == "hstripes"
    val = open_source("synthetic:train=2000,val=500,size=16", "val")
    transform = EvalTransform(16)
    with torch.no_grad():
        images = torch.stack([transform(val[i][0]) for i in range(len(val))])
        predicted = model(images).argmax(1)
    accuracy = 100.0 * int((predicted == torch.tensor(val.targets)).sum()) / len(val)  # exact, as the command counts
    assert accuracy == pytest.approx(summary["final_top1"], abs=1e-6)


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "15"], "must be even"),
    (["--layer-decay", "0"], "--layer-decay in (0, 1]"),
    (["--min-crop-scale", "0"], "--min-crop-scale must be in (0, 1]"),
    (["--batch-size", "200", "--mixup", "0", "--cutmix", "0"], "fewer than one batch"),
])
def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys, args, message):
    mine = copy_run(run, tmp_path / "run")
    code, _, err = run_cli(["finetune", str(mine), "--quiet", *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
