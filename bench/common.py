"""What the benchmark scripts share: where results go, the machine they ran on, peak memory and CPU
time, a preset resolved as a benchmark runs it, the CLI run as a subprocess (the low-data tables), and
a finished run's collapse monitors (the dense tables)."""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (glsd_cli/__init__.py)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from glsd_cli.config import Config, resolve  # noqa: E402
from glsd_cli.data.size_defaults import IMAGENET_N  # noqa: E402
from glsd_cli.data.synthetic import SyntheticTextures  # noqa: E402
from glsd_cli.engine.precision import cpu_supports_bf16, pick_device  # noqa: E402
from glsd_cli.pretraining import prepare  # noqa: E402


def bench_config(preset: str, sets: list[str] | tuple[str, ...] = ()) -> Config:
    """A preset without the k-NN monitor, its `auto` values resolved for the data it is meant for:
    ImageNet-1k for 224-px presets, the built-in data's training split for the tiny ones."""
    cfg = resolve(preset, ["run.knn_monitor=false", *sets])
    n = IMAGENET_N if cfg.data.global_crop_size >= 224 else len(SyntheticTextures("train"))
    return prepare(cfg, n)[0]


def machine(device: torch.device) -> dict:
    """Where the figures were taken."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_average_1min": round(os.getloadavg()[0], 2), "cpu_native_bf16": cpu_supports_bf16(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def device_and_threads(device: str, threads: int | None) -> torch.device:
    """The device a benchmark's --device asks for (glsd's own choice for 'auto'), after applying its
    --threads to torch's CPU thread count (torch's default when not given)."""
    if threads:
        torch.set_num_threads(threads)
    return pick_device(device)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (it never goes down: one figure per process)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def children_peak_rss_mib() -> float:
    """Peak resident memory of the largest finished child process (a CLI run, a loader worker)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished (waited-for) descendants so far."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# The low-data benchmarks' set: the fmnist-* presets pre-train on a seeded 5k subset of the training
# split (Debian package dataset-fashion-mnist); they are evaluated on the full 10k test split.
FASHION_MNIST = "fashion-mnist:/usr/share/datasets/fashion-mnist"
FASHION_MNIST_TEST = FASHION_MNIST + "?split=test"


def glsd(*args: str) -> str:
    """Run the glsd CLI of this checkout in a subprocess (its own peak memory); returns its stdout."""
    cmd = [sys.executable, "-m", "glsd_cli", *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:  # show why before stopping: the captured output would otherwise be lost
        sys.stderr.write(done.stdout + done.stderr)
        done.check_returncode()
    return done.stdout


def pretrain_seconds(run: Path) -> float:
    """Wall time of a finished pre-training: config.json is written at its start, done.json at its end
    (also right for runs finished by an earlier, interrupted invocation of a script)."""
    return (run / "done.json").stat().st_mtime - (run / "config.json").stat().st_mtime


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


def collapse_monitors(run: Path) -> dict:
    """The last epoch's collapse statistics of a finished run's global head (and log K) and of its dense
    head (and its log K), and every collapse warning its epochs raise for either head, judged from its
    results.csv as the Trainer judges them, by the rules as they stand now: did this run train stably?"""
    from glsd_cli.engine.metrics import read_results
    from glsd_cli.engine.monitors import COLLAPSE_KEYS, DENSE, epoch_collapse_warnings
    from glsd_cli.methods.glsd import watched_targets

    rows = read_results(run)
    prototypes, dense_prototypes, sinkhorn = watched_targets(Config.from_json((run / "config.json").read_text()))
    warnings = [warning for epoch, row in enumerate(rows)
                for warning in epoch_collapse_warnings({k: float(v) for k, v in row.items() if v}, epoch, rows[:epoch],
                                                       prototypes, dense_prototypes, sinkhorn)]
    keep = [*COLLAPSE_KEYS, *([DENSE + key for key in COLLAPSE_KEYS] if dense_prototypes else []), "loss"]
    return {"epochs": len(rows), "log_k": round(math.log(prototypes), 4),
            **({"dense_log_k": round(math.log(dense_prototypes), 4)} if dense_prototypes else {}),
            **{key: float(rows[-1][key]) for key in keep if rows[-1].get(key)}, "warnings": warnings}
