"""What a user sees: end-to-end `glsd pretrain` images/s on a folder of JPEGs, for each place the
photometric augmentation can run (data.augment_on = workers | device), beside the loader alone.

The folder is generated once (--images JPEGs with ImageNet-like sizes: shorter side 300-500 px, aspect
3:4 to 4:3, smooth random content at quality 90) under --folder. Each arm runs the real command
(`python -m glsd_cli pretrain`, one epoch, a metrics.jsonl line every --log-every steps) and its images/s
is the images over the time of the windows that start after the loader's prefetch buffer (workers x 2 batches, ready
before the first step) has been used up twice over; the first windows, which that buffer inflates, are
reported apart. "loader alone" iterates the same DataLoader (same workers, pinned memory) without a model
and, for the device arm, times the batched photometric pass on the device separately.

    python bench/end_to_end.py --device cuda --batch 128 --workers 14 \
        --arms vits16-dino:workers,vits16-dino:device,vits16-geo:device,vits16-geo:workers
    python bench/end_to_end.py                   # CPU: tiny-dino, 2 workers, small images
Writes bench/results/end_to_end[-cuda].json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, bench_config, device_and_threads, machine, write_report  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from glsd_cli.data.loader import EpochSampler, ViewsDataset, make_loader  # noqa: E402
from glsd_cli.data.photometric import DevicePhotometric  # noqa: E402
from glsd_cli.data.sources import open_source  # noqa: E402
from glsd_cli.pretraining import make_views  # noqa: E402

PREFETCH = 2  # torch's DataLoader default prefetch_factor


def _write_jpegs(job: tuple[Path, int, int, int]) -> None:
    from torchvision.io import encode_jpeg, write_file

    folder, start, end, seed = job
    g = torch.Generator().manual_seed(seed * 1_000_003 + start)
    for i in range(start, end):
        short = int(torch.randint(300, 501, (), generator=g))
        aspect = 0.75 + 0.5 * float(torch.rand((), generator=g))
        h, w = (short, int(short * aspect)) if aspect >= 1 else (int(short / aspect), short)
        coarse = torch.rand(1, 3, max(2, h // 24), max(2, w // 24), generator=g)
        img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
        img = (img + 0.08 * torch.randn(1, 3, h, w, generator=g)).clamp(0, 1)
        write_file(str(folder / f"{i:06d}.jpg"), encode_jpeg((img[0] * 255).to(torch.uint8), quality=90))


def jpeg_folder(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` JPEGs in `folder` (made once, in parallel; an existing complete folder is reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) >= count:
        return folder
    procs = max(1, (os.cpu_count() or 1))
    step = -(-count // procs)
    jobs = [(folder, s, min(count, s + step), seed) for s in range(0, count, step)]
    t0 = time.perf_counter()
    with Pool(procs) as pool:
        pool.map(_write_jpegs, jobs)
    print(f"wrote {count} JPEGs to {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def steady_rate(windows: list[tuple[int, float]], skip_steps: int, images_per_window: int
                ) -> tuple[float, list[float]]:
    """Images/s over the windows logged after `skip_steps` (their images over their time: workers hand
    over batches in bursts, so the median window would overstate a starved run), and the skipped
    windows' rates."""
    late = [r for step, r in windows if step > skip_steps]
    early = [r for step, r in windows if step <= skip_steps]
    if not late:
        return float("nan"), early
    return len(late) * images_per_window / sum(images_per_window / r for r in late), early


def pretrain_arm(args, preset: str, mode: str, folder: Path, out: Path) -> dict:
    name = f"{preset}-{mode}"
    shutil.rmtree(out / name, ignore_errors=True)  # a fresh run, not a refusal to overwrite the last one
    cmd = [sys.executable, "-m", "glsd_cli", "pretrain", "--preset", preset, "--data", str(folder),
           "--batch-size", str(args.batch), "--epochs", "1", "--device", args.device, "--precision", args.precision,
           "--out", str(out), "--name", name, "--quiet",
           "--set", f"data.num_workers={args.workers}", "--set", f'data.augment_on="{mode}"',
           "--set", f"run.log_every_steps={args.log_every}", "--set", "run.knn_monitor=false"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"preset": preset, "mode": mode, "error": proc.stderr.strip().splitlines()[-1:]}
    lines = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    windows = [(r["step"], r["images_per_s"]) for r in lines if "images_per_s" in r]
    skip = args.skip_steps if args.skip_steps is not None else 2 * args.workers * PREFETCH
    rate, early = steady_rate(windows, skip, args.log_every * args.batch)
    return {"preset": preset, "mode": mode, "images_per_s": rate, "skipped_windows": early,
            "windows": windows, "skip_steps": skip, "wall_s": wall, "steps": lines[-1]["step"]}


