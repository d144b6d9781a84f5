"""Recipe calibration on the built-in scenes: patch k-NN mIoU after every epoch, against random init.

Each arm is a preset plus overrides, named by words (arm_config); the arms run in parallel processes. Per arm it writes
OUT/NAME.json: the per-epoch rows of results.csv (teacher entropy and KL, and `patch_knn_miou`:
patch k-NN mIoU with a 400-image bank and 150 queries, from pretraining's epoch-end monitor, beside
its CLS k-NN top-1), every collapse warning of either head over the run (the Trainer's rules), and
the final patch k-NN mIoU (2000-image and 250-image banks, 500 queries) of the trained teacher and
of the same network at its random initialisation.

    python bench/dense_calibrate.py --out /tmp/calib --parallel 2 geo-32-e5 geo-32-sk-e5 ...
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOW_LABEL_BANK = 250  # final patch k-NN also with a 250-image bank: random features need many more neighbours

# An arm is named by '-'-separated words: a preset, then changes, e.g. geo-32-sk-k64-e20.
PRESETS = {"scenes": "scenes-dino", "scenesgeo": "scenes-geo", "dino": "tiny-dino", "geo": "tiny-geo", "sim": "tiny-sim", "geosd": "tiny-geo-sd"}
WORDS = {
    "32": ['data.train="synthetic-scenes:size=32"'],          # 32-px scenes, the tiny presets' views (8x8 tokens)
    "64": ['data.train="synthetic-scenes"', "data.global_crop_size=64", "data.local_crop_size=32",
           "model.patch_size=8"],                             # 64-px scenes, 8-px tokens (8x8 tokens)
    "sk": ['method.loss.centering="sinkhorn"'],
    "m99": ["optim.momentum_teacher=0.99"], "m996": ["optim.momentum_teacher=0.996"],
    "m96": ["optim.momentum_teacher=0.96"],
    "t04": ["method.loss.teacher_temp=0.04", "method.loss.warmup_teacher_temp=0.04"],
    "t07": ["method.loss.teacher_temp=0.07", "method.loss.warmup_teacher_temp=0.04",
            "method.loss.warmup_teacher_temp_epochs=1"],
    "t01": ["method.loss.teacher_temp=0.01", "method.loss.warmup_teacher_temp=0.01"],
    "lr2e2": ["optim.lr=2e-2"], "lr1e2": ["optim.lr=1e-2"], "lr2e3": ["optim.lr=2e-3"], "lr1e3": ["optim.lr=1e-3"],
    "k64": ["method.local.out_dim=64"], "k256": ["method.local.out_dim=256"], "h64": ["head.out_dim=64"],
    "w08": ["method.local.weight=0.8"], "w02": ["method.local.weight=0.2"],
    "nokoleo": ["method.loss.koleo_weight=0"], "koleo01": ["method.loss.koleo_weight=0.1"],
    "l2": ["data.num_local_crops=2"], "l6": ["data.num_local_crops=6"],
    "c99": ["method.loss.center_momentum=0.99"],
    "normlast": ["head.norm_last_layer=true"],
    # The fmnist-* presets' recipe (stable over 3x their epochs there): size-aware prototypes,
    # DINO's prototype layer (weight-normalised, frozen for the first epoch), teacher momentum 0.996.
    "fm": ['head.out_dim="auto"', "head.norm_last_layer=true", "head.freeze_last_layer_epochs=1",
           "optim.momentum_teacher=0.996"],
    "fz1": ["head.freeze_last_layer_epochs=1"], "fzall": ["head.freeze_last_layer_epochs=1000"],
    "dp0": ["model.drop_path_rate=0.0"], "b32": ["data.batch_size=32"],
    # Small crops: a view then mostly shows one region, so its class is what all views of it agree on.
    "gs": ["data.global_crop_scale=[0.15, 0.4]", "data.local_crop_scale=[0.04, 0.15]"],
    "gs2": ["data.global_crop_scale=[0.25, 0.6]", "data.local_crop_scale=[0.05, 0.25]"],
    # One linear layer before the heads' bottleneck (DINO's MLP has 3): the backbone must then carry the
    # nonlinear texture features itself rather than leave them to the heads.
    "hl1": ["head.num_layers=1"],
}


def arm_config(name: str) -> tuple[str, list[str]]:
    """(preset, overrides) of an arm name such as geo-32-sk-e20: see WORDS; eN sets the epochs, sN the
    seed, scN the scenes' texture scale in percent."""
    if name == "smoke":
        return "tiny-geo", ['data.train="synthetic-scenes:train=128,val=32,size=32"', "run.epochs=1",
                            "data.batch_size=32"]
    first, *words = name.split("-")
    sets: list[str] = []
    for word in words:
        if word.startswith("e") and word[1:].isdigit():
            sets.append(f"run.epochs={word[1:]}")
        elif word.startswith("sc") and word[2:].isdigit():
            # Textures at N % of their length scale: at 50 (periods 2.5-4 px) an 8-px token holds 2-3 periods.
            sets.append(f'data.train="synthetic-scenes:scale={word[2:]}"')
        elif word.startswith("s") and word[1:].isdigit():
            sets.append(f"run.seed={word[1:]}")
        else:
            sets += WORDS[word]
    return PRESETS[first], sets


