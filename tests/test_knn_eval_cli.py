"""`glsd knn-eval` end to end: the feature cache (reused, invalidated), per-block tables, subsets, errors."""
import csv
import json

import pytest
import torch

from glsd_cli.engine.checkpoint import read_checkpoint, save_tensors
from glsd_cli.eval import features as features_module
from glsd_cli.eval.feature_cache import weights_fingerprint
from glsd_cli.eval.features import parse_blocks
from glsd_cli.errors import GlsdError
from tests.cli_helpers import run_cli
from tests.eval_run import copy_run, pretrained_run

TEACHER_QKV = "model/teacher.backbone.model.blocks.0.attn.qkv.weight"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return pretrained_run(tmp_path_factory)


@pytest.fixture
def extractions(monkeypatch):
    """Counts every real feature extraction (the cache calls it through the features module)."""
    calls = []
    real = features_module.extract_representations

    def counting(backbone, source, *args, **kwargs):
        calls.append((source.uri, source.split, len(source)))
        return real(backbone, source, *args, **kwargs)

    monkeypatch.setattr(features_module, "extract_representations", counting)
    return calls


def _rewrite_checkpoint(path, change):
    tensors, meta = read_checkpoint(path)
    change(tensors)
    save_tensors(path, tensors, meta)


def test_cache_is_reused_and_invalidated_when_the_backbone_changes(run, tmp_path, capsys, extractions):
    mine = copy_run(run, tmp_path / "run")
    args = ["knn-eval", str(mine), "--k", "1,20", "--quiet"]
    assert run_cli(args, capsys)[0] == 0
    first = json.loads((mine / "knn.json").read_text())
    assert len(extractions) == 2 and first["feature_cache"] == {"folder": str(mine / "features"), "hits": 0, "misses": 2}

    assert run_cli(args, capsys)[0] == 0
    second = json.loads((mine / "knn.json").read_text())
    assert len(extractions) == 2, "the second call must not extract again"
    assert second["feature_cache"]["hits"] == 2 and second["results"] == first["results"]

    # Optimiser state is not part of the features: the entries stay valid.
    _rewrite_checkpoint(mine / "last.safetensors",
                        lambda t: t.update({k: v + 1 for k, v in t.items() if k.startswith("optim/")}))
    assert run_cli(args, capsys)[0] == 0
    assert len(extractions) == 2

    # The teacher backbone changed: both sets are extracted again and the stale entries are deleted.
    _rewrite_checkpoint(mine / "last.safetensors", lambda t: t.update({TEACHER_QKV: t[TEACHER_QKV] * 1.5}))
    assert run_cli(args, capsys)[0] == 0
    assert len(extractions) == 4
    third = json.loads((mine / "knn.json").read_text())
    assert third["feature_cache"]["misses"] == 2
    assert len(list((mine / "features").glob("*.safetensors"))) == 2

    assert run_cli(args + ["--no-cache"], capsys)[0] == 0
    assert len(extractions) == 6


def test_per_block_table_has_one_row_per_block(run, tmp_path, capsys):
    mine = copy_run(run, tmp_path / "run")
    code, out, err = run_cli(["knn-eval", str(mine), "--k", "5,20", "--layers", "all", "--quiet"], capsys)
    assert code == 0, err
    saved = json.loads((mine / "knn-layers.json").read_text())
    assert [row["block"] for row in saved["layers"]] == [1, 2] and saved["blocks_numbered_from"] == 1
    rows = list(csv.DictReader(open(mine / "knn-layers.csv")))
    assert [r["block"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"block", "k5_top1", "k5_top5", "k20_top1", "k20_top5"}
    assert json.loads(out.strip().splitlines()[-1])["block"] == 2
    assert "per block" in err and "│ 1 " in err and "│ 2 " in err
    # The last block's CLS after the final norm is the final representation: the same k-NN result.
    assert run_cli(["knn-eval", str(mine), "--k", "5,20", "--quiet"], capsys)[0] == 0
    final = json.loads((mine / "knn.json").read_text())
    assert saved["layers"][-1]["results"] == final["results"]


def test_train_fraction_and_student(run, tmp_path, capsys):
    mine = copy_run(run, tmp_path / "run")
    code, _, err = run_cli(["knn-eval", str(mine), "--k", "5", "--train-fraction", "0.5", "--student", "--quiet"],
                           capsys)
    assert code == 0, err
    saved = json.loads((mine / "knn-student-train0.5.json").read_text())
    # 96 training images, image i of class i mod 10; make_subset keeps round(0.5 x class size) of each class.
    counts = [sum(1 for i in range(96) if i % 10 == c) for c in range(10)]
    assert saved["num_train"] == sum(max(1, round(0.5 * n)) for n in counts)
    assert saved["backbone"] == "student" and saved["train_fraction"] == 0.5


@pytest.mark.parametrize("args,message", [
    (["--layers", "0"], "block 0 does not exist"),
    (["--layers", "3"], "blocks 1..2"),
    (["--layers", "x"], "--layers must be"),
    (["--k", "0"], "positive neighbour counts"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--train-fraction", "1.5"], "out of range"),
    (["--num-workers", "-1"], "--num-workers must be 0 or more"),
])
def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys, args, message):
    mine = copy_run(run, tmp_path / "run")
    code, _, err = run_cli(["knn-eval", str(mine), "--quiet", *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_parse_blocks_counts_from_one():
    assert parse_blocks(None, 12) is None
    assert parse_blocks("all", 3) == [0, 1, 2]
    assert parse_blocks("4,8,12", 12) == [3, 7, 11]
    assert parse_blocks("-1,1,1", 12) == [11, 0]  # duplicates dropped, order kept
    with pytest.raises(GlsdError):
        parse_blocks("13", 12)


def test_weights_fingerprint_follows_the_weights():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.weight[0, 0] += 1e-6
    assert weights_fingerprint(a) != weights_fingerprint(b)


def test_loader_workers_change_nothing_but_speed(run, tmp_path, capsys, monkeypatch):
    # Extraction in worker processes gives the same features, in the same order, as in-process.
    mine = copy_run(run, tmp_path / "run")
    seen = []
    real = features_module.extract_representations
    monkeypatch.setattr(features_module, "extract_representations",
                        lambda *a, **k: seen.append(a[6]) or real(*a, **k))  # (..., batch_size, num_workers, ...)
    results = []
    for workers in ("0", "2"):
        code, out, _ = run_cli(["knn-eval", str(mine), "--quiet", "--no-cache", "--num-workers", workers,
                                "-o", str(tmp_path / f"knn{workers}.json")], capsys)
        assert code == 0
        results.append(json.loads((tmp_path / f"knn{workers}.json").read_text())["results"])
    assert seen == [0, 0, 2, 2] and results[0] == results[1]
