"""results.png: the training curves of a run, redrawn from its logs at every epoch end.

Panels (each only when the run logged it): loss terms, learning rate, teacher temperature, EMA
momentum, λ(t) of self-distillation, the collapse monitors, and the epoch-end k-NN monitors (CLS
top-1; patch k-NN mIoU on segmentation data).
Drawn headless (Agg) and written atomically, so a viewer never sees half a PNG.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from glsd_cli.engine.checkpoint import atomic_write_bytes
from glsd_cli.engine.metrics import read_results

PLOT_NAME = "results.png"


def _step_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash: the next write continues after it
            continue
    return records


def _panels(steps: list[dict], epochs: list[dict]) -> list[tuple[str, str, dict[str, tuple[list, list]]]]:
    """(title, x label, {series name: (x, y)}) for every panel with data."""
    keys = {k for r in steps for k, v in r.items() if isinstance(v, (int, float))}

    def series(names):
        out = {}
        for name in names:
            pts = [(r["step"], r[name]) for r in steps if isinstance(r.get(name), (int, float)) and "step" in r]
            if pts:
                out[name] = ([p[0] for p in pts], [p[1] for p in pts])
        return out

    panels = [
        ("loss terms", "step", series(sorted(k for k in keys if k.startswith("loss")))),
        ("learning rate", "step", series(["lr"])),
        ("teacher temperature", "step", series(["teacher_temp"])),
        ("teacher EMA momentum", "step", series(["momentum"])),
        ("λ(t) of self-distillation", "step", series(["sd_weight"])),
        ("collapse monitors (nats)", "step", series(["teacher_entropy", "teacher_kl_uniform"])),
        ("dense-head collapse monitors (nats)", "step", series(["dense_teacher_entropy", "dense_teacher_kl_uniform"])),
        ("centre norm", "step", series(sorted(k for k in keys if k.startswith("center_norm")))),
    ]
    for key, title in (("knn_top1", "k-NN top-1 (%)"), ("patch_knn_miou", "patch k-NN mIoU (%)")):
        points = [(int(r["epoch"]) + 1, float(r[key])) for r in epochs if r.get(key) not in (None, "")]
        if points:
            panels.append((title, "epoch", {key: ([p[0] for p in points], [p[1] for p in points])}))
    return [p for p in panels if p[2]]


def draw_results(run_dir: Path) -> Path | None:
    """Redraw run_dir/results.png from metrics.jsonl and results.csv; None when there is nothing yet."""
    run_dir = Path(run_dir)
    panels = _panels(_step_records(run_dir), read_results(run_dir))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display on training machines
    from matplotlib.figure import Figure

    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    for i, (title, xlabel, data) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name, (x, y) in data.items():
            ax.plot(x, y, label=name, marker="o" if len(x) < 20 else None, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if len(data) > 1 or title.startswith("loss"):
            ax.legend(fontsize=7)
    fig.suptitle(run_dir.name)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    path = run_dir / PLOT_NAME
    atomic_write_bytes(path, buf.getvalue())
    return path
