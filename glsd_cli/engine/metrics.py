"""Run logs: metrics.jsonl (every N steps), results.csv (one row per epoch) and a rich progress bar."""
from __future__ import annotations

import csv
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


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
        text = f"epoch {epoch + 1}/{epochs}  loss {metrics.get('loss', float('nan')):.4f}"
        text += f"  lr {values.lr:.2e}"
        if "images_per_s" in metrics:
            text += f"  {metrics['images_per_s']:.0f} img/s"
        self.progress.update(self.task_id, advance=1, status=text)


@contextmanager
def progress_bar(total: int, disabled: bool = False, description: str = "train") -> Iterator[_Bar]:
    if disabled:
        yield _Bar(None, None)
        return
    progress = Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=console, transient=False)
    with progress:
        task_id = progress.add_task(description, total=total, status="")
        yield _Bar(progress, task_id)
