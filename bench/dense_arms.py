"""Does the local loss make better patch tokens? GLSD's arms on the built-in scenes, by dense evaluation.

The question, fixed before the runs: on synthetic-scenes (2000 training images, 500 evaluation
images), does geometric matching beat no local loss on dense mIoU, and does similarity matching fall
below it? Arms with an identical budget (the scenes-* presets: model, views, batch, epochs): DINO
(no local loss), similarity matching (EsViT), geometric matching (GLSD) and, on request, geometric + SD, each
pre-trained with the same seeds through the CLI, then evaluated by `glsd dense-eval` (linear probe
mIoU with its lr chosen on a holdout, patch k-NN mIoU) and by `glsd knn-eval` (CLS k-NN of the
class that covers most of each image). Per seed, the differences to the DINO arm trained with that
seed (paired differences) are reported beside the means. The network of each seed at its random
initialisation is evaluated the same way. Every run's collapse statistics of its last epoch, and
the collapse warnings its epochs raise, are kept: does each arm train stably at this budget? Writes bench/results/dense_arms.json
and bench/results/dense_arms.md.

    nice -n 10 python bench/dense_arms.py                    # 3 arms x 3 seeds (make bench-dense)
    nice -n 10 python bench/dense_arms.py --arms dino,similarity,geometric,geometric+sd
    python bench/dense_arms.py --seeds 1 --epochs 1 --out /tmp/smoke --results /tmp/smoke   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, collapse_monitors, cpu_seconds, glsd, machine, pretrain_seconds  # noqa: E402  (first: sets paths and the OpenMP wait policy)

import torch  # noqa: E402

ARMS = {"dino": ("scenes-dino", []), "similarity": ("scenes-sim", []), "geometric": ("scenes-geo", []),
        "geometric+sd": ("scenes-geo-sd", [])}
LOW_LABEL_FRACTION = 0.125  # 250 of the 2000 training images keep their masks (README: why a low-label column)
METRICS = ("linear_miou", "knn_miou", "linear_miou_low", "knn_miou_low", "cls_knn_top1")
NAMES = {"linear_miou": "linear mIoU", "knn_miou": "patch k-NN mIoU", "linear_miou_low": "linear mIoU, 250 labelled",
         "knn_miou_low": "patch k-NN mIoU, 250 labelled", "cls_knn_top1": "CLS k-NN top-1"}


def glsd_summary(*args: str) -> dict:
    """Run the CLI; its last stdout line is the command's JSON summary."""
    lines = glsd(*args).strip().splitlines()
    return json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}


def evaluate(run: Path, random_init: bool = False) -> dict:
    flag = ["--random-init"] if random_init else []
    dense = glsd_summary("dense-eval", str(run), "-q", *flag)
    low = glsd_summary("dense-eval", str(run), "-q", "--train-fraction", str(LOW_LABEL_FRACTION), *flag)
    knn = glsd_summary("knn-eval", str(run), "-q", "--k", "20", *flag)
    return {"linear_miou": dense["linear_miou"], "knn_miou": dense["knn_miou"], "linear_miou_low": low["linear_miou"],
            "knn_miou_low": low["knn_miou"], "cls_knn_top1": knn["top1"],
            "linear_pixel_acc": dense["linear_pixel_acc"], "knn_pixel_acc": dense["knn_pixel_acc"]}


# Settings that do not change what a run learns: where it is written, how often it logs, how its data are
# loaded, and the epoch-end CLS k-NN monitor the bench turns off.
NOT_TRAINING = {"description", "run.out", "run.name", "run.device", "run.log_every_steps",
                "run.checkpoint_every_steps", "run.knn_monitor", "data.num_workers"}