def loader_arm(args, preset: str, mode: str, folder: Path, device: torch.device) -> dict:
    """The DataLoader alone (and, in device mode, the batched photometric pass timed on its own)."""
    cfg = bench_config(preset)
    on_device = mode == "device"
    dataset = ViewsDataset(open_source(str(folder)), make_views(cfg), 0, photometric_on_device=on_device)
    sampler = EpochSampler(len(dataset), args.batch, 0)
    loader: DataLoader = make_loader(dataset, sampler, args.batch, args.workers)
    buffered = args.workers * PREFETCH
    t0, seen, timed = None, 0, 0
    photometric = DevicePhotometric(device) if on_device else None
    photometric_s: list[float] = []
    for i, batch in enumerate(loader):
        if i == buffered:  # from here on, each batch had to be made while we waited
            t0, seen = time.perf_counter(), 0
        elif i > buffered:
            seen += args.batch
        timed = i
        if photometric is not None and len(photometric_s) < 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            s = time.perf_counter()
            photometric.prepare(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            photometric_s.append(time.perf_counter() - s)
        if i >= buffered + args.loader_batches:
            break
    rate = seen / (time.perf_counter() - t0) if t0 is not None and seen else float("nan")
    out = {"preset": preset, "mode": mode, "loader_images_per_s": rate, "batches_timed": timed - buffered}
    if photometric_s:
        out["device_photometric_s_per_batch"] = statistics.median(photometric_s[1:] or photometric_s)
    return out


def worker_costs(preset: str, folder: Path, images: int = 40) -> dict:
    """Milliseconds per image of each stage a loader worker runs, in this process on one thread (as a
    worker runs): reading and decoding the file, the geometric part (crops, resize, flip, parameter
    draws), and the photometric part with normalisation (the workers mode only)."""
    from glsd_cli.data import photometric
    from glsd_cli.data.multicrop import sample_generator

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    source = open_source(str(folder))
    crop = make_views(bench_config(preset))
    t0 = time.perf_counter()
    decoded = [source[i][0] for i in range(images)]
    t1 = time.perf_counter()
    made = [crop.geometric(img, sample_generator(0, 0, i)) for i, img in enumerate(decoded)]
    t2 = time.perf_counter()
    for views, _, _, params in made:
        [photometric.normalize(photometric.apply_on_host(v, p.tolist())) for v, p in zip(views, params)]
    t3 = time.perf_counter()
    torch.set_num_threads(threads)
    return {"decode_ms": 1e3 * (t1 - t0) / images, "geometric_ms": 1e3 * (t2 - t1) / images,
            "photometric_ms": 1e3 * (t3 - t2) / images}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="tiny-dino:workers,tiny-dino:device", help="PRESET:MODE, comma-separated")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--images", type=int, default=1024, help="JPEGs in the folder (and images per arm)")
    ap.add_argument("--log-every", type=int, default=2, help="steps per images/s window")
    ap.add_argument("--skip-steps", type=int, default=None,
                    help="steps whose windows the prefetch buffer may inflate (default: 2 x workers x 2)")
    ap.add_argument("--loader-batches", type=int, default=20, help="batches timed after the prefetch buffer")
    ap.add_argument("--folder", type=Path, default=Path("/tmp/glsd-bench-jpegs"))
    ap.add_argument("--runs", type=Path, default=Path("/tmp/glsd-bench-runs"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = device_and_threads(args.device, None)
    folder = jpeg_folder(args.folder, args.images)
    rows = []
    out = args.out or RESULTS / f"end_to_end{'-cuda' if device.type == 'cuda' else ''}.json"
    report = {"machine": machine(device), "batch": args.batch, "workers": args.workers, "images": args.images,
              "precision": args.precision, "rows": rows, "worker_costs": {}}
    for preset in dict.fromkeys(p.split(":")[0] for p in args.arms.split(",")):
        report["worker_costs"][preset] = worker_costs(preset, folder)
        print(f"{preset}: per image in one worker " +
              ", ".join(f"{k} {v:.1f}" for k, v in report["worker_costs"][preset].items()), flush=True)
    for spec in args.arms.split(","):
        preset, mode = spec.split(":")
        loader = loader_arm(args, preset, mode, folder, device)
        print(f"{preset} {mode}: loader {loader['loader_images_per_s']:.0f} images/s", flush=True)
        arm = pretrain_arm(args, preset, mode, folder, args.runs)
        print(f"{preset} {mode}: end to end {arm.get('images_per_s', float('nan')):.0f} images/s; windows "
              + " ".join(f"{step}:{rate:.0f}" for step, rate in arm.get("windows", [])) + f" {arm.get('error', '')}",
              flush=True)
        rows.append({**arm, **loader})
        write_report(out, report)  # after every arm: a run cut short keeps what it measured
    print(f"\nend to end, {device.type} ({machine(device)['device']}), batch {args.batch}, {args.workers} workers, "
          f"precision {args.precision}\n")
    print("| preset | photometric on | end-to-end images/s (steady) | first windows (prefetch buffer) "
          "| loader alone images/s | device photometric s/batch |\n|---|---|---:|---|---:|---:|")
    for r in rows:
        early = ", ".join(f"{x:.0f}" for x in r.get("skipped_windows", [])[:4])
        dp = r.get("device_photometric_s_per_batch")
        print(f"| {r['preset']} | {r['mode']} | {r.get('images_per_s', float('nan')):.0f} | {early} | "
              f"{r['loader_images_per_s']:.0f} | {'' if dp is None else f'{dp:.4f}'} |")
    write_report(out, report)


if __name__ == "__main__":
    main()
