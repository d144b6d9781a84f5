"""Crash safety of the engine: checkpoint writes that fail or are killed half-way, corrupt
checkpoints, non-finite losses and gradients, unreadable images; and the collapse monitors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from glsd_cli.engine import checkpoint as ckpt
from glsd_cli.engine.checkpoint import read_checkpoint, save_tensors
from glsd_cli.engine.metrics import read_results
from glsd_cli.engine.monitors import collapse_stats, collapse_warning
from glsd_cli.engine.optim import adamw, param_groups
from glsd_cli.engine.batching import clear_worker_errors
from glsd_cli.engine.task import StepOutput, TrainingTask
from glsd_cli.engine.trainer import NonFiniteLoss, Trainer
from glsd_cli.errors import CheckpointError, DataError
from tests.cli_helpers import run_cli
from tests.conftest import TINY_OVERRIDES

STEPS_PER_EPOCH = 4


class _InfGrad(torch.autograd.Function):
    """Adds 0 to the loss and an infinite gradient to `x`: a finite loss with a broken backward."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.shape = x.shape
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return torch.full(ctx.shape, math.inf)


class Regression(TrainingTask):
    """A small real task for the engine: regression with dropout (so the torch RNG matters), with
    faults injected at chosen steps."""

    def __init__(self, nan_loss_at=(), inf_grad_at=()):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.Linear(16, 1))
        self.nan_loss_at, self.inf_grad_at = set(nan_loss_at), set(inf_grad_at)

    def training_step(self, batch, ctx):
        x, y = batch
        loss = F.mse_loss(self.net(x).squeeze(-1), y)
        if ctx.step in self.nan_loss_at:
            loss = loss * math.nan
        if ctx.step in self.inf_grad_at:
            loss = loss + _InfGrad.apply(self.net[0].weight)
        return StepOutput(loss, {"loss": loss.detach()})


def _trainer(task, run_dir, epochs=2, **kw) -> Trainer:
    total = epochs * STEPS_PER_EPOCH
    return Trainer(task=task, optimizer=adamw(param_groups(task)),
                   schedules={"lr": np.full(total, 1e-2)}, epochs=epochs, steps_per_epoch=STEPS_PER_EPOCH,
                   run_dir=run_dir, device=torch.device("cpu"), config_json="{}", checkpoint_every_steps=1,
                   quiet=True, plots=False, **kw)


def _loader(epoch: int, start: int):
    g = torch.Generator().manual_seed(epoch)
    x = torch.randn(STEPS_PER_EPOCH, 8, 8, generator=g)
    return [(xb, xb.sum(-1)) for xb in x[start:]]


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = _trainer(Regression(), tmp_path, epochs=1)
    trainer.fit(_loader)
    path = tmp_path / "last.safetensors"
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.os, "replace", disk_full)
    with pytest.raises(CheckpointError, match="could not write the checkpoint .*last.safetensors.*previous one is intact"):
        trainer.save_checkpoint()
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".last.safetensors.tmp-*")), "the failed write left its temporary file"
    _, meta = read_checkpoint(tmp_path)
    assert json.loads(meta["position"])["global_step"] == STEPS_PER_EPOCH


def test_writer_killed_mid_write_leaves_a_loadable_checkpoint(tmp_path):
    trainer = _trainer(Regression(), tmp_path, epochs=1)
    trainer.fit(_loader)
    good = (tmp_path / "last.safetensors").read_bytes()
    # What a writer killed half-way leaves behind: a partial temporary file next to the checkpoint.
    stale = tmp_path / ".last.safetensors.tmp-4242"
    stale.write_bytes(good[: len(good) // 3])
    resumed = _trainer(Regression(), tmp_path, epochs=2)
    resumed.resume(tmp_path)
    assert resumed.state.global_step == STEPS_PER_EPOCH
    assert not stale.exists(), "the stale temporary file was not cleared on resume"
    resumed.fit(_loader)
    assert resumed.state.global_step == 2 * STEPS_PER_EPOCH


def test_resume_from_a_corrupt_checkpoint_names_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    save_tensors(run / "last.safetensors", {"model/w": torch.zeros(1000)}, {"kind": "pretrain"})
    data = (run / "last.safetensors").read_bytes()
    (run / "last.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(["pretrain", "--resume", str(run)], capsys)
    assert code == 2
    assert "last.safetensors is truncated or corrupt" in err and "Traceback" not in err


@pytest.mark.parametrize("fault", ["nan_loss_at", "inf_grad_at"])
def test_nonfinite_step_stops_and_keeps_the_last_good_checkpoint(tmp_path, fault):
    task = Regression(**{fault: {5}})
    trainer = _trainer(task, tmp_path)
    with pytest.raises(NonFiniteLoss, match=r"became non-finite at step 5 \(epoch 1\).*last good checkpoint is kept"):
        trainer.fit(_loader)
    tensors, meta = read_checkpoint(tmp_path)
    assert json.loads(meta["position"])["global_step"] == 5  # steps 0-4 done, step 5 never applied
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith(("model/", "optim/")))


def test_nonfinite_steps_can_be_skipped_and_are_counted(tmp_path):
    task = Regression(nan_loss_at={1}, inf_grad_at={6})
    trainer = _trainer(task, tmp_path, on_nonfinite="skip")
    trainer.fit(_loader)
    assert trainer.tally.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in task.parameters())
    assert trainer.optimizer.state[task.net[0].weight]["step"] == 2 * STEPS_PER_EPOCH - 2
    assert [r["skipped_steps"] for r in read_results(tmp_path)] == ["1", "1"]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r.get("nonfinite_skipped")] == [2, 7]


