"""SDSSL's claim, measured per block: does self-distilling the intermediate layers make every block better?

For SimCLR, BYOL, MoCo v3 and GLSD (DINO + geometric local loss), the baseline (method.sd.enabled=false)
and its SD version are pre-trained with an identical budget on the low-data set of bench/lowdata.py (a
seeded 5k-image Fashion-MNIST subset, 28-px views of 7-px tokens, the tiny 4-block ViT), with the same
seeds in both arms. Every block's CLS (after the shared final norm) of the teacher (SimCLR: its one
network) is then evaluated by k-NN (k = 20, T = 0.07, the 5k subset as the bank, the 10k test images
as queries: `glsd knn-eval RUN --layers all`) and by the cached linear probe (`glsd linear-eval RUN
--cached --layers all`: 100 epochs on the 5k subset at one fixed lr, reported on the 10k test images).
Two probes change one SD setting with the same seeds: the ratio r (SD-SimCLR at r = 2.0 instead of
0.8) and MoCo v3's predictor-only term (off). Each method's network at its random initialisation gives
a per-block k-NN floor.

Pre-training runs through the CLI in a subprocess per run (as bench/lowdata.py); the evaluations call
the CLI commands' own functions in this process (run_knn_eval, run_linear_eval), which saves two
interpreter starts per run and shares the feature cache between them. Writes bench/results/
sdssl_layers.{json,md,png}.

    nice -n 10 python bench/sdssl_layers.py          # the full table (56 min on the shared 2-core machine at load 5-8)
    python bench/sdssl_layers.py --seeds 1 --epochs 1 --no-probes --results /tmp/smoke   # a smoke run
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (FASHION_MNIST, FASHION_MNIST_TEST, RESULTS, ROOT, children_peak_rss_mib,  # noqa: E402
                    cpu_seconds, glsd, machine, peak_rss_mib, pretrain_seconds, write_report)

import torch  # noqa: E402

from glsd_cli.eval.knn_command import KnnOptions, run_knn_eval  # noqa: E402
from glsd_cli.eval.linear import LinearOptions, run_linear_eval  # noqa: E402

# The two-view presets (tiny-*-sd, made for the built-in 32-px data) moved to bench/lowdata.py's set and
# token size, as the fmnist-* presets move tiny-dino: the same seeded 5k subset, 28-px views, 7-px tokens.
FMNIST_TWO_VIEW = [f'data.train="{FASHION_MNIST}"', "data.count=5000", "data.subset_seed=0",
                   "data.global_crop_size=28", "model.patch_size=7"]
METHODS = {"simclr": ("tiny-simclr-sd", FMNIST_TWO_VIEW), "byol": ("tiny-byol-sd", FMNIST_TWO_VIEW),
           "mocov3": ("tiny-mocov3-sd", FMNIST_TWO_VIEW),
           # fmnist-geo + SD is tiny-geo-sd's recipe (SD into the DINO prototypes, r = 0.8) on that set.
           "glsd": ("fmnist-geo", [])}
ARMS = {"baseline": ["method.sd.enabled=false"], "sd": ["method.sd.enabled=true"]}
# One probe each: the SD arm with one setting changed, on the same seeds. The predictor-only term is
# probed on MoCo v3, not BYOL: BYOL's baseline does not beat its random initialisation at this budget.
PROBES = {"simclr": ("sd-r2", ["method.sd.enabled=true", "method.sd.ratio=2.0"]),
          "mocov3": ("sd-no-predictor-term", ["method.sd.enabled=true", "method.sd.predictor_only_term=false"])}
WARMUP_SHARE = 0.25  # of the epochs: fmnist-dino's 1 of 4 (tiny-*-sd warm up 2 of 20)
KNN_K, KNN_T = 20, 0.07
# The cached probe's lr per 256 images, fixed in advance for every block and arm. The protocol's 1e-3
# underfits these 96-d features in 100 epochs (40-60 % where 1.0 gives 60-72 %); in the smoke runs a 10 %
# holdout chose 1.0 most often from 0.03-3, and choosing per run on 500 holdout images added noise (it
# picked lrs up to 1.3 points worse on the test images) that a paired difference does not need.
LINEAR_LR = 1.0


def budget_sets(method: str, epochs: int) -> list[str]:
    """What makes every arm's budget identical at `epochs` epochs, whatever its preset's length."""
    sets = ["run.knn_monitor=false", f"optim.warmup_epochs={epochs * WARMUP_SHARE:g}"]
    if method == "glsd":
        # fmnist-dino freezes the prototype layer for 1 of its 4 epochs; in a 2-3 epoch run that would be
        # a third of the run or more (tiny-dino does not freeze for the same reason).
        sets.append("head.freeze_last_layer_epochs=0")
    return sets


def pretrain(out: Path, name: str, method: str, sets: list[str], seed: int, epochs: int, precision: str) -> Path:
    run = out / name
    if not (run / "done.json").exists():
        preset, preset_sets = METHODS[method]
        extra = [x for s in [*preset_sets, *budget_sets(method, epochs), *sets] for x in ("--set", s)]
        glsd("pretrain", "--preset", preset, "--out", str(out), "--name", name, "--epochs", str(epochs),
             "--seed", str(seed), "--precision", precision, "-q", *extra)
    return run


def knn_per_block(run: Path, random_init: bool = False) -> list[float]:
    tag = "-random-init" if random_init else ""
    result = run_knn_eval(run, KnnOptions(val_uri=FASHION_MNIST_TEST, ks=(KNN_K,), temperature=KNN_T, layers="all",
                                          random_init=random_init, quiet=True, output=run / f"knn-layers{tag}.json"))
    return [layer["results"][str(KNN_K)]["top1"] for layer in result["layers"]]


def linear_per_block(run: Path) -> list[float]:
    result = run_linear_eval(run, LinearOptions(val_uri=FASHION_MNIST_TEST, cached=True, layers="all", lr=LINEAR_LR,
                                                lr_grid=(LINEAR_LR,), holdout_fraction=0, quiet=True,
                                                output=run / "linear-layers-cached.json"))
    return [row["final_top1"] for row in result["rows"]]


def paired_rows(reference: dict[int, list[float]], other: dict[int, list[float]]) -> list[dict]:
    """Per block: mean and sample std over seeds of each arm, and of the paired difference other −
    reference (same seed), with the number of seeds where other is higher. Arms map seed → per-block values."""
    seeds = sorted(reference)
    if sorted(other) != seeds:
        raise ValueError(f"the arms have different seeds: {seeds} and {sorted(other)}")

    def mean_std(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    rows = []
    for block in range(len(reference[seeds[0]])):
        ref = [reference[s][block] for s in seeds]
        oth = [other[s][block] for s in seeds]
        diff = [o - r for o, r in zip(oth, ref)]
        (rm, rs), (om, os_), (dm, ds) = mean_std(ref), mean_std(oth), mean_std(diff)
        rows.append({"block": block + 1, "reference_mean": rm, "reference_std": rs, "other_mean": om,
                     "other_std": os_, "diff_mean": dm, "diff_std": ds, "other_higher": sum(d > 0 for d in diff),
                     "seeds": len(seeds)})
    return rows


def cell(mean: float, std: float, signed: bool = False) -> str:
    return f"{mean:+.2f} ± {std:.2f}" if signed else f"{mean:.2f} ± {std:.2f}"


def method_table(knn: list[dict], linear: list[dict]) -> str:
    """One method's table: per block, k-NN and linear of the baseline and SD, and SD − baseline paired by
    seed (mean ± std, and on how many seeds SD was higher)."""
    head = ("| block | k-NN baseline | k-NN SD | k-NN SD − baseline | linear baseline | linear SD | linear SD − baseline |\n"
            "|---:|---:|---:|---:|---:|---:|---:|\n")
    return head + "".join(
        f"| {k['block']} | " + " | ".join(
            f"{cell(r['reference_mean'], r['reference_std'])} | {cell(r['other_mean'], r['other_std'])} | "
            f"{cell(r['diff_mean'], r['diff_std'], signed=True)} ({r['other_higher']}/{r['seeds']})" for r in (k, l)) + " |\n"
        for k, l in zip(knn, linear))


def probe_table(probe: dict, sd: dict) -> str:
    """A probe against the SD arm and the baseline, per block, both metrics (paired differences)."""
    name = probe["name"]
    head = (f"| block | metric | SD | {name} | SD − baseline | {name} − baseline | {name} − SD |\n"
            "|---:|---|---:|---:|---:|---:|---:|\n")
    lines = []
    for metric, label in (("knn", "k-NN"), ("linear", "linear")):
        for s_row, p_row, v_row in zip(sd[metric], probe[metric], probe[f"{metric}_vs_sd"]):
            lines.append(f"| {s_row['block']} | {label} | {cell(s_row['other_mean'], s_row['other_std'])} | "
                         f"{cell(p_row['other_mean'], p_row['other_std'])} | "
                         + " | ".join(f"{cell(r['diff_mean'], r['diff_std'], signed=True)} ({r['other_higher']}/{r['seeds']})"
                                      for r in (s_row, p_row, v_row)) + " |\n")
    return head + "".join(lines)


def plot(tables: dict, probes: dict, random_init: dict, path: Path) -> None:
    """Per method, top-1 against block for the baseline and SD (and a probe), ± std over seeds: the
    SDSSL paper's per-layer curves, one column per method, k-NN above linear."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(tables)
    fig, axes = plt.subplots(2, len(methods), figsize=(3.3 * len(methods), 5.8), squeeze=False)
    for col, method in enumerate(methods):
        for row, metric in enumerate(("knn", "linear")):
            ax = axes[row][col]
            rows = tables[method][metric]
            blocks = [r["block"] for r in rows]
            for label, key, colour, style in (("baseline", "reference", "tab:blue", "o-"), ("SD", "other", "tab:red", "s-")):
                ax.errorbar(blocks, [r[f"{key}_mean"] for r in rows], yerr=[r[f"{key}_std"] for r in rows],
                            fmt=style, color=colour, label=label, capsize=3, ms=4)
            if method in probes:
                probe = probes[method][metric]
                ax.errorbar(blocks, [r["other_mean"] for r in probe], yerr=[r["other_std"] for r in probe],
                            fmt="^--", color="tab:green", label=probes[method]["name"], capsize=3, ms=4)
            if metric == "knn" and method in random_init:
                ax.plot(blocks, random_init[method], ":", color="grey", label="random init")
            ax.set_xticks(blocks)
            ax.set_title(f"{method}: {'k-NN (k = 20)' if metric == 'knn' else 'linear (cached)'}", fontsize=9)
            ax.set_xlabel("block")
            if col == 0:
                ax.set_ylabel("top-1 (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3, help="pre-training epochs of every arm")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--no-probes", dest="probes", action="store_false", help="skip the r and predictor-term probes")
    ap.add_argument("--precision", default="fp32", help="pretrain precision (fp32: see bench/lowdata.py)")
    ap.add_argument("--out", default=None, help="run folder (default: runs/sdssl-e<epochs>)")
    ap.add_argument("--results", default=str(RESULTS), help="folder of sdssl_layers.{json,md,png}")
    args = ap.parse_args()
    out = Path(args.out or ROOT / "runs" / f"sdssl-e{args.epochs}")
    methods = args.methods.split(",")
    jobs = [(m, arm, sets) for m in methods for arm, sets in ARMS.items()]
    jobs += [(m, *PROBES[m]) for m in methods if args.probes and m in PROBES]
    started, cpu_started, load_start = time.time(), cpu_seconds(), os.getloadavg()
    runs: dict[str, dict[str, dict]] = {}
    # Seed-major order: an interrupted benchmark leaves whole seeds, and a load change hits every arm alike.
    for seed in range(args.seeds):
        for method, arm, sets in jobs:
            t = time.time()
            run = pretrain(out, f"{method}-{arm}-s{seed}", method, sets, seed, args.epochs, args.precision)
            t_eval = time.time()
            result = {"knn": knn_per_block(run), "linear": linear_per_block(run),
                      "pretrain_s": round(pretrain_seconds(run), 1),  # inside the run, from its files
                      "pretrain_call_s": round(t_eval - t, 1),  # with the interpreter start; 0 when done before
                      "eval_s": round(time.time() - t_eval, 1), "load_average_1min": round(os.getloadavg()[0], 2)}
            runs.setdefault(method, {}).setdefault(arm, {})[seed] = result
            print(f"{method:<7} {arm:<21} seed {seed}: k-NN {' '.join(f'{x:.2f}' for x in result['knn'])} | "
                  f"linear {' '.join(f'{x:.2f}' for x in result['linear'])}  ({time.time() - started:.0f} s)", flush=True)
    # The same networks at step 0 (pretrain seeds with run.seed before building them): seed 0's baselines.
    random_init = {m: knn_per_block(out / f"{m}-baseline-s0", random_init=True) for m in methods}

    def arm(m: str, name: str, metric: str) -> dict[int, list[float]]:
        return {seed: r[metric] for seed, r in runs[m][name].items()}

    tables = {m: {metric: paired_rows(arm(m, "baseline", metric), arm(m, "sd", metric)) for metric in ("knn", "linear")}
              for m in methods}
    probes = {m: {"name": PROBES[m][0], "sets": PROBES[m][1],
                  **{metric: paired_rows(arm(m, "baseline", metric), arm(m, PROBES[m][0], metric)) for metric in ("knn", "linear")},
                  **{f"{metric}_vs_sd": paired_rows(arm(m, "sd", metric), arm(m, PROBES[m][0], metric)) for metric in ("knn", "linear")}}
              for m in methods if m in PROBES and PROBES[m][0] in runs[m]}
    wall, cpu = time.time() - started, cpu_seconds() - cpu_started
    report = {
        "what": "per-block top-1 (%), block 1 first; tables: SD (or a probe) against the baseline, paired by seed",
        "data": f"{FASHION_MNIST} 5k seeded subset (pre-training, k-NN bank, probe training); "
                f"{FASHION_MNIST_TEST} (10k, reported on)",
        "epochs": args.epochs, "seeds": list(range(args.seeds)), "precision": args.precision,
        "knn": {"k": KNN_K, "temperature": KNN_T},
        "linear": {"mode": "cached, 100 epochs, batch 256, SGD momentum 0.9, cosine", "lr_per_256": LINEAR_LR,
                   "trained_on": "the whole 5k subset; nothing selected"},
        "presets": {m: {"preset": METHODS[m][0], "sets": METHODS[m][1] + budget_sets(m, args.epochs)} for m in methods},
        "arms": ARMS, "runs": {m: {a: {str(s): r for s, r in by_seed.items()} for a, by_seed in arms.items()}
                               for m, arms in runs.items()},
        "random_init_knn_seed0": random_init, "tables": tables, "probes": probes,
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "cpu_per_wall": round(cpu / wall, 2),
        "peak_rss_mib": {"largest_pretrain_process": round(children_peak_rss_mib()),
                         "this_process_evaluations": round(peak_rss_mib())},
        "load_average_1min": {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)},
        "machine": machine(torch.device("cpu")),
    }
    results = Path(args.results)
    write_report(results / "sdssl_layers.json", report)
    plot(tables, probes, random_init, results / "sdssl_layers.png")
    text = [f"Fashion-MNIST, 5k-image seeded subset, 10k test images, {args.epochs} epoch(s), seeds "
            f"{', '.join(map(str, range(args.seeds)))} in every arm; top-1 (%) of each block's CLS, mean ± std "
            f"over seeds; differences paired by seed. {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU, peak RSS "
            f"{report['peak_rss_mib']['largest_pretrain_process']} MiB (largest pre-training process), "
            f"{report['peak_rss_mib']['this_process_evaluations']} MiB (the evaluating process).\n"]
    for m in methods:
        text.append(f"\n### {m} (`{METHODS[m][0]}`)\n\nTop-1 (%), mean ± std over seeds; differences paired by seed, "
                    f"(n/{args.seeds}) = seeds where SD was higher. Linear: cached probe at lr {LINEAR_LR:g}. "
                    "Random initialisation, k-NN per block (seed 0): " + " / ".join(f"{x:.2f}" for x in random_init[m])
                    + ".\n\n" + method_table(tables[m]["knn"], tables[m]["linear"]))
        if m in probes:
            text.append(f"\nProbe `{probes[m]['name']}` ({', '.join(PROBES[m][1][1:])}):\n\n"
                        + probe_table(probes[m], tables[m]))
    (results / "sdssl_layers.md").write_text("".join(text))
    print("\n" + "".join(text))


if __name__ == "__main__":
    main()
