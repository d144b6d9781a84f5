import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from glsd_cli.config import Config, list_presets, parse_override, resolve
from glsd_cli.errors import ConfigError
from tests.cli_helpers import run_cli

REPO = Path(__file__).resolve().parent.parent


def test_every_preset_validates():
    assert {"tiny-dino", "vits16-dino"} <= set(list_presets())
    for name in list_presets():
        cfg = resolve(name)
        assert isinstance(cfg, Config)


def test_vits16_dino_is_the_paper_recipe():
    cfg = resolve("vits16-dino")
    assert cfg.model.arch == "vit_small_patch16_224" and cfg.head.out_dim == 65536
    assert (cfg.data.global_crop_size, cfg.data.local_crop_size, cfg.data.num_local_crops) == (224, 96, 8)
    assert cfg.optim.lr == 5e-4 and cfg.optim.warmup_epochs == 10 and cfg.run.epochs == 100
    assert cfg.method.loss.teacher_temp == 0.04 and cfg.optim.clip_grad == 3.0
    assert cfg.method.loss.centering == "ema" and cfg.method.loss.koleo_weight == 0  # DINO v1: neither
    assert cfg.method.local.matching == "none"


def test_overrides_parse_toml_values():
    assert parse_override("optim.lr=1e-3") == (["optim", "lr"], 1e-3)
    assert parse_override("data.train=synthetic") == (["data", "train"], "synthetic")
    assert parse_override("data.global_crop_scale=[0.3, 1.0]") == (["data", "global_crop_scale"], [0.3, 1.0])
    cfg = resolve("tiny-dino", ["optim.lr=0.01", "run.epochs=3"], {"data.batch_size": 8})
    assert cfg.optim.lr == 0.01 and cfg.run.epochs == 3 and cfg.data.batch_size == 8


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'.*Did you mean"):
        resolve("tiny-dino", ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="Did you mean 'optim.warmup_epochs'"):
        resolve("tiny-dino", ["optim.warmup_epoch=1"])


@pytest.mark.parametrize("args,needle", [
    (["pretrain", "--set", "optim.lrr=1"], "unknown key 'optim.lrr'. Did you mean 'optim.lr'?"),
    (["pretrain", "--set", "run.epochs=many"], "run.epochs"),
    (["pretrain", "--preset", "vits16-dinoo"], "unknown preset 'vits16-dinoo'. Did you mean 'vits16-dino'?"),
    (["pretrain", "--data", "/no/such/folder"], "does not exist"),
    (["presets", "show", "nope"], "unknown preset"),
    (["knn-eval", "/no/such/run"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, capsys, tmp_path):
    code, out, err = run_cli(args + (["--out", str(tmp_path)] if args[0] == "pretrain" else []), capsys)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err + out


def test_presets_list_and_show(capsys):
    code, out, _ = run_cli(["presets"], capsys)
    assert code == 0 and "tiny-dino" in out and "(default)" in out
    code, out, _ = run_cli(["presets", "show", "vits16-dino", "--set", "run.epochs=300"], capsys)
    assert code == 0 and json.loads(out)["run"]["epochs"] == 300


def test_help_lists_every_subcommand(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for name in ("pretrain", "linear-eval", "knn-eval", "finetune", "export", "presets"):
        assert name in out


def test_presets_come_from_the_imported_package():
    """The presets of the glsd_cli that was imported (here: this source tree), every file of presets/."""
    shipped = list_presets()
    assert set(shipped) == {p.stem for p in (REPO / "presets").glob("*.toml")}
    for name, file in shipped.items():
        assert file.read_text() == (REPO / "presets" / f"{name}.toml").read_text()


def test_source_tree_on_pythonpath_lists_its_presets(tmp_path):
    """`PYTHONPATH=checkout python -m glsd_cli presets` from elsewhere reads that checkout's presets."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "glsd_cli", "presets"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    assert listed == {p.stem for p in (REPO / "presets").glob("*.toml")}


@pytest.mark.parametrize("preset,setting,method,key", [
    ("tiny-simclr-sd", 'method.local.matching="geometric"', "simclr", "method.local"),
    ("tiny-simclr-sd", "method.loss.koleo_weight=0.5", "simclr", "method.loss"),
    ("tiny-byol-sd", "head.out_dim=7", "byol", "head.out_dim"),
    ("tiny-mocov3-sd", "data.num_local_crops=4", "mocov3", "data.num_local_crops"),
    ("tiny-geo", "method.contrastive.temperature=0.1", "dino", "method.contrastive"),
    ("tiny-geo", "method.sd.predictor_only_term=false", "dino", "method.sd.predictor_only_term"),
])
def test_a_setting_the_method_ignores_is_refused_with_one_line(tmp_path, capsys, preset, setting, method, key):
    code, out, err = run_cli(["pretrain", "--preset", preset, "--set", setting, "--out", str(tmp_path)], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"method '{method}'" in err and key in err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_each_method_config_round_trips_through_a_checkpoints_json():
    for name in ("tiny-geo", "tiny-simclr-sd", "tiny-byol-sd"):
        cfg = resolve(name)
        again = Config.from_json(cfg.to_json())
        assert again == cfg and type(again.method) is type(cfg.method)


@pytest.mark.parametrize("name", ["tiny-geo", "tiny-simclr-sd"])
def test_a_checkpoint_config_of_the_earlier_all_methods_layout_still_loads(name):
    # Until 2026-11-27 every run saved all methods' sections; a dino run's sd had predictor_only_term,
    # a two-view run kept the tiny DINO head and local crops it never used.
    cfg = resolve(name)
    old = json.loads(cfg.to_json())
    every = {"loss": json.loads(resolve("tiny-geo").to_json())["method"]["loss"],
             "local": json.loads(resolve("tiny-geo").to_json())["method"]["local"],
             "sd": {"enabled": cfg.method.sd.enabled, "layers": "all", "ratio": 0.8, "predictor_only_term": True},
             "contrastive": json.loads(resolve("tiny-simclr-sd").to_json())["method"]["contrastive"]}
    old["method"] = {"name": cfg.method.name, **every}
    old["head"] = json.loads(resolve("tiny-geo").to_json())["head"]
    old["data"]["num_local_crops"] = cfg.data.num_local_crops or 4
    again = Config.from_json(json.dumps(old))
    assert again.method == cfg.method and again.model == cfg.model
    assert again.data.num_local_crops == cfg.data.num_local_crops
