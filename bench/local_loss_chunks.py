"""The local loss alone (forward + backward) at ViT-S/16 token counts, for several chunk sizes.

What it shows: on a CPU the K-wide passes of the local loss (softmax, gathers, the logits' gradient)
are bound by memory traffic, and above 32 MiB a buffer is a fresh mmap from glibc's malloc whose page
faults make each pass several times slower. The default chunk (`method.local.chunk_tokens = "auto"`,
16 MiB of float32 logits, at least one image) keeps buffers in malloc's reusable heap. Inputs: the
bottlenecks of 2 global views of 14 x 14 tokens and 8 local views of 6 x 6 (vits16-geo's crops), random
matches with 80 % valid tokens, DINO's weight-normalised prototype layers; every (global teacher,
other view) pair, as GLSD trains. Chunks are never recomputed here (see --recompute-above-mib).

    python bench/local_loss_chunks.py                     # K = 8192, batch 8, fp32 and bf16
    python bench/local_loss_chunks.py --out-dim 65536 --batch 2
Writes bench/results/local_loss_chunks[-K].json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, device_and_threads, machine, peak_rss_mib, sync, write_report  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.parametrizations import weight_norm  # noqa: E402

from glsd_cli.engine.precision import autocast_dtype, cpu_supports_bf16  # noqa: E402
from glsd_cli.losses.local import LocalDistillationLoss  # noqa: E402
from glsd_cli.matching import TokenMatches  # noqa: E402

GLOBAL_TOKENS, LOCAL_TOKENS, NUM_LOCAL, BOTTLENECK = 196, 36, 8, 256


def inputs(batch: int, device: torch.device, generator: torch.Generator):
    sizes = [GLOBAL_TOKENS] * 2 + [LOCAL_TOKENS] * NUM_LOCAL
    student = torch.randn(batch, sum(sizes), BOTTLENECK, generator=generator).to(device).requires_grad_()
    teacher = torch.randn(batch, 2 * GLOBAL_TOKENS, BOTTLENECK, generator=generator).to(device)
    index = torch.randint(0, GLOBAL_TOKENS, (batch, sum(sizes), 2), generator=generator).to(device)
    valid = (torch.rand(batch, sum(sizes), 2, generator=generator) < 0.8).to(device)
    return student, teacher, TokenMatches(index, valid, tuple(sizes))


def time_arm(chunk_tokens: int | None, precision: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    student_last = weight_norm(nn.Linear(BOTTLENECK, args.out_dim, bias=False)).to(device)
    teacher_last = weight_norm(nn.Linear(BOTTLENECK, args.out_dim, bias=False)).to(device).requires_grad_(False)
    loss_fn = LocalDistillationLoss(args.out_dim, chunk_tokens=chunk_tokens,
                                    recompute_above_mib=args.recompute_above_mib).to(device)
    dtype = autocast_dtype(precision, device)
    generator = torch.Generator().manual_seed(0)
    times = []
    for i in range(args.warmup + args.steps):
        student, teacher, matches = inputs(args.batch, device, generator)
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            # under autocast the bottlenecks come out of the dense head's MLP in bf16
            loss, _ = loss_fn(student.to(dtype) if dtype else student, teacher, student_last, teacher_last,
                              matches, 0.04)
        loss.backward()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    tokens = GLOBAL_TOKENS * 2 + LOCAL_TOKENS * NUM_LOCAL
    elem = dtype.itemsize if dtype else 4
    plan = loss_fn.plan(args.batch, tokens, 2 * GLOBAL_TOKENS, elem, device)
    return {"chunk_tokens": "auto" if chunk_tokens is None else chunk_tokens, "precision": precision,
            "images_per_chunk": plan.images, "recompute": plan.recompute,
            "chunk_logits_mib": 4 * args.out_dim * plan.images * tokens / 2**20,
            "median_s": statistics.median(times), "all_s": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dim", type=int, default=8192, help="dense prototypes K")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunks", default="auto,1360,5440", help="chunk_tokens values ('auto' = the default)")
    ap.add_argument("--recompute-above-mib", type=float, default=1e6,
                    help="method.local.recompute_above_mib (default: never recompute, so that the arms "
                         "differ in buffer sizes only; the training default is 32)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = device_and_threads(args.device, args.threads)
    precisions = ["fp32"] + (["bf16"] if device.type == "cuda" or cpu_supports_bf16() else [])
    chunks = [None if c.strip() == "auto" else int(c) for c in args.chunks.split(",")]
    rows = [time_arm(c, p, args, device) for p in precisions for c in chunks]
    print(f"\nlocal loss forward + backward, K = {args.out_dim}, batch {args.batch}, device {device.type}\n")
    print("| chunk_tokens | images per chunk | float32 logits per chunk | precision | median s |")
    print("|---|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['chunk_tokens']} | {r['images_per_chunk']} | {r['chunk_logits_mib']:.0f} MiB | "
              f"{r['precision']} | {r['median_s']:.3f} |")
    report = {"machine": machine(device), "out_dim": args.out_dim, "batch": args.batch,
              "recompute_above_mib": args.recompute_above_mib, "rows": rows,
              "peak_rss_mib": peak_rss_mib()}
    suffix = "" if args.out_dim == 8192 else f"-{args.out_dim}"
    write_report(args.out or RESULTS / f"local_loss_chunks{suffix}.json", report)


if __name__ == "__main__":
    main()
