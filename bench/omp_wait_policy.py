"""Time one tiny-dino training step and one batch of multi-crop views with OMP_WAIT_POLICY ACTIVE vs PASSIVE.

The policy must be set before torch loads OpenMP, so each arm runs in its own subprocess.
    python bench/omp_wait_policy.py      # writes bench/results/omp_wait_policy.json
The difference is large when other processes compete for the cores, small on an idle machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import json, time, torch
from torch.utils.data import default_collate
from glsd_cli.config import resolve
from glsd_cli.data.loader import ViewsDataset
from glsd_cli.pretraining import make_views, open_training_source, prepare
from glsd_cli.engine.optim import adamw, param_groups
from glsd_cli.engine.task import ScheduledValues
from glsd_cli.methods import StepContext, build_method
cfg = resolve("tiny-dino"); src = open_training_source(cfg); cfg, _ = prepare(cfg, len(src))
ds = ViewsDataset(src, make_views(cfg), 0)
t = time.perf_counter(); batch = default_collate([ds[i] for i in range(64)]); data_s = time.perf_counter() - t
torch.manual_seed(0); m = build_method(cfg)
opt = adamw(param_groups(m.trainable_modules()))
ctx = StepContext(1, 0, 100, ScheduledValues(lr=5e-4, teacher_temp=0.04, momentum=0.99))
times = []
for _ in range(5):
    t = time.perf_counter()
    out = m.training_step(batch, ctx); opt.zero_grad(); out.loss.backward(); opt.step(); m.after_step(ctx, [out])
    times.append(time.perf_counter() - t)
print(json.dumps({"data_batch_s": data_s, "step_s": sorted(times)[2]}))
"""


def main() -> None:
    rows = {}
    for policy in ("ACTIVE", "PASSIVE"):
        env = dict(os.environ, OMP_WAIT_POLICY=policy)
        out = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
        rows[policy] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{policy:<8} multi-crop batch of 64: {rows[policy]['data_batch_s']:.2f} s   "
              f"training step: {rows[policy]['step_s']:.2f} s", flush=True)
    rows["load_average"] = os.getloadavg()
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "omp_wait_policy.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
