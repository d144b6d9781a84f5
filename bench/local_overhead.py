"""What the local loss costs per training step, and how much of it is matching.

Arms, on the same batch of real multi-crop views (built-in data), timed in one process:
  dino        global loss only (no dense head)
  dense-only  dense head + local cross-entropy with identity pairing (no matching): the dense head's own cost
  geometric   GLSD: geometric matching + hinge
  similarity  EsViT: similarity matching
The "matching overhead" is geometric (or similarity) minus dense-only. Peak memory is measured per arm in
a fresh subprocess (ru_maxrss on CPU, max_memory_allocated on CUDA).

    python bench/local_overhead.py --preset tiny-geo --batch 64
    python bench/local_overhead.py --preset vits16-geo --batch 8 --steps 3
Writes bench/results/local_overhead-<preset>.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from glsd_cli.config import resolve  # noqa: E402
from glsd_cli.data.loader import ViewsDataset  # noqa: E402
from glsd_cli.pretraining import make_views, prepare  # noqa: E402
from glsd_cli.data.synthetic import SyntheticTextures  # noqa: E402
from glsd_cli.engine.optim import adamw, param_groups  # noqa: E402
from glsd_cli.engine.task import ScheduledValues  # noqa: E402
from glsd_cli.methods import StepContext, build_method  # noqa: E402

ARMS = ("dino", "dense-only", "geometric", "similarity")


def build(preset: str, arm: str, batch: int, dense_out_dim: int | None, device: torch.device):
    matching = {"dino": "none", "dense-only": "geometric"}.get(arm, arm)
    sets = [f'method.local.matching="{matching}"', "run.knn_monitor=false"]
    if dense_out_dim:
        sets.append(f"method.local.out_dim={dense_out_dim}")
    cfg = resolve(preset, sets)
    size = max(cfg.data.global_crop_size, 32)
    source = SyntheticTextures("train", batch, size=size)
    cfg, _ = prepare(cfg, 1_281_167 if cfg.data.global_crop_size >= 224 else len(source))
    torch.manual_seed(0)
    method = build_method(cfg).to(device)
    dataset = ViewsDataset(source, make_views(cfg), 0)
    data = default_collate([dataset[i] for i in range(batch)])
    data = {k: ([v.to(device) for v in val] if isinstance(val, list) else val.to(device)) if k != "label" else val
            for k, val in data.items()}
    if arm == "dense-only":
        import glsd_cli.matching as matching

        def identity_match(student_boxes, student_flips, student_grid, teacher_boxes, teacher_flips, teacher_grid, hinge=True):
            # Pair student token i with teacher token i mod N_t: the dense head's work without matching.
            n_s, n_t = student_grid[0] * student_grid[1], teacher_grid[0] * teacher_grid[1]
            idx = (torch.arange(n_s, device=student_boxes.device) % n_t).expand(len(student_boxes), n_s)
            return idx, torch.ones_like(idx, dtype=torch.bool)

        matching.match_geometric = identity_match  # geometric_matches calls it per run of views
    return cfg, method, data


def time_arm(preset, arm, batch, steps, dense_out_dim, device) -> dict:
    cfg, method, data = build(preset, arm, batch, dense_out_dim, device)
    opt = adamw(param_groups(method.trainable_modules()))
    ctx = StepContext(epoch=1, step=0, total_steps=100,
                      values=ScheduledValues(lr=1e-4, teacher_temp=0.04, momentum=0.996))
    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = method.training_step(data, ctx)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        with torch.no_grad():
            method.after_step(ctx, [out])
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    times.sort()
    step = times[len(times) // 2]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"arm": arm, "step_s": step, "images_per_s": batch / step, "peak_mib": peak,
            "dense_out_dim": cfg.method.local.out_dim, "out_dim": cfg.head.out_dim}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-geo")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dense-out-dim", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # child process: one arm
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.arm:
        print(json.dumps(time_arm(args.preset, args.arm, args.batch, args.steps, args.dense_out_dim, device)))
        return
    rows = []
    for arm in ARMS:  # one subprocess per arm so that peak memory is the arm's own
        cmd = [sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch), "--steps",
               str(args.steps), "--device", args.device, "--arm", arm]
        if args.dense_out_dim:
            cmd += ["--dense-out-dim", str(args.dense_out_dim)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{arm:<11} {rows[-1]['step_s'] * 1000:8.1f} ms/step  {rows[-1]['peak_mib']:8.0f} MiB", flush=True)
    by = {r["arm"]: r for r in rows}
    dense = by["dense-only"]["step_s"] - by["dino"]["step_s"]
    summary = {
        "preset": args.preset, "batch": args.batch, "device": args.device, "torch_threads": torch.get_num_threads(),
        "arms": rows,
        "dense_head_cost_s": dense,
        "geometric_matching_overhead_s": by["geometric"]["step_s"] - by["dense-only"]["step_s"],
        "similarity_matching_overhead_s": by["similarity"]["step_s"] - by["dense-only"]["step_s"],
    }
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"local_overhead-{Path(args.preset).stem}" + (f"-d{args.dense_out_dim}" if args.dense_out_dim else "")
    (out_dir / f"{name}.json").write_text(json.dumps(summary, indent=2))
    print("\n| arm | ms/step | images/s | peak MiB |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['step_s'] * 1000:.1f} | {r['images_per_s']:.1f} | {r['peak_mib']:.0f} |")
    print(f"\ndense head: +{dense * 1000:.1f} ms; geometric matching: "
          f"+{summary['geometric_matching_overhead_s'] * 1000:.1f} ms; similarity matching: "
          f"+{summary['similarity_matching_overhead_s'] * 1000:.1f} ms per step")


if __name__ == "__main__":
    main()