def _flat(tree: dict, prefix: str = "") -> dict:
    """A nested config as {dotted key: value}, the keys `--set` takes."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def check_reusable(run: Path, preset: str, sets: list[str], seed: int, args) -> None:
    """A finished run in --out is reused only if it was trained as the bench asks now (every setting that
    shapes training: data, model, heads, loss, optimiser, epochs, seed): after a preset changes, stale
    runs would otherwise fill the new table (stop, naming the run and the settings that differ)."""
    from glsd_cli.config import resolve

    want = _flat(json.loads(resolve(preset, list(sets) + [f"run.seed={seed}"]
                                    + ([f"run.epochs={args.epochs}"] if args.epochs else [])
                                    + ([f'data.train="{args.data}"'] if args.data else [])).to_json()))
    have = _flat(json.loads((run / "config.json").read_text()))
    # A setting asked as "auto" is stored as asked or as what it resolved to; either is the same run.
    differ = [f"{key} = {have.get(key)!r}, not {asked!r}" for key, asked in want.items()
              if key not in NOT_TRAINING and asked != "auto" and have.get(key) != asked]
    if differ:
        sys.exit(f"{run} was trained with " + "; ".join(differ) + ": remove it or pass another --out")


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=None, help="pre-training epochs (default: the presets')")
    ap.add_argument("--arms", default="dino,similarity,geometric",
                    help="comma-separated, from " + ", ".join(ARMS) + " (geometric+sd: about 15 minutes more)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "dense-arms"), help="folder of the runs")
    ap.add_argument("--results", default=str(RESULTS), help="folder of dense_arms.json and .md")
    ap.add_argument("--data", default=None, help="pre-training and evaluation data instead of the presets' (smoke runs)")
    args = ap.parse_args()
    arms = args.arms.split(",")
    started, cpu_started = time.time(), cpu_seconds()
    runs: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        for arm in arms:
            preset, sets = ARMS[arm]
            name = f"{arm.replace('+', '-')}-s{seed}"
            run = Path(args.out) / name
            if (run / "done.json").exists():
                check_reusable(run, preset, sets, seed, args)
            else:
                extra = [x for s in sets for x in ("--set", s)]
                epochs = ["--epochs", str(args.epochs)] if args.epochs else []
                data = ["--data", args.data] if args.data else []
                glsd("pretrain", "--preset", preset, "--out", args.out, "--name", name, *epochs, *data,
                     "--seed", str(seed), "-q", "--set", "run.knn_monitor=false", *extra)
            record = {"seed": seed, "pretrain_s": round(pretrain_seconds(run), 1), **evaluate(run), "monitors": collapse_monitors(run)}
            runs.setdefault(arm, []).append(record)
            print(f"{arm:<13} seed {seed}: " + "  ".join(f"{m} {record[m]:.2f}" for m in METRICS)
                  + f"  ({time.time() - started:.0f} s)", flush=True)
        # The same network at its initialisation (each seed builds it from run.seed; the arms share it).
        base = Path(args.out) / f"{arms[0].replace('+', '-')}-s{seed}"
        runs.setdefault("random-init", []).append({"seed": seed, **evaluate(base, random_init=True)})
        print(f"random init   seed {seed}: " + "  ".join(f"{m} {runs['random-init'][-1][m]:.2f}" for m in METRICS),
              flush=True)
    summary = _summary(args, arms, runs, time.time() - started, cpu_seconds() - cpu_started)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dense_arms.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "dense_arms.md").write_text(_table(summary))
    print("\n" + _table(summary))


def _summary(args, arms: list[str], runs: dict[str, list[dict]], wall: float, cpu: float) -> dict:
    from glsd_cli.config import resolve

    cfg = resolve(ARMS[arms[0]][0])
    table = {}
    for arm, records in runs.items():
        entry = {m: mean_std([r[m] for r in records]) for m in METRICS}
        if arm != "dino" and "dino" in runs:  # paired by seed: the same initialisation and data order
            for m in METRICS:
                entry[f"{m}_minus_dino"] = mean_std([r[m] - d[m] for r, d in zip(records, runs["dino"])])
        if arm != "random-init" and "random-init" in runs:  # what pre-training gained, seed by seed
            for m in METRICS:
                entry[f"{m}_minus_random_init"] = mean_std([r[m] - d[m] for r, d in zip(records, runs["random-init"])])
        entry["records"] = records
        table[arm] = entry
    return {"question": "does geometric matching beat no local loss (dino) on dense mIoU, and does similarity "
                        "matching fall below it?",
            "data": args.data or cfg.data.train, "low_label_fraction": LOW_LABEL_FRACTION, "epochs": args.epochs or cfg.run.epochs, "seeds": args.seeds,
            "model": cfg.model.model_dump(), "views": {"global": cfg.data.global_crop_size,
                                                      "local": cfg.data.local_crop_size,
                                                      "num_local": cfg.data.num_local_crops},
            "arms": table, "wall_s": round(wall), "cpu_s": round(cpu), "machine": machine(torch.device("cpu"))}


def _table(summary: dict) -> str:
    def cell(entry: dict, m: str) -> str:
        return f"{entry[m]['mean']:.2f} ± {entry[m]['std']:.2f}"

    def diff(entry: dict, m: str, base: str = "dino") -> str:
        d = entry[f"{m}_minus_{base}"]
        return f"{d['mean']:+.2f} ({' / '.join(f'{x:+.2f}' for x in d['runs'])})"

    arms = summary["arms"]
    lines = ["| arm | " + " | ".join(NAMES[m] for m in METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    lines += [f"| {arm} | " + " | ".join(cell(e, m) for m in METRICS) + " |" for arm, e in arms.items()]
    paired = [arm for arm, e in arms.items() if "knn_miou_minus_dino" in e and arm != "random-init"]
    if paired:
        lines += ["", "Paired by seed, arm minus DINO: mean (seed 0 / 1 / 2):", "",
                  "| arm | " + " | ".join(NAMES[m] for m in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        lines += [f"| {arm} | " + " | ".join(diff(arms[arm], m) for m in METRICS) + " |" for arm in paired]
    gained = [arm for arm, e in arms.items() if "knn_miou_minus_random_init" in e]
    if gained:
        lines += ["", "Paired by seed, arm minus the same network at random initialisation:", "",
                  "| arm | " + " | ".join(NAMES[m] for m in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        lines += [f"| {arm} | " + " | ".join(diff(arms[arm], m, "random_init") for m in METRICS) + " |"
                  for arm in gained]
    trained = [arm for arm, e in arms.items() if arm != "random-init"]
    lines += ["", "Collapse monitors of the last epoch (teacher entropy and KL(mean ‖ uniform) in nats, seed 0 / 1 / 2; "
              "global head, then the dense head where there is one) and collapse warnings of either head over "
              "all epochs:", "",
              "| arm | head | log K | teacher entropy | KL to uniform | warnings |", "|---|---|---:|---|---|---:|"]
    for arm in trained:
        mons = [r["monitors"] for r in arms[arm]["records"]]
        for head, prefix, log_k in (("global", "", "log_k"), ("dense", "dense_", "dense_log_k")):
            if log_k not in mons[0]:
                continue
            lines.append(f"| {arm} | {head} | {mons[0][log_k]:.2f} | "
                         + " / ".join(f"{m.get(prefix + 'teacher_entropy', float('nan')):.2f}" for m in mons) + " | "
                         + " / ".join(f"{m.get(prefix + 'teacher_kl_uniform', float('nan')):.3f}" for m in mons)
                         + (f" | {sum(len(m['warnings']) for m in mons)} |" if head == "global" else " | |"))
    return (f"{summary['data']}, {summary['epochs']} epochs, {summary['seeds']} seed(s), mean ± std over seeds; "
            f"wall {summary['wall_s']} s, CPU {summary['cpu_s']} s:\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
