"""Run logs: metrics.jsonl (every N steps), results.csv (one row per epoch) and the progress display:
a rich bar on a terminal, plain lines when stderr is a file or a pipe (CI, SLURM, `nohup ... > log`)."""
from __future__ import annotations

import csv
import datetime
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# soft_wrap: a line longer than the console is written whole (a log file has no width; rich would
# break it at 80 columns when stderr is not a terminal); a terminal wraps it itself.
console = Console(stderr=True, soft_wrap=True)


class MetricsLog:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.csv = self.run_dir / "results.csv"

    def truncate_after(self, step: int) -> None:
        """Drop the step lines past `step`: a resumed run redoes those steps and logs them again."""
        if not self.jsonl.exists():
            return
        kept = []
        for line in self.jsonl.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
        self.jsonl.write_text("".join(k + "\n" for k in kept))

    def step(self, record: dict) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(_round(record)) + "\n")

    def epoch(self, record: dict) -> None:
        record = _round(record)
        rows = []
        if self.csv.exists():
            with open(self.csv, newline="") as f:
                rows = list(csv.DictReader(f))
        rows = [r for r in rows if int(r["epoch"]) < record["epoch"]]  # a resumed run rewrites its epoch
        rows.append({k: str(v) for k, v in record.items()})
        fields: list[str] = []
        for r in rows:
            fields += [k for k in r if k not in fields]
        with open(self.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)


def read_results(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "results.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _round(record: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}


def _status(metrics: dict, values, epoch: int, epochs: int) -> str:
    text = f"epoch {epoch + 1}/{epochs}  loss {metrics.get('loss', float('nan')):.4f}"
    if getattr(values, "lr", None) is not None:
        text += f"  lr {values.lr:.2e}"
    if "images_per_s" in metrics:
        text += f"  {metrics['images_per_s']:.0f} img/s"
    return text


class _Bar:
    def __init__(self, progress: Progress | None, task_id):
        self.progress, self.task_id = progress, task_id

    def advance(self, n: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task_id, completed=n)

    def update(self, metrics: dict[str, float] | None, values, epoch: int, epochs: int) -> None:
        """Advance one step; `metrics` (read at log steps only) refresh the status text."""
        if self.progress is None:
            return
        if not metrics:
            self.progress.update(self.task_id, advance=1)
            return
        self.progress.update(self.task_id, advance=1, status=_status(metrics, values, epoch, epochs))


# Plain progress lines at most this often (epoch ends and the last step always get one): a
# 100-epoch run then writes a few thousand lines, not one per logged step.
LINE_INTERVAL_S = 30.0


class _Lines:
    """The progress as whole lines, for logs: a redrawn bar there is cut to 80 columns and shows up
    only when it ends. A line on the steps the trainer logs (those carry img/s: every
    run.log_every_steps, and every epoch's last step), at most one per LINE_INTERVAL_S but always
    at epoch ends and the last step; steps without metrics (feature extraction) the same way."""

    def __init__(self, total: int, description: str):
        self.total, self.description = total, description
        self.completed = self.first = 0
        self.start = time.monotonic()
        self.last_line = float("-inf")

    def advance(self, n: int) -> None:
        self.completed = self.first = n  # a resumed run starts counting (and timing) here

    def update(self, metrics: dict | None, values, epoch: int, epochs: int) -> None:
        self.completed += 1
        if metrics is None:
            return  # a training step the trainer does not log (its metrics stay on the device)
        steps_per_epoch = max(self.total // max(epochs, 1), 1)
        boundary = self.completed == self.total or (metrics and self.completed % steps_per_epoch == 0)
        now = time.monotonic()
        if not boundary and now - self.last_line < LINE_INTERVAL_S:
            return
        self.last_line = now
        elapsed = now - self.start
        done = self.completed - self.first
        eta = (self.total - self.completed) * elapsed / done if done else float("nan")
        line = (f"{self.description} step {self.completed}/{self.total} ({100 * self.completed / max(self.total, 1):.0f}%)  "
                + (_status(metrics, values, epoch, epochs) + "  " if metrics else "")
                + f"elapsed {_clock(elapsed)}  eta {_clock(eta)}")
        console.file.write(line + "\n")
        console.file.flush()


def _clock(seconds: float) -> str:
    return "-:--:--" if seconds != seconds else str(datetime.timedelta(seconds=round(seconds)))


@contextmanager
def progress_bar(total: int, disabled: bool = False, description: str = "train") -> Iterator[_Bar | _Lines]:
    if disabled:
        yield _Bar(None, None)
        return
    if not (console.is_terminal or console.is_jupyter):
        yield _Lines(total, description)
        return
    progress = Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=console, transient=False)
    with progress:
        task_id = progress.add_task(description, total=total, status="")
        yield _Bar(progress, task_id)
