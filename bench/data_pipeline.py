"""Multi-crop images/s per data worker, and how many workers a training step needs to stay fed.

Two pipelines on the same in-memory uint8 (3, H, W) images, in one process with one torch thread (what a
DataLoader worker gets: torch/utils/data/_utils/worker.py calls torch.set_num_threads(1)):
  glsd         the geometry-tracking `MultiCrop` of the preset (pretraining.make_views), drawing
               from the per-sample generator as `ViewsDataset` does (boxes and flip flags included);
  torchvision  a plain DINO multi-crop written with torchvision.transforms.v2 (RandomResizedCrop, flip,
               RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), 0.8), RandomGrayscale(0.2), GaussianBlur,
               RandomSolarize on the second global view, normalise), built from the same view recipes.
Image decoding and collation are not timed (the same for both). The rounds alternate the two pipelines so
machine load hits both alike; the median round counts.

workers needed = ceil(training-step images/s ÷ per-worker images/s); the step's images/s is, in order:
--step-images-per-s PRESET=N, the fastest arm of the preset in bench/results/step_bound.json, or a quick
measurement (engine step, precision auto, a few steps).

    python bench/data_pipeline.py                                       # tiny-dino and vits16-geo
    python bench/data_pipeline.py --presets tiny-dino --images 500 --rounds 3
    python bench/data_pipeline.py --step-images-per-s tiny-dino=300,vits16-geo=40
Writes bench/results/data_pipeline.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, bench_config, machine, peak_rss_mib, write_report  # noqa: E402  (first: sets paths)

import torch  # noqa: E402
from torchvision.transforms import InterpolationMode, v2  # noqa: E402
from step_bound import RESULT as STEP_BOUND  # noqa: E402
from train_precision import batches, run_arm  # noqa: E402

from glsd_cli.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, MultiCrop, sample_generator  # noqa: E402
from glsd_cli.data.synthetic import SyntheticTextures  # noqa: E402
from glsd_cli.pretraining import make_views  # noqa: E402

RESULT = RESULTS / "data_pipeline.json"
# Images timed per round: a 224-px multi-crop costs ~50× a 32-px one.
DEFAULT_IMAGES = {"tiny-dino": 400, "vits16-geo": 60}
QUICK_BATCH = {"tiny-dino": 64, "vits16-geo": 2}  # as step_bound.py's defaults


def torchvision_multicrop(crop: MultiCrop):
    """DINO's multi-crop in torchvision.transforms.v2, one Compose per view recipe of `crop`."""
    def view(r):
        s = r.size / 224  # glsd scales DINO's blur σ ∈ [0.1, 2] (given for 224 px) with the view (multicrop.py)
        ops = [v2.RandomResizedCrop(r.size, scale=r.scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
               v2.RandomHorizontalFlip(0.5)]
        if crop.color:
            # Kernel: glsd's 2⌈3σ⌉+1 at the largest σ, so no glsd kernel is larger (v2 needs one fixed size).
            kernel = 2 * math.ceil(3 * 2.0 * s) + 1
            ops += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), v2.RandomGrayscale(0.2),
                    v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1 * s, 2.0 * s))], p=r.blur_p)]
            if r.solarize_p:
                ops.append(v2.RandomSolarize(128, p=r.solarize_p))  # DINO: PIL Solarization(128)
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        return v2.Compose(ops)

    views = [view(r) for r in crop.recipes]
    return lambda image, index: [v(image) for v in views]


def glsd_multicrop(crop: MultiCrop):
    return lambda image, index: crop(image, sample_generator(0, 0, index))  # as ViewsDataset.__getitem__


def images_per_s(pipeline, images: list[torch.Tensor], count: int, offset: int) -> float:
    t0 = time.perf_counter()
    for i in range(count):
        pipeline(images[i % len(images)], offset + i)
    return count / (time.perf_counter() - t0)


