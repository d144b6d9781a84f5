"""Wall time of `glsd linear-eval`: the cached mode against the augmented (DINO) mode.

Arms, one after the other in one process, on the same checkpoint, data, epochs and batch size:
  cached, cold   --cached with an empty feature cache: extraction + training of DINOv2's 13-lr grid
  cached, warm   --cached again: the features come from the on-disk cache, training only
  augmented      the default mode: the frozen backbone runs on RandomResizedCrop + flip views every step
Each arm reports its seconds of feature extraction and of probe training, and the final-epoch val
top-1 at the protocol lr (so the speed is not bought with accuracy).

Without --checkpoint, a tiny checkpoint is pre-trained first (the tiny-dino preset for one epoch on the
built-in data) and not timed.

    python bench/linear_eval_speed.py                              # writes bench/results/linear_eval_speed.json
    python bench/linear_eval_speed.py --checkpoint runs/demo --epochs 20 --train-images 2000

On a shared CPU machine the times are noisy; OMP_WAIT_POLICY is set to PASSIVE unless already set:
busy-waiting OpenMP threads make an oversubscribed CPU run these small steps many times slower.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from glsd_cli.config import resolve  # noqa: E402
from glsd_cli.engine.checkpoint import atomic_write_bytes  # noqa: E402
from glsd_cli.commands.pretrain import pretrain  # noqa: E402
from glsd_cli.eval.linear import LinearOptions, run_linear_eval  # noqa: E402

RESULT = ROOT / "bench" / "results" / "linear_eval_speed.json"


def tiny_checkpoint(folder: Path, data: str) -> Path:
    cfg = resolve("tiny-dino", [f'data.train="{data}"', "run.epochs=1", "run.knn_monitor=false",
                                "data.num_workers=0", f'run.out="{folder}"', 'run.name="bench"'])
    return pretrain(cfg, "tiny-dino", quiet=True)


def run_arm(name: str, checkpoint: Path, args, folder: Path, cache_dir: Path, cached: bool) -> dict:
    opts = LinearOptions(train_uri=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         cached=cached, num_workers=args.workers, device=args.device, cache_dir=cache_dir,
                         output=folder / f"{name.replace(', ', '-')}.json", quiet=True)
    started = time.perf_counter()
    result = run_linear_eval(checkpoint, opts)
    wall = time.perf_counter() - started
    return {"arm": name, "wall_s": round(wall, 2), "features_s": result["seconds"]["features"],
            "training_s": result["seconds"]["training"], "lrs_trained": len(result["lr_grid_per_256"]),
            "final_top1": round(result["summary"]["top1"], 2), "num_train": result["num_train"],
            "num_val": result["num_val"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a run directory or checkpoint (default: pre-train a tiny one)")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--val-images", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1.0, help="per 256 images; tiny data needs far more than 0.001")
    parser.add_argument("--workers", type=int, default=0, help="data-loading workers of the augmented arm")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.data = f"synthetic:train={args.train_images},val={args.val_images}"

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = args.checkpoint or tiny_checkpoint(folder / "runs", args.data)
        cache = folder / "features"
        arms = [run_arm("cached, cold", checkpoint, args, folder, cache, cached=True),
                run_arm("cached, warm", checkpoint, args, folder, cache, cached=True),
                run_arm("augmented", checkpoint, args, folder, cache, cached=False)]
    augmented = arms[-1]["wall_s"]
    for arm in arms:
        arm["speedup_vs_augmented"] = round(augmented / arm["wall_s"], 1)
    report = {"checkpoint": str(args.checkpoint or "tiny-dino, 1 epoch (pre-trained by the benchmark)"),
              "data": args.data, "epochs": args.epochs, "batch_size": args.batch_size, "lr_per_256": args.lr,
              "device": str(args.device), "torch_threads": torch.get_num_threads(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2), "arms": arms}
    atomic_write_bytes(args.out, (json.dumps(report, indent=2) + "\n").encode())
    print(f"linear-eval wall time, {args.data}, {args.epochs} epochs, batch {args.batch_size}:\n")
    print("| arm | wall s | features s | training s | lrs | final top-1 | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for a in arms:
        print(f"| {a['arm']} | {a['wall_s']} | {a['features_s']} | {a['training_s']} | {a['lrs_trained']} | "
              f"{a['final_top1']} | {a['speedup_vs_augmented']}x |")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
