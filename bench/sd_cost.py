"""What SDSSL's layer self-distillation costs per training step, against the same method without it.

For each (size, method) it times full training steps — forward, loss, backward, AdamW step, EMA —
of the baseline (`method.sd.enabled = false`) and of the SD variant (every block but the last
distilled), on random tensors shaped like the method's views (augmentation is not measured), and
reports the median step time, the peak memory and the trainable parameters.

Times: both arms in one process, their steps alternated, so load bursts on a shared machine hit
both alike; median and minimum over the timed steps (the minimum is the better estimate of the
intrinsic cost when the machine is busy). Memory: each arm in its own process, so the peak is its own:
- CPU: peak resident set size over 2 steps (`resource.getrusage(...).ru_maxrss`), and its rise over the resident
  size right after the model and optimiser were built ("step memory": activations, gradients,
  optimiser state, allocator caches);
- CUDA: `torch.cuda.max_memory_allocated()`.

Sizes: `tiny` = the tiny-* presets (tiny ViT, 32-px views); `vits16` = the vits16-* presets (ViT-S/16,
224-px views; 96-px locals for geo). Methods: simclr, byol, mocov3 (SDSSL) and geo (SD on GLSD).

    python bench/sd_cost.py                        # all, writes bench/results/sd_cost.json
    python bench/sd_cost.py --sizes tiny --steps 5 --batch 32

On a shared machine the times are noisy: compare arms of one run, not runs. OMP_WAIT_POLICY is set to
PASSIVE in the child processes unless already set: with busy-waiting OpenMP threads an
oversubscribed CPU runs these small steps orders of magnitude slower.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {
    ("tiny", "simclr"): "tiny-simclr-sd", ("tiny", "byol"): "tiny-byol-sd", ("tiny", "mocov3"): "tiny-mocov3-sd",
    ("tiny", "geo"): "tiny-geo-sd",
    ("vits16", "simclr"): "vits16-simclr-sd", ("vits16", "byol"): "vits16-byol-sd",
    ("vits16", "mocov3"): "vits16-mocov3-sd", ("vits16", "geo"): "vits16-geo-sd",
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _build(spec: dict, sd: bool):
    """(method, optimiser, batch, ctx) of one arm."""
    import torch

    from glsd_cli.config import resolve
    from glsd_cli.pretraining import prepare
    from glsd_cli.engine.optim import adamw, param_groups
    from glsd_cli.engine.task import ScheduledValues
    from glsd_cli.methods import StepContext, build_method

    torch.manual_seed(0)
    cfg = resolve(spec["preset"], [f"method.sd.enabled={'true' if sd else 'false'}",
                                   f"data.batch_size={spec['batch']}"])
    cfg, _ = prepare(cfg, 2000)  # tiny presets' 'auto' values, as for the built-in data
    device = torch.device(spec["device"])
    method = build_method(cfg).to(device)
    method.train()
    opt = adamw(param_groups(method.trainable_modules()))
    d, b = cfg.data, spec["batch"]
    g = torch.Generator().manual_seed(0)
    n_local = d.num_local_crops if cfg.method.name == "dino" else 0
    sizes = [d.global_crop_size] * 2 + [d.local_crop_size] * n_local
    batch = {"views": [torch.randn(b, 3, s, s, generator=g).to(device) for s in sizes]}
    if cfg.method.name == "dino":  # geometric matching needs each view's box and flip
        full = float(d.global_crop_size)
        batch["boxes"] = torch.tensor([[0.0, 0.0, full, full]]).repeat(b, len(sizes), 1).to(device)
        batch["flips"] = torch.zeros(b, len(sizes), dtype=torch.bool, device=device)
    ctx = StepContext(epoch=1, step=0, total_steps=100,
                      values=ScheduledValues(lr=1e-4, momentum=0.996, teacher_temp=0.04, sd_weight=0.5))
    params = sum(p.numel() for p in method.trainable_modules().parameters() if p.requires_grad)
    return method, opt, batch, ctx, {"trainable_params": params, "views": sizes}


def _step(method, opt, batch, ctx) -> None:
    """One engine step: forward + loss, backward, AdamW, EMA / centres."""
    import torch

    out = method.training_step(batch, ctx)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    with torch.no_grad():
        method.after_step(ctx, [out])


def child(spec: dict) -> dict:
    """mode 'time': both arms in one process, steps alternated (baseline, SD, baseline, ...) so that
    a burst of load on a shared machine hits both alike. mode 'memory': one arm, its peak memory."""
    import torch

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if spec["mode"] == "memory":
        method, opt, batch, ctx, info = _build(spec, spec["sd"])
        rss_built = _rss_mb()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            _step(method, opt, batch, ctx)
        if device.type == "cuda":
            return {**info, "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20}
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return {**info, "peak_mem_mb": peak, "step_mem_mb": peak - rss_built}
    arms = {name: _build(spec, name == "sd") for name in ("baseline", "sd")}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(spec["warmup"] + spec["steps"]):
        for name, (method, opt, batch, ctx, _) in arms.items():
            sync()
            t0 = time.perf_counter()
            _step(method, opt, batch, ctx)
            sync()
            if i >= spec["warmup"]:
                times[name].append(time.perf_counter() - t0)
    return {name: {"step_s_median": statistics.median(t), "step_s_min": min(t), "step_s_all": t}
            for name, t in times.items()}


def run_child(spec: dict) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="tiny,vits16")
    ap.add_argument("--methods", default="simclr,byol,mocov3,geo")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default: tiny 32, vits16 8)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sd_cost.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    rows = []
    for size in args.sizes.split(","):
        for name in args.methods.split(","):
            preset = PRESETS[(size, name)]
            batch = args.batch or (32 if size == "tiny" else 8)
            spec = {"preset": preset, "batch": batch, "steps": args.steps, "warmup": args.warmup,
                    "threads": args.threads, "device": args.device}
            timing = run_child({**spec, "mode": "time"})
            arms = {name: {**timing[name], **run_child({**spec, "mode": "memory", "sd": name == "sd"})}
                    for name in ("baseline", "sd")}
            base, sd = arms["baseline"], arms["sd"]
            row = {"size": size, "method": name, "preset": preset, "batch": batch, **arms,
                   "time_ratio_median": sd["step_s_median"] / base["step_s_median"],
                   "time_ratio_min": sd["step_s_min"] / base["step_s_min"],
                   "peak_mem_delta_mb": sd["peak_mem_mb"] - base["peak_mem_mb"],
                   "params_ratio": sd["trainable_params"] / base["trainable_params"]}
            rows.append(row)
            step_mem = (f"  step mem {base['step_mem_mb']:.0f} -> {sd['step_mem_mb']:.0f} MB"
                        if "step_mem_mb" in base else "")
            print(f"{size:<7}{name:<7} batch {batch:<3} step (median) {base['step_s_median']:.3f} -> "
                  f"{sd['step_s_median']:.3f} s (x{row['time_ratio_median']:.2f}; min x{row['time_ratio_min']:.2f})"
                  f"  peak mem {base['peak_mem_mb']:.0f} -> {sd['peak_mem_mb']:.0f} MB{step_mem}"
                  f"  params {base['trainable_params'] / 1e6:.2f}M -> {sd['trainable_params'] / 1e6:.2f}M",
                  flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": args.device, "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(), "platform": platform.platform(), "python": platform.python_version(),
            "sd_weight": 0.5, "note": "shared machine: compare arms within this run only"}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