def patch_knn(backbone, uri: str, size: int, device, bank: int | None = None) -> float:
    """Patch k-NN mIoU on the whole val split, with all training images or a seeded `bank` of them."""
    from glsd_cli.data.sources import open_source
    from glsd_cli.data.subsets import make_subset
    from glsd_cli.eval.dense_command import patch_knn_miou

    train = open_source(uri, "train")
    if bank and bank < len(train):
        train = make_subset(train, count=bank, seed=0)
    return patch_knn_miou(backbone, train, open_source(uri, "val"), size, device)


def run_one(name: str, out: Path, device: str) -> None:
    import torch
    from common import collapse_monitors  # bench/common.py, beside this script

    from glsd_cli.commands.pretrain import pretrain
    from glsd_cli.config import resolve
    from glsd_cli.engine.metrics import read_results
    from glsd_cli.eval.loading import backbone_to_evaluate

    preset, sets = arm_config(name)
    # The epoch-end monitor reports patch k-NN mIoU on segmentation data (400-image bank, 150 queries).
    cfg = resolve(preset, sets + [f'run.out="{out / "runs"}"', f'run.name="{name}"', f'run.device="{device}"',
                                  "data.num_workers=1"])
    started = time.time()
    run = pretrain(cfg, preset, quiet=True)
    seconds = time.time() - started
    dev = torch.device(device)
    cfg, teacher, _, _ = backbone_to_evaluate(run, dev)
    size, uri = cfg.data.global_crop_size, cfg.data.train
    trained = patch_knn(teacher, uri, size, dev)
    trained_250 = patch_knn(teacher, uri, size, dev, LOW_LABEL_BANK)
    _, random_backbone, _, _ = backbone_to_evaluate(run, dev, random_init=True)
    random_init = patch_knn(random_backbone, uri, size, dev)
    random_250 = patch_knn(random_backbone, uri, size, dev, LOW_LABEL_BANK)
    epochs = [{k: float(v) for k, v in row.items() if v != ""} for row in read_results(run)]
    record = {"arm": name, "preset": preset, "overrides": sets, "device": device, "pretrain_s": round(seconds, 1),
              "patch_knn_miou": round(trained, 2), "random_init_patch_knn_miou": round(random_init, 2),
              "gain": round(trained - random_init, 2), f"patch_knn_miou_bank{LOW_LABEL_BANK}": round(trained_250, 2),
              f"random_init_patch_knn_miou_bank{LOW_LABEL_BANK}": round(random_250, 2),
              f"gain_bank{LOW_LABEL_BANK}": round(trained_250 - random_250, 2),
              "warnings": collapse_monitors(run)["warnings"], "epochs": epochs}
    (out / f"{name}.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k != "epochs"}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arms", nargs="+", help="arm names: a preset word then changes, e.g. geo-32-sk-e20")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per arm")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.arms:
        arm_config(name)  # unknown words fail here, before anything runs
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        run_one(args.arms[0], args.out, args.device)
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_WAIT_POLICY="PASSIVE")
    pending, running = list(args.arms), []
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            log = open(args.out / f"{name}.log", "w")
            running.append((name, subprocess.Popen(
                [sys.executable, __file__, name, "--one", "--out", str(args.out), "--device", args.device,
                 "--threads", str(args.threads)], env=env, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(2)
        for name, proc in list(running):
            if proc.poll() is not None:
                running.remove((name, proc))
                tail = (args.out / f"{name}.log").read_text().strip().splitlines()[-1:]
                print(f"{name}: exit {proc.returncode}: {tail[0] if tail else ''}", flush=True)


if __name__ == "__main__":
    main()
