"""Wall time of a k-NN evaluation, split into feature extraction and search (10k train × 10k test by default).

extraction  glsd's `eval.features.extract_features` (the path of `glsd knn-eval`: EvalTransform resize +
            centre crop, DataLoader, batches of 256, no workers — knn-eval passes none) of the tiny-dino
            backbone (random init; the weights do not change the time) over the built-in data at 32 px.
            A sample of the source read + transform alone estimates the data share; the rest is forward.
search      glsd's `eval.knn.knn_classify` (cosine similarity in chunks of 1024 test rows, top-k, weighted
            vote), 10 classes, on the extracted features (the backbone's width) and on random features of
            width 384 (ViT-S), per k in {10, 20, 100, 200} and for all four at once (what knn-eval runs).

    python bench/knn_speed.py                               # 10k × 10k
    python bench/knn_speed.py --train 2000 --test 1000 --reps 1
Writes bench/results/knn_speed.json and prints Markdown tables.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, bench_config, device_and_threads, machine, peak_rss_mib, write_report  # noqa: E402  (first: sets paths)

import torch  # noqa: E402

from glsd_cli.data.loader import EvalDataset  # noqa: E402
from glsd_cli.data.multicrop import EvalTransform  # noqa: E402
from glsd_cli.data.synthetic import SyntheticTextures  # noqa: E402
from glsd_cli.eval.features import extract_features  # noqa: E402
from glsd_cli.eval.knn import DEFAULT_KS, knn_classify  # noqa: E402
from glsd_cli.models.backbone import Backbone  # noqa: E402

RESULT = RESULTS / "knn_speed.json"
VITS_DIM = 384  # ViT-S/16 embedding width (timm vit_small_patch16_224)
NUM_CLASSES = 10  # the built-in data's classes (glsd_cli/data/synthetic.py CLASSES)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def extraction(backbone: Backbone, source: SyntheticTextures, size: int, device: torch.device, batch_size: int,
               workers: int, sample: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    (feats, labels), wall = timed(lambda: extract_features(backbone, source, size, device, batch_size=batch_size,
                                                           num_workers=workers))
    data = EvalDataset(source, EvalTransform(size))
    n = min(sample, len(source))
    _, data_s = timed(lambda: [data[i] for i in range(n)])
    data_est = data_s / n * len(source) if workers == 0 else 0.0  # with workers the reading runs alongside
    return feats, labels, {"images": len(source), "wall_s": wall, "images_per_s": len(source) / wall,
                           "data_s_estimate": data_est, "data_sample": n, "forward_s_estimate": wall - data_est}


def search(train, train_labels, test, test_labels, ks: tuple[int, ...], reps: int) -> dict:
    out = {}
    for name, kk in [(str(k), (k,)) for k in ks] + [("all", ks)]:
        times, result = [], None
        for _ in range(reps):
            result, s = timed(lambda: knn_classify(train, train_labels, test, test_labels, NUM_CLASSES, ks=kk))
            times.append(s)
        out[name] = {"ks": list(kk), "median_s": statistics.median(times), "times_s": times,
                     "top1": {str(k): v["top1"] for k, v in result.items()}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=10_000, help="training (bank) images")
    ap.add_argument("--test", type=int, default=10_000, help="test (query) images")
    ap.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)))
    ap.add_argument("--batch-size", type=int, default=256, help="extraction batch (knn-eval's default)")
    ap.add_argument("--workers", type=int, default=0, help="extraction DataLoader workers (knn-eval: 0)")
    ap.add_argument("--data-sample", type=int, default=1000, help="images read alone to estimate the data share")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each search (median)")
    ap.add_argument("--device", default="auto", help="extraction device (the search runs where the features are: CPU)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()
    device = device_and_threads(args.device, args.threads)
    ks = tuple(int(k) for k in args.ks.split(","))
    cfg = bench_config("tiny-dino")
    size = cfg.data.global_crop_size
    torch.manual_seed(0)
    backbone = Backbone(cfg.model, size).to(device)
    report = {"machine": machine(device), "train": args.train, "test": args.test, "ks": list(ks),
              "image_size": size, "embed_dim": backbone.embed_dim, "extraction": {}, "search": {}}
    train_src = SyntheticTextures("train", args.train, size=size)
    test_src = SyntheticTextures("val", args.test, size=size)
    extract_features(backbone, SyntheticTextures("val", 64, size=size), size, device)  # warm-up
    xb, yb, report["extraction"]["train"] = extraction(backbone, train_src, size, device, args.batch_size,
                                                       args.workers, args.data_sample)
    xq, yq, report["extraction"]["test"] = extraction(backbone, test_src, size, device, args.batch_size,
                                                      args.workers, args.data_sample)
    print("extraction: done", flush=True)
    gen = torch.Generator().manual_seed(0)
    feature_sets = {f"backbone ({backbone.embed_dim}-d)": (xb, yb, xq, yq),
                    f"random {VITS_DIM}-d (ViT-S width)": (torch.randn(args.train, VITS_DIM, generator=gen), yb,
                                                           torch.randn(args.test, VITS_DIM, generator=gen), yq)}
    for name, (a, la, b, lb) in feature_sets.items():
        report["search"][name] = {"dim": a.shape[1], "runs": search(a, la, b, lb, ks, args.reps)}
    ext = report["extraction"]
    first = next(iter(report["search"].values()))["runs"]["all"]["median_s"]
    report["total_s"] = ext["train"]["wall_s"] + ext["test"]["wall_s"] + first
    report["peak_rss_mib"] = peak_rss_mib()
    m = report["machine"]
    print(f"\n{m['device']} ({m['processor']}), {m['torch_threads']} threads, load {m['load_average_1min']}; "
          f"tiny-dino backbone ({backbone.embed_dim}-d), {size} px, {args.train} train × {args.test} test")
    print("\n| extraction | images | wall s | images/s | data (read + transform) s, est. | forward s, est. |"
          "\n|---|---|---|---|---|---|")
    for split, e in ext.items():
        print(f"| {split} | {e['images']} | {e['wall_s']:.2f} | {e['images_per_s']:.0f} | "
              f"{e['data_s_estimate']:.2f} | {e['forward_s_estimate']:.2f} |")
    print("\n| search features | k | search s (median) | top-1 % |\n|---|---|---|---|")
    for name, s in report["search"].items():
        for key, r in s["runs"].items():
            top1 = ", ".join(f"{v:.1f}" for v in r["top1"].values())
            print(f"| {name} | {key if key != 'all' else 'all of ' + args.ks} | {r['median_s']:.3f} | {top1} |")
    print(f"\nk-NN evaluation in all (extraction of both splits + search with all k, backbone features): "
          f"{report['total_s']:.1f} s; peak RSS {report['peak_rss_mib']:.0f} MiB")
    write_report(args.out, report)


if __name__ == "__main__":
    main()