def test_a_run_that_never_recovers_stops_even_when_skipping(tmp_path):
    trainer = _trainer(Regression(nan_loss_at=set(range(100))), tmp_path, epochs=4, on_nonfinite="skip")
    with pytest.raises(NonFiniteLoss, match="11 steps in a row"):
        trainer.fit(_loader)


def _image_folder(root, good: int, bad: int):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(good):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    for i in range(bad):
        (root / "a" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


def _folder_args(tmp_path, data, extra=()):
    sets = [s for s in TINY_OVERRIDES if not s.startswith(("data.train", "data.batch_size", "run.epochs"))]
    sets += ["data.batch_size=16", "run.epochs=1", "data.color_jitter=false", *extra]
    args = ["pretrain", "--data", str(data), "--out", str(tmp_path), "--quiet"]
    for s in sets:
        args += ["--set", s]
    return args


def test_unreadable_images_are_skipped_counted_and_bounded(tmp_path, capsys):
    data = tmp_path / "images"
    _image_folder(data, good=30, bad=2)
    code, _, err = run_cli(_folder_args(tmp_path, data, ["run.max_bad_image_fraction=0.1"]) + ["--name", "ok"], capsys)
    assert code == 0, err
    (row,) = read_results(tmp_path / "ok")
    assert row["unreadable_images"] == "2"  # both broken files lie in the 32 images of the epoch

    code, _, err = run_cli(_folder_args(tmp_path, data, ["run.max_bad_image_fraction=0.01"]) + ["--name", "strict"],
                           capsys)
    # The folder source or the engine (whichever judges first) stops the run with one line.
    assert code == 2 and "2 of" in err and "unreadable (more than 1.0%)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


class _Broken(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise DataError("images/x.png and 9 more could not be read")


def test_an_error_in_a_loader_worker_becomes_one_clear_line():
    with pytest.raises(DataError) as info:
        list(clear_worker_errors(DataLoader(_Broken(), batch_size=2, num_workers=1)))
    assert str(info.value) == "images/x.png and 9 more could not be read"


def test_collapse_statistics_and_warnings():
    k = 64
    uniform = collapse_stats(torch.full((10, k), 1 / k))
    assert uniform["teacher_entropy"] == pytest.approx(math.log(k)) and uniform["teacher_kl_uniform"] == pytest.approx(0, abs=1e-6)
    one_hot = collapse_stats(F.one_hot(torch.full((10,), 3), k).float())
    assert one_hot["teacher_entropy"] == pytest.approx(0, abs=1e-6) and one_hot["teacher_kl_uniform"] == pytest.approx(math.log(k))
    healthy = collapse_stats(F.one_hot(torch.arange(10) % k, k).float() * 0.9 + 0.1 / k)
    assert "uniform" in collapse_warning(_floats(uniform), k, 3)
    assert "one prototype wins" in collapse_warning(_floats(one_hot), k, 3)
    assert collapse_warning(_floats(healthy), k, 3) is None


def _floats(stats: dict) -> dict[str, float]:
    return {k: float(v) for k, v in stats.items()}


def test_results_png_is_drawn_at_each_epoch_end_from_the_logs(tmp_path):
    from matplotlib.image import imread

    from glsd_cli.engine.plots import _panels, _step_records

    trainer = _trainer(Regression(), tmp_path, epochs=1)
    trainer.plots = True
    trainer.fit(_loader)
    image = imread(tmp_path / "results.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert not list(tmp_path.glob(".results.png.tmp-*"))  # written atomically
    # The panels follow what was logged: here loss and lr per step, plus an epoch-end k-NN value.
    titles = [p[0] for p in _panels(_step_records(tmp_path), [{"epoch": "0", "knn_top1": "42.0"}])]
    assert titles == ["loss terms", "learning rate", "k-NN top-1 (%)"]
    on_masks = _panels(_step_records(tmp_path), [{"epoch": "0", "knn_top1": "42.0", "patch_knn_miou": "61.5"}])
    assert on_masks[-1] == ("patch k-NN mIoU (%)", "epoch", {"patch_knn_miou": ([1], [61.5])})


def _epochs(entropies, kls):
    return [{"teacher_entropy": e, "teacher_kl_uniform": kl} for e, kl in zip(entropies, kls)]


def test_collapse_warning_sees_a_slow_drift_to_uniform_that_no_threshold_catches():
    k = 256  # log K = 5.55: the issue-20 run drifted from one prototype to 4.39 nats without a warning
    drift = _epochs([2.0, 2.6, 3.1, 3.7, 4.39], [2.5, 2.0, 1.6, 1.2, 0.8])
    assert collapse_warning(drift[-1], k, 19) is None  # the single-epoch thresholds stay silent
    text = collapse_warning(drift[-1], k, 19, drift[:-1])
    assert "drifting toward uniform" in text and "3.10 → 3.70 → 4.39" in text
    # Rows as results.csv gives them back (strings; an epoch without statistics is skipped).
    as_logged = [{key: str(v) for key, v in row.items()} for row in drift[:-1]] + [{"teacher_entropy": ""}]
    assert "drifting toward uniform" in collapse_warning(drift[-1], k, 19, as_logged)


def test_collapse_warning_sees_a_drift_toward_one_prototype_and_spares_healthy_runs():
    k = 256
    drift = _epochs([2.0, 1.7, 1.4, 1.0], [2.0, 2.5, 3.0, 3.6])
    assert "one prototype" in collapse_warning(drift[-1], k, 4, drift[:-1])
    # Sharpening as it should: entropy falls, KL settles below half of log K.
    healthy = _epochs([5.0, 3.5, 2.5, 2.0, 1.8], [0.3, 0.9, 1.4, 1.7, 1.8])
    assert collapse_warning(healthy[-1], k, 5, healthy[:-1]) is None
    # Too few epochs to call a trend, and a high but flat entropy, are no drift.
    assert collapse_warning(drift[-1], k, 2, drift[-3:-1]) is None
    flat = _epochs([3.5, 3.4, 3.6, 3.5], [1.0, 1.0, 1.0, 1.0])
    assert collapse_warning(flat[-1], k, 4, flat[:-1]) is None
    # A rise that has turned: scenes-dino's first epochs (Sinkhorn targets), which then sharpened to
    # 2.64 nats by epoch 19 while its k-NN rose; the turn is not a drift.
    turned = _epochs([3.97, 4.82, 4.91, 4.71], [0.005, 0.006, 0.005, 0.005])
    assert collapse_warning(turned[-1], k, 3, turned[:-1]) is None
    # A rise that has levelled off: the dense bench's arms at texture scale 40 (every seed and arm);
    # over 50 epochs such a run sharpened. The drift (above) climbs every epoch to the last.
    levelled = _epochs([3.92, 4.71, 4.89, 4.90], [0.004, 0.005, 0.005, 0.005])
    assert collapse_warning(levelled[-1], k, 3, levelled[:-1]) is None


def test_collapse_statistics_in_parts_and_the_dense_head_warning():
    from glsd_cli.engine.monitors import DENSE, CollapseTally

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(30, 16, generator=g) * 3, -1)
    tally = CollapseTally()
    for part in probs.split([7, 20, 3]):
        tally.add(part)
    for key, value in collapse_stats(probs, DENSE).items():
        assert key.startswith(DENSE) and tally.stats(DENSE)[key].item() == pytest.approx(value.item(), rel=1e-5)
    k = 16
    one_hot = _floats(collapse_stats(F.one_hot(torch.full((10,), 3), k).float(), DENSE))
    warning = collapse_warning(one_hot, k, 2, prefix=DENSE)
    assert "one prototype wins" in warning and "dense" in warning
    assert collapse_warning(one_hot, k, 2) is None  # the global head's keys are absent: nothing to judge


def test_collapse_advice_does_not_suggest_the_sinkhorn_targets_a_run_already_has():
    from glsd_cli.config import resolve
    from glsd_cli.pretraining import build_pretraining

    k = 256
    drift = _epochs([2.0, 2.6, 3.1, 3.7, 4.39], [2.5, 2.0, 1.6, 1.2, 0.8])
    one_hot = {"teacher_entropy": 0.01, "teacher_kl_uniform": 5.4}
    for summary, history in ((drift[-1], drift[:-1]), (one_hot, [])):
        with_centre = collapse_warning(summary, k, 9, history)
        assert "centering=sinkhorn" in with_centre
        with_sinkhorn = collapse_warning(summary, k, 9, history, sinkhorn=True)
        assert "centering=sinkhorn" not in with_sinkhorn and "center_momentum" not in with_sinkhorn
        assert with_sinkhorn.split(":")[0] == with_centre.split(":")[0]  # the same warning, other advice
    # The loop passes what the run's config says.
    for centering, sinkhorn in (("sinkhorn", True), ("ema", False)):
        cfg = resolve("tiny-dino", TINY_OVERRIDES + [f'method.loss.centering="{centering}"'])
        assert build_pretraining(cfg).method.sinkhorn_targets is sinkhorn