def step_rate(preset: str, cfg, given: dict[str, float], step_bound: Path, steps: int) -> tuple[float, str]:
    if preset in given:
        return given[preset], "--step-images-per-s"
    if step_bound.exists():
        arms = json.loads(step_bound.read_text()).get("presets", {}).get(preset, {}).get("arms", [])
        rates = [a["images_per_s"] for a in arms if "images_per_s" in a]
        if rates:
            return max(rates), f"from {step_bound} (fastest precision)"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, precision = QUICK_BATCH.get(preset, 16), cfg.run.precision  # the preset's own precision
    arm = run_arm(cfg, precision, batches(cfg, batch, 1, device), steps + 1, 1, device)
    return arm["images_per_s"], f"measured here: engine step, {precision}, batch {batch}, median of {steps} steps"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny-dino,vits16-geo")
    ap.add_argument("--images", type=int, default=None, help="images per pipeline per round (default: per preset)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median counts")
    ap.add_argument("--distinct", type=int, default=32, help="distinct source images, cycled")
    ap.add_argument("--image-size", type=int, default=None,
                    help="source image side (default: 32 for 32-px presets, 256 for 224-px ones)")
    ap.add_argument("--step-images-per-s", default="", help="PRESET=N,...: training-step images/s to feed")
    ap.add_argument("--step-bound", type=Path, default=STEP_BOUND, help="step_bound.py's result to read")
    ap.add_argument("--quick-steps", type=int, default=3, help="steps of the quick step measurement")
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()
    given = {k: float(v) for k, v in (item.split("=") for item in args.step_images_per_s.split(",") if item)}
    report = {"machine": machine(torch.device("cpu")), "presets": {}}
    for preset in args.presets.split(","):
        cfg = bench_config(preset)
        # 256 px: the ImageNet short side before DINO's crops (a 224 crop of an image resized to 256).
        size = args.image_size or (256 if cfg.data.global_crop_size >= 224 else max(cfg.data.global_crop_size, 32))
        source = SyntheticTextures("train", args.distinct, size=size)
        images = [source[i][0] for i in range(args.distinct)]
        crop = make_views(cfg)
        pipelines = {"glsd": glsd_multicrop(crop), "torchvision": torchvision_multicrop(crop)}
        count = args.images or DEFAULT_IMAGES.get(preset, 100)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one worker's share
        for p in pipelines.values():  # warm-up
            p(images[0], 0)
        rates: dict[str, list[float]] = {name: [] for name in pipelines}
        for r in range(args.rounds):
            for name, p in pipelines.items():
                rates[name].append(images_per_s(p, images, count, r * count))
        torch.set_num_threads(threads)
        step, step_source = step_rate(preset, cfg, given, args.step_bound, args.quick_steps)
        entry = {"image_size": size, "views": [[r.size, list(r.scale)] for r in crop.recipes],
                 "images_per_round": count, "rounds": args.rounds, "step_images_per_s": step,
                 "step_images_per_s_source": step_source,
                 "pipelines": {}}
        for name, rs in rates.items():
            rate = statistics.median(rs)
            entry["pipelines"][name] = {"images_per_s_per_worker": rate, "rounds_images_per_s": rs,
                                        "workers_needed": math.ceil(step / rate)}
        entry["glsd_over_torchvision"] = (entry["pipelines"]["glsd"]["images_per_s_per_worker"]
                                          / entry["pipelines"]["torchvision"]["images_per_s_per_worker"])
        report["presets"][preset] = entry
        print(f"{preset}: done", flush=True)
    report["peak_rss_mib"] = peak_rss_mib()
    m = report["machine"]
    print(f"\n{m['processor']}, {m['cpu_count']} CPUs, load {m['load_average_1min']}; one torch thread per worker")
    print("\n| preset | image px | views | pipeline | images/s per worker | vs torchvision | training step images/s "
          "| workers needed |\n|---|---|---|---|---|---|---|---|")
    for preset, e in report["presets"].items():
        views = f"{len(e['views'])} ({e['views'][0][0]}/{e['views'][-1][0]} px)"
        for name, p in e["pipelines"].items():
            rel = p["images_per_s_per_worker"] / e["pipelines"]["torchvision"]["images_per_s_per_worker"]
            print(f"| {preset} | {e['image_size']} | {views} | {name} | {p['images_per_s_per_worker']:.1f} | "
                  f"{rel:.2f}× | {e['step_images_per_s']:.1f} | {p['workers_needed']} |")
    for preset, e in report["presets"].items():
        print(f"{preset}: training-step images/s — {e['step_images_per_s_source']}")
    print(f"\npeak RSS {report['peak_rss_mib']:.0f} MiB")
    write_report(args.out, report)


if __name__ == "__main__":
    main()
