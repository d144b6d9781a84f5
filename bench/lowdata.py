"""The GLSD paper's low-data claim at small scale: geometric > no local loss > similarity matching.

Fashion-MNIST, a fixed seeded 5k-image training subset (the fmnist-* presets), the full 10k test set.
Arms with an identical budget (model, batch, epochs): DINO (no local loss), similarity matching,
geometric matching, geometric + SD, and geometric matching with a 4x smaller dense head (256
patch prototypes instead of the size-aware 1024). Each arm is pre-trained with several seeds through the CLI, then
evaluated with k-NN (k = 20, T = 0.07) against the 5k subset as the bank; a raw-pixel k-NN on the
same split is the floor. Writes bench/results/lowdata.json and bench/results/lowdata.md.

    python bench/lowdata.py                       # the full table (5 arms x 3 seeds; ~47 min on 2 CPU cores)
    python bench/lowdata.py --arms dino,similarity,geometric,geometric+sd   # the paper's four (~37 min)
    python bench/lowdata.py --seeds 1 --epochs 1  # a quick smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FASHION_MNIST_TEST, ROOT, glsd, machine, pretrain_seconds  # noqa: E402  (first: sets paths and the OpenMP wait policy)

import torch  # noqa: E402

from glsd_cli.config import resolve  # noqa: E402
from glsd_cli.data.sources import open_source  # noqa: E402
from glsd_cli.pretraining import open_training_source  # noqa: E402
from glsd_cli.eval.knn import knn_classify  # noqa: E402

ARMS = {"dino": ("fmnist-dino", []), "similarity": ("fmnist-sim", []), "geometric": ("fmnist-geo", []),
        "geometric+sd": ("fmnist-geo", ["method.sd.enabled=true"]),
        # The dense head's size trade-off (issue 9): 4x fewer patch prototypes than the arm above.
        "geometric-dense256": ("fmnist-geo", ["method.local.out_dim=256"])}
DEFAULT_ARMS = ("dino", "similarity", "geometric", "geometric+sd", "geometric-dense256")
TEST_URI = FASHION_MNIST_TEST


def raw_pixel_floor() -> float:
    """k-NN (k = 20, T = 0.07) on raw pixels of the same 5k subset and the 10k test set."""
    bank = open_training_source(resolve("fmnist-dino"))
    test = open_source(TEST_URI)
    xb = torch.stack([bank[i][0][0].flatten().float() for i in range(len(bank))])
    xq = torch.stack([test[i][0][0].flatten().float() for i in range(len(test))])
    yb, yq = torch.tensor(bank.targets), torch.tensor(test.targets)
    return knn_classify(xb, yb, xq, yq, len(bank.classes), ks=(20,))[20]["top1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=None, help="pre-training epochs (default: the presets' 4)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "lowdata"))
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    # fp32: at these sizes (96 channels, 17 tokens) bf16 autocast does not pay on the CPU: step_bound
    # measured fmnist-dino at 0.23 s/step in fp32 against 0.32 in bf16, fmnist-geo 0.42 against 0.40.
    ap.add_argument("--precision", default="fp32", help="pretrain precision (fp32, bf16, or auto: bf16 where the CPU has it)")
    args = ap.parse_args()
    results: dict[str, list[float]] = {}
    train_s: dict[str, list[float]] = {}
    started = time.time()
    for arm in args.arms.split(","):
        preset, sets = ARMS[arm]
        for seed in range(args.seeds):
            name = f"{arm.replace('+', '-')}-s{seed}"
            run = Path(args.out) / name
            if not (run / "done.json").exists():
                extra = [x for s in sets for x in ("--set", s)]
                epochs = ["--epochs", str(args.epochs)] if args.epochs else []
                glsd("pretrain", "--preset", preset, "--out", args.out, "--name", name, *epochs,
                     "--seed", str(seed), "--precision", args.precision, "-q", "--set", "run.knn_monitor=false", *extra)
            train_s.setdefault(arm, []).append(pretrain_seconds(run))
            out = glsd("knn-eval", str(run), "--val-data", TEST_URI, "--k", "20")
            top1 = json.loads(out.strip().splitlines()[-1])["top1"]
            results.setdefault(arm, []).append(top1)
            print(f"{arm:<14} seed {seed}: k-NN top-1 {top1:.2f}  ({time.time() - started:.0f} s)", flush=True)
    floor = raw_pixel_floor()
    # The first arm's first network at its initialisation: what pre-training has to beat.
    first = Path(args.out) / f"{args.arms.split(',')[0].replace('+', '-')}-s0"
    out = glsd("knn-eval", str(first), "--random-init", "--val-data", TEST_URI, "--k", "20")
    random_init = json.loads(out.strip().splitlines()[-1])["top1"]
    rows = {arm: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "runs": v,
                  "pretrain_s_per_run": statistics.mean(train_s[arm])}
            for arm, v in results.items()}
    epochs = args.epochs or resolve("fmnist-dino").run.epochs
    summary = {"epochs": epochs, "seeds": args.seeds, "precision": args.precision, "machine": machine(torch.device("cpu")),
               "train_images": 5000, "test_images": 10000,
               "raw_pixel_knn_top1": floor, "random_init_knn_top1": random_init, "arms": rows, "wall_s": time.time() - started}
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lowdata.json").write_text(json.dumps(summary, indent=2))
    table = ["| arm | k-NN top-1 (k = 20), mean ± std | runs | pre-training s/run |", "|---|---|---|---:|"]
    table += [f"| {arm} | {r['mean']:.2f} ± {r['std']:.2f} | {', '.join(f'{x:.2f}' for x in r['runs'])} | "
              f"{round(r['pretrain_s_per_run'])} |"
              for arm, r in rows.items()]
    table.append(f"| the same ViT at random initialisation (seed 0) | {random_init:.2f} | | |")
    table.append(f"| raw pixels (floor) | {floor:.2f} | | |")
    text = (f"Fashion-MNIST, 5k-image seeded subset, 10k test images, {epochs} epochs, "
            f"{args.seeds} seed(s):\n\n" + "\n".join(table) + "\n")
    (out_dir / "lowdata.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
