"""End to end through the CLI on tiny data: the files a run writes, and k-NN on its checkpoint."""
import csv
import json

import torch

from glsd_cli.engine.checkpoint import read_checkpoint
from tests.cli_helpers import run_cli
from tests.conftest import TINY_OVERRIDES


def _sets(extra=()):
    out = []
    for item in list(TINY_OVERRIDES) + list(extra):
        out += ["--set", item]
    return out


def test_pretrain_then_knn_eval(tmp_path, capsys):
    code, out, err = run_cli(["pretrain", "--out", str(tmp_path), "--name", "run", "--quiet", *_sets()], capsys)
    assert code == 0, err
    run = tmp_path / "run"
    assert {"config.json", "last.safetensors", "metrics.jsonl", "results.csv", "done.json"} <= {p.name for p in run.iterdir()}
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["head"]["out_dim"] == 64 and cfg["run"]["epochs"] == 2
    rows = list(csv.DictReader(open(run / "results.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert all(float(r["loss"]) > 0 for r in rows)
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 6 and {"lr", "weight_decay", "momentum", "teacher_temp", "loss"} <= set(lines[-1])
    tensors, meta = read_checkpoint(run)
    assert json.loads(meta["position"]) == {"epoch": 2, "step_in_epoch": 0, "global_step": 6}
    assert json.loads(meta["config"]) == cfg
    assert any(k.startswith("optim/") for k in tensors) and "rng/torch" in tensors
    # The teacher moved away from its initial copy of the student, and differs from the student.
    assert not torch.equal(tensors["model/teacher.backbone.model.blocks.0.attn.qkv.weight"],
                           tensors["model/student.backbone.model.blocks.0.attn.qkv.weight"])

    code, out, err = run_cli(["knn-eval", str(run), "--k", "1,5,20"], capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["k"] == 20 and 0 <= summary["top1"] <= 100
    saved = json.loads((run / "knn.json").read_text())
    assert saved["num_train"] == 96 and saved["num_test"] == 48 and set(saved["results"]) == {"1", "5", "20"}


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    args = ["pretrain", "--out", str(tmp_path), "--name", "run", "--quiet", *_sets(["run.epochs=1"])]
    assert run_cli(args, capsys)[0] == 0
    before = (tmp_path / "run" / "last.safetensors").read_bytes()
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "already holds a run" in err
    assert (tmp_path / "run" / "last.safetensors").read_bytes() == before


def test_progress_in_a_log_is_plain_lines(tmp_path, capsys):
    """stderr is not a terminal here (as under CI, SLURM or `nohup ... > log`): whole lines with the
    step, epoch, loss, lr, throughput and ETA — the first logged step and every epoch's end."""
    code, _, err = run_cli(["pretrain", "--out", str(tmp_path), "--name", "run", *_sets()], capsys)
    assert code == 0, err
    assert "━" not in err  # no bar drawn into the log
    lines = [line for line in err.splitlines() if line.startswith("train step ")]
    assert [line.split()[2] for line in lines] == ["1/6", "3/6", "6/6"]
    logged = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    for line in lines:
        step = int(line.split()[2].split("/")[0])
        fields = line.split()
        assert fields[fields.index("epoch") + 1] == f"{(step - 1) // 3 + 1}/2"
        assert float(fields[fields.index("loss") + 1]) == round(logged[step]["loss"], 4)
        assert float(fields[fields.index("lr") + 1]) == float(f"{logged[step]['lr']:.2e}")
        assert fields[fields.index("img/s") - 1].isdigit() and "eta" in fields
    assert lines[-1].endswith("eta 0:00:00")
