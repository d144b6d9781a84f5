"""The local loss's target gather alone: every student token's sum_t w_t P_t[j_t] over the teacher
probabilities, as one weighted `embedding_bag` (what losses/local.py does) or as one `index_select`
per teacher view with a multiply-add (the alternative), at ViT-S/16 token counts.

    python bench/target_gather.py --device cuda --batch 128      # the shapes of a GPU step
    python bench/target_gather.py --batch 4                       # CPU
Writes bench/results/target_gather[-cuda].json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, device_and_threads, machine, sync, write_report  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

STUDENT_TOKENS, TEACHER_TOKENS = 680, 392  # per image: 2 x 196 + 8 x 36 student, 2 x 196 teacher


def embedding_bag(probs, rows, w):
    return F.embedding_bag(rows, probs, mode="sum", per_sample_weights=w)


def index_select(probs, rows, w):
    target = probs.index_select(0, rows[:, 0]).mul_(w[:, :1])
    return target.addcmul_(probs.index_select(0, rows[:, 1]), w[:, 1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out-dim", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = device_and_threads(args.device, None)
    g = torch.Generator().manual_seed(0)
    n, m = args.batch * STUDENT_TOKENS, args.batch * TEACHER_TOKENS
    rows_all = torch.randint(0, m, (n, 2), generator=g).to(device)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        probs = torch.softmax(torch.randn(m, args.out_dim, generator=g), -1).to(device, dtype)
        w = torch.rand(n, 2, generator=g).to(device, dtype)
        ref = embedding_bag(probs.float(), rows_all, w.float())
        for name, fn in (("embedding_bag", embedding_bag), ("index_select", index_select)):
            times = []
            for i in range(args.steps + 2):
                sync(device)
                t0 = time.perf_counter()
                out = fn(probs, rows_all, w)
                sync(device)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            err = float((out.float() - ref).abs().max() / ref.abs().max())
            s = statistics.median(times)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "method": name, "median_s": s,
                         "gb_per_s_written": n * args.out_dim * probs.element_size() / s / 1e9, "max_rel_err": err})
    print(f"\ntarget gather, {n} student x {m} teacher tokens, K = {args.out_dim}, {machine(device)['device']}\n")
    print("| dtype | method | median ms | GB/s written | max rel. error |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['method']} | {1e3 * r['median_s']:.2f} | {r['gb_per_s_written']:.0f} | "
              f"{r['max_rel_err']:.1e} |")
    report = {"machine": machine(device), "batch": args.batch, "out_dim": args.out_dim, "rows": rows}
    write_report(args.out or RESULTS / f"target_gather{'-cuda' if device.type == 'cuda' else ''}.json", report)


if __name__ == "__main__":
    main()
