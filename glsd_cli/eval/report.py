"""Where evaluation results go and how they look: a JSON file, a CSV table and a console table."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from rich.table import Table

from glsd_cli.engine.checkpoint import CHECKPOINT_NAME, atomic_write_bytes
from glsd_cli.engine.metrics import console
from glsd_cli.errors import GlsdError


def check_output(output: Path | None) -> None:
    """Refuse an `--output` that cannot take the result, before any work: it names the JSON file, whose
    stem also names the CSV beside it (and the probes' run folder), so it must end in .json and must
    not be a folder."""
    if output is None:
        return
    output = Path(output)
    if output.is_dir():
        raise GlsdError(f"--output {output} is a folder; give the result file's path, e.g. {output / 'result.json'}")
    if output.suffix != ".json":
        raise GlsdError(f"--output names the result JSON file and must end in .json (the CSV goes beside it), "
                        f"got {output}")


def result_paths(checkpoint_file: Path, tag: str, output: Path | None = None) -> tuple[Path, Path]:
    """(JSON, CSV) paths: `--output` and its .csv twin, else `<tag>.json` beside the checkpoint.

    A run's own `last.safetensors` gets plain names (knn.json); any other checkpoint file gets its
    stem as a prefix (model.knn.json), so evaluations of two checkpoints in one folder do not collide.
    """
    if output is not None:
        output = Path(output)
        return output, output.with_suffix(".csv")
    prefix = "" if checkpoint_file.name == CHECKPOINT_NAME else f"{checkpoint_file.stem}."
    folder = checkpoint_file.parent  # names built whole: a tag like knn-train0.5 has a dot of its own
    return folder / f"{prefix}{tag}.json", folder / f"{prefix}{tag}.csv"


def write_results(json_path: Path, csv_path: Path, result: dict, rows: list[dict]) -> None:
    """The full result as JSON, and its table (one dict per row) as CSV; both written atomically."""
    atomic_write_bytes(json_path, (json.dumps(result, indent=2) + "\n").encode())
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(csv_path, buffer.getvalue().encode())


def print_table(title: str, columns: list[str], rows: list[list[str]], caption: str | None = None) -> None:
    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
