"""Training-step throughput in fp32 vs bf16 (and fp16 on a GPU), and how close their loss curves stay.

Each arm trains the same model from the same initialisation on the same pre-built multi-crop batches
(built-in data, so the data pipeline is not timed) through the engine's real step: forward under
autocast, backward, per-parameter clipping, AdamW, EMA teacher and centre update.
    python bench/train_precision.py                                   # tiny-dino and ViT-S/16, CPU
    python bench/train_precision.py --presets tiny-dino --steps 60
Writes bench/results/train_precision.json (and -cuda.json on a GPU; --out elsewhere, e.g. for a smoke
run) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, bench_config, device_and_threads, write_report  # noqa: E402  (first: sets paths)

import torch  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from glsd_cli.data.loader import ViewsDataset  # noqa: E402
from glsd_cli.data.photometric import DevicePhotometric  # noqa: E402
from glsd_cli.data.synthetic import SyntheticTextures  # noqa: E402
from glsd_cli.engine.optim import adamw, param_groups  # noqa: E402
from glsd_cli.engine.precision import cpu_supports_bf16  # noqa: E402
from glsd_cli.pretraining import build_schedules, make_views  # noqa: E402
from glsd_cli.engine.trainer import Trainer  # noqa: E402
from glsd_cli.methods import build_method  # noqa: E402

# preset → (batch, loss-curve steps, distinct batches cycled); ViT-S/16 multi-crop is ~100× the work.
DEFAULTS = {"tiny-dino": (64, 40, 8), "vits16-dino": (8, 6, 2)}


def batches(cfg, batch: int, count: int, device: torch.device) -> list[dict]:
    """`count` multi-crop batches of the built-in data, ready on the device (crops in this process,
    the photometric part batched on the device: quick to build even for large batches)."""
    size = max(cfg.data.global_crop_size, 32)
    source = SyntheticTextures("train", batch * count, size=size)
    dataset = ViewsDataset(source, make_views(cfg), seed=0, photometric_on_device=True)
    photometric = DevicePhotometric(device, cfg.data.color_jitter)
    out = []
    for i in range(count):
        b = photometric.prepare(default_collate([dataset[j] for j in range(i * batch, (i + 1) * batch)]))
        out.append({"views": b["views"], "boxes": b["boxes"].to(device), "flips": b["flips"].to(device)})
    return out


def run_arm(cfg, precision: str, data: list[dict], steps: int, warmup: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    method = build_method(cfg).to(device)
    total = max(steps, 1)
    trainer = Trainer(task=method, optimizer=adamw(param_groups(method.trainable_modules())),
                      schedules=build_schedules(cfg, method, total), epochs=1, steps_per_epoch=total, run_dir=None,
                      device=device, config_json="{}", precision=precision, clip_grad=cfg.optim.clip_grad, quiet=True)
    losses, times = [], []
    for step in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        metrics = trainer.train_step([data[step % len(data)]], step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    timed = times[warmup:] or times
    step_s = statistics.median(timed)
    batch = len(data[0]["views"][0])
    return {"precision": precision, "median_step_s": step_s, "images_per_s": batch / step_s,
            "step_s_all": times, "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny-dino,vits16-dino")
    ap.add_argument("--steps", type=int, default=None, help="steps per arm (default: per preset)")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default: per preset)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None,
                    help="result file (default: bench/results/train_precision[-cuda].json)")
    args = ap.parse_args()
    device = device_and_threads(args.device, args.threads)
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "cpu_native_bf16": cpu_supports_bf16(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "presets": {}}
    rows = []
    for preset in args.presets.split(","):
        batch, steps, distinct = DEFAULTS.get(preset, (16, 10, 2))
        batch, steps = args.batch or batch, args.steps or steps
        cfg = bench_config(preset)
        data = batches(cfg, batch, distinct, device)
        arms = [run_arm(cfg, p, data, steps, args.warmup, device) for p in precisions]
        ref = arms[0]["losses"]
        for arm in arms:
            rel = [abs(a - b) / abs(b) for a, b in zip(arm["losses"], ref)]
            arm["max_rel_loss_diff_vs_fp32"] = max(rel)
            arm["speedup_vs_fp32"] = arms[0]["median_step_s"] / arm["median_step_s"]
            rows.append((preset, batch, steps, arm))
        report["presets"][preset] = {"batch": batch, "steps": steps, "arms": arms}
    print(f"device: {report['device']}, threads {report['threads']}, native bf16 on CPU: {report['cpu_native_bf16']}")
    print("| preset | batch | steps | precision | step (s, median) | images/s | speed-up | max rel. loss diff vs fp32 | final loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset, batch, steps, a in rows:
        print(f"| {preset} | {batch} | {steps} | {a['precision']} | {a['median_step_s']:.3f} | {a['images_per_s']:.1f} | "
              f"{a['speedup_vs_fp32']:.2f}× | {a['max_rel_loss_diff_vs_fp32']:.2e} | {a['losses'][-1]:.4f} |")
    out = args.out or RESULTS / f"train_precision{'-cuda' if device.type == 'cuda' else ''}.json"
    write_report(out, report)


if __name__ == "__main__":
    main()
