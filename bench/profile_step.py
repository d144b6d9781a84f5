"""Where a step's time goes, by torch.profiler: the engine's full training step of a preset and the
device photometric pass of one of its batches, each as a table of the operators with the most device
(GPU) time, or CPU time on a CPU. For finding the overhead that bench/step_bound.py and
bench/end_to_end.py measure, not for reporting speeds.

    python bench/profile_step.py --device cuda --preset vits16-geo --batch 128
    python bench/profile_step.py --preset tiny-geo --batch 16          # CPU
Writes the tables to --out (text) and prints them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, bench_config, device_and_threads, sync  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402
from train_precision import batches  # noqa: E402

from glsd_cli.data.loader import ViewsDataset  # noqa: E402
from glsd_cli.data.photometric import DevicePhotometric  # noqa: E402
from glsd_cli.data.synthetic import SyntheticTextures  # noqa: E402
from glsd_cli.engine.optim import adamw, param_groups  # noqa: E402
from glsd_cli.engine.trainer import Trainer  # noqa: E402
from glsd_cli.methods import build_method  # noqa: E402
from glsd_cli.pretraining import build_schedules, make_views  # noqa: E402


def table(prof, device: torch.device, rows: int) -> str:
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
    except (AttributeError, KeyError):  # older torch names it cuda_time
        return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-geo")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after 3 untimed)")
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "profile_step.txt")
    args = ap.parse_args()
    device = device_and_threads(args.device, args.threads)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    cfg = bench_config(args.preset)
    data = batches(cfg, args.batch, 2, device)
    torch.manual_seed(0)
    method = build_method(cfg).to(device)
    total = args.steps + 3
    trainer = Trainer(task=method, optimizer=adamw(param_groups(method.trainable_modules())),
                      schedules=build_schedules(cfg, method, total), epochs=1, steps_per_epoch=total, run_dir=None,
                      device=device, config_json="{}", precision=args.precision, clip_grad=cfg.optim.clip_grad,
                      quiet=True)
    for step in range(3):
        trainer.train_step([data[step % 2]], step)
    sync(device)
    with profile(activities=activities) as prof:
        for step in range(3, total):
            trainer.train_step([data[step % 2]], step)
        sync(device)
    text = [f"== {args.preset}, batch {args.batch}, {args.precision}, {args.steps} steps on {device}",
            table(prof, device, args.rows)]

    source = SyntheticTextures("train", args.batch, size=max(cfg.data.global_crop_size, 32))
    dataset = ViewsDataset(source, make_views(cfg), seed=0, photometric_on_device=True)
    host_batch = default_collate([dataset[i] for i in range(args.batch)])
    photometric = DevicePhotometric(device, cfg.data.color_jitter)
    for _ in range(2):
        photometric.prepare(host_batch)
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(3):
            photometric.prepare(host_batch)
        sync(device)
    text += [f"== device photometric pass of a batch of {args.batch}, 3 times", table(prof, device, args.rows)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
