"""The training step against its bound: how far the engine's full step is from the model arithmetic alone.

Per preset and precision (fp32; bf16 where the CPU has native bf16 or on CUDA), in one process, on the
same pre-built multi-crop batches (built-in data; the data pipeline is not timed):
  full step   the engine's real `Trainer.train_step`: forward under autocast, losses, matching,
              backward, clipping, AdamW, EMA teacher and centres;
  model       the model arithmetic alone: the student's plain forward + backward of backbone, global
              DINO head on the CLS tokens and (local-loss presets) dense head on every patch token,
              plus the teacher's no-grad forward of backbone and heads on the global views; the loss
              is a sum of the outputs — no loss, matching, EMA or optimiser.
The two are timed alternately, step by step, so machine load hits both alike. overhead = full / model
(target < 1.3). Model FLOPs per step are counted with torch's FlopCounterMode (the model pass; split
into backbone / global head / dense head, each counted on its own), the full step's executed FLOPs
too (fp32 arm), and achieved FLOP/s are set against a square-matmul peak measured in the same run.

    python bench/step_bound.py                                      # tiny-dino and tiny-geo
    python bench/step_bound.py --presets tiny-geo --steps 10 --batch 32
    python bench/step_bound.py --presets vits16-geo --batch 2 --steps 3   # slow on a CPU
    python bench/step_bound.py --presets vits16-geo --batch 2 --steps 3 --dense-out-dim 65536
Writes bench/results/step_bound.json and prints Markdown tables.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS, bench_config, device_and_threads, machine, peak_rss_mib, sync,  # noqa: E402
                    write_report)  # (first: sets paths)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402
from train_precision import batches  # noqa: E402  (pre-built multi-crop batches on the device)

from glsd_cli.engine.optim import adamw, param_groups  # noqa: E402
from glsd_cli.engine.precision import autocast_dtype, cpu_supports_bf16  # noqa: E402
from glsd_cli.pretraining import build_schedules, compile_backbones  # noqa: E402
from glsd_cli.engine.trainer import Trainer  # noqa: E402
from glsd_cli.methods import build_method  # noqa: E402
from glsd_cli.data.multicrop import NUM_GLOBAL_VIEWS as NUM_GLOBAL  # noqa: E402

RESULT = RESULTS / "step_bound.json"
DEFAULT_BATCH = {"tiny-dino": 64, "tiny-geo": 64, "vits16-geo": 2}  # tiny: the presets' data.batch_size
aten = torch.ops.aten


# FlopCounterMode (torch 2.14) has formulas for the CUDA SDPA kernels only: without these two the CPU
# attention (timm's fused_attn → aten._scaled_dot_product_flash_attention_for_cpu) counts as 0 FLOPs.
CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v)}


def matmul_peak(dtype: torch.dtype, n: int, reps: int, device: torch.device) -> dict:
    """FLOP/s of an n×n @ n×n matmul (2n³ FLOPs): median and best over `reps` after one warm-up."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    times = []
    for i in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    flop = 2 * n**3
    return {"n": n, "reps": reps, "median_flops": flop / statistics.median(times), "best_flops": flop / min(times)}


def model_arithmetic(method, views: list[torch.Tensor], local_on: bool) -> None:
    """The student's forward + backward and the teacher's no-grad forward, grouped as the method groups them:
    teacher on the 2 globals; student backbone once per resolution, global head on all CLS tokens at once,
    dense head on each resolution's patch tokens (every token once, through its prototype layer)."""
    s, t = method.student, method.teacher
    with torch.no_grad():
        t_tok = t["backbone"].forward_tokens(torch.cat(views[:NUM_GLOBAL]))
        t["head"](t_tok.cls)
        if local_on:
            t["dense_head"](t_tok.patches)
    toks = [s["backbone"].forward_tokens(torch.cat(g)) for g in (views[:NUM_GLOBAL], views[NUM_GLOBAL:]) if g]
    loss = s["head"](torch.cat([tok.cls for tok in toks])).float().sum()
    if local_on:
        loss = loss + sum(s["dense_head"](tok.patches).float().sum() for tok in toks)
    loss.backward()


def count_flops(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as c:
        fn()
    return c.get_total_flops()


def part_flops(method, views: list[torch.Tensor], local_on: bool) -> dict[str, int]:
    """FLOPs of each module on its own: teacher forward + student forward and backward, with each head's
    input a leaf (so the gradient it hands back to the backbone is counted with the head)."""
    s, t = method.student, method.teacher
    groups = [g for g in (views[:NUM_GLOBAL], views[NUM_GLOBAL:]) if g]
    with torch.no_grad():
        t_tok = t["backbone"].forward_tokens(torch.cat(views[:NUM_GLOBAL]))
        s_toks = [s["backbone"].forward_tokens(torch.cat(g)) for g in groups]

    def backbone():
        with torch.no_grad():
            t["backbone"].forward_tokens(torch.cat(views[:NUM_GLOBAL]))
        toks = [s["backbone"].forward_tokens(torch.cat(g)) for g in groups]
        sum(tok.cls.sum() + tok.patches.sum() for tok in toks).backward()

    def head():
        with torch.no_grad():
            t["head"](t_tok.cls)
        s["head"](torch.cat([tok.cls for tok in s_toks]).requires_grad_()).sum().backward()

    def dense_head():
        with torch.no_grad():
            t["dense_head"](t_tok.patches)
        sum(s["dense_head"](tok.patches.detach().requires_grad_()).sum() for tok in s_toks).backward()

    out = {"backbone": count_flops(backbone), "head": count_flops(head)}
    if local_on:
        out["dense_head"] = count_flops(dense_head)
    method.student.zero_grad(set_to_none=True)
    return out


def host_syncs_per_step(trainer, data: list[dict], first_step: int, steps: int = 3) -> float:
    """CUDA only: synchronisations of the host with the device per engine step, counted by torch's
    sync debug mode (every .item(), .tolist(), blocking copy to the host, ...)."""
    import warnings

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(steps):
                trainer.train_step([data[i % len(data)]], first_step + i)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def time_arm(cfg, precision: str, data: list[dict], steps: int, warmup: int, local_on: bool,
             device: torch.device, count: bool, compile: bool = False,
             local_targets: str | None = None) -> tuple[dict, dict | None]:
    """Full step and model pass, alternately; the FLOP counts too when `count`. `local_targets`
    ("gather" | "prototypes"; None: the device's default) picks how the local loss makes its targets."""
    torch.manual_seed(0)
    method = build_method(cfg).to(device)
    if local_targets is not None:
        method.local_loss.targets_through_prototypes = local_targets == "prototypes"
    if compile:
        compile_backbones(method)
    total = steps + warmup
    trainer = Trainer(task=method, optimizer=adamw(param_groups(method.trainable_modules())),
                      schedules=build_schedules(cfg, method, total + 8), epochs=1, steps_per_epoch=total + 8,
                      run_dir=None, device=device, config_json="{}", precision=precision,
                      clip_grad=cfg.optim.clip_grad, quiet=True)
    dtype, full, model = autocast_dtype(precision, device), [], []
    for step in range(total):
        batch = data[step % len(data)]
        sync(device)
        t0 = time.perf_counter()
        trainer.train_step([batch], step)
        sync(device)
        t1 = time.perf_counter()
        method.student.zero_grad(set_to_none=True)  # as the trainer does before its backward
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            model_arithmetic(method, batch["views"], local_on)
        sync(device)
        t2 = time.perf_counter()
        if step >= warmup:
            full.append(t1 - t0)
            model.append(t2 - t1)
    arm = {"precision": precision + ("+compile" if compile else "") + (f"+{local_targets}" if local_targets else ""),
           "full_step_s": statistics.median(full),
           "model_s": statistics.median(model), "full_step_s_all": full, "model_s_all": model}
    if device.type == "cuda":
        arm["host_syncs_per_step"] = host_syncs_per_step(trainer, data, total)
        arm["cuda_max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    if not count:  # FLOPs do not depend on the precision: counted once
        return arm, None
    method.student.zero_grad(set_to_none=True)
    views = data[0]["views"]
    flops = {"model": count_flops(lambda: model_arithmetic(method, views, local_on)),
             **part_flops(method, views, local_on)}
    flops["full_step_executed"] = count_flops(lambda: trainer.train_step([data[0]], total))
    return arm, flops


def run_preset(preset: str, batch: int, steps: int, warmup: int, precisions: list[str], peaks: dict,
               device: torch.device, dense_out_dim: int | None = None, compile: bool = False,
               compare_targets: bool = False) -> dict:
    cfg = bench_config(preset, [f"method.local.out_dim={dense_out_dim}"] if dense_out_dim else [])
    data = batches(cfg, batch, 2, device)
    local_on = cfg.method.local.matching != "none"
    arms, flops = [], None
    runs = [(p, False, None) for p in precisions] + ([(precisions[-1], True, None)] if compile else [])
    if compare_targets and local_on:  # the way the device does not take by default, in the last precision
        runs.append((precisions[-1], False, "prototypes" if device.type == "cpu" else "gather"))
    for precision, compiled, way in runs:
        try:
            arm, counted = time_arm(cfg, precision, data, steps, warmup, local_on, device, count=flops is None,
                                    compile=compiled, local_targets=way)
        except RuntimeError as e:  # an engine failure in one precision: record it, keep the other arms
            arms.append({"precision": precision, "error": f"{type(e).__name__}: {e}"})
            continue
        flops, peak = counted or flops, peaks[precision]["median_flops"]
        arm.update(images_per_s=batch / arm["full_step_s"], model_images_per_s=batch / arm["model_s"],
                   overhead=arm["full_step_s"] / arm["model_s"], peak_flops=peak)
        if flops:
            arm.update(achieved_flops=flops["model"] / arm["full_step_s"],
                       model_achieved_flops=flops["model"] / arm["model_s"],
                       achieved_over_peak=flops["model"] / arm["full_step_s"] / peak)
        arms.append(arm)
    out = {"batch": batch, "steps": steps, "warmup": warmup, "local_loss": local_on,
           "head_out_dim": cfg.head.out_dim, "dense_out_dim": cfg.method.local.out_dim if local_on else None,
           "flops_per_step": flops, "arms": arms}
    if flops:
        out["flop_share"] = {k: flops[k] / flops["model"] for k in flops if k != "model"}
        # sanity: the parts counted one by one add up to the model pass (≈ 1.00)
        parts = sum(flops[k] for k in ("backbone", "head", "dense_head") if k in flops)
        out["parts_sum_over_model"] = parts / flops["model"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny-dino,tiny-geo")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per arm")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default: per preset)")
    ap.add_argument("--matmul-size", type=int, default=None, help="peak matmul side (default 2048; CUDA 8192)")
    ap.add_argument("--matmul-reps", type=int, default=5)
    ap.add_argument("--dense-out-dim", type=int, default=None, help="override method.local.out_dim (e.g. 65536)")
    ap.add_argument("--precisions", default=None, help="comma-separated (default: fp32, and bf16 where native)")
    ap.add_argument("--compile", action="store_true", help="also time the last precision with run.compile")
    ap.add_argument("--compare-local-targets", action="store_true",
                    help="also time the local loss's other way to its targets (the gather on a GPU, through the "
                         "prototypes on a CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()
    device = device_and_threads(args.device, args.threads)
    precisions = (args.precisions.split(",") if args.precisions
                  else ["fp32"] + (["bf16"] if device.type == "cuda" or cpu_supports_bf16() else []))
    # 2048² saturates a CPU's cores; a GPU needs a larger product to reach its peak.
    n = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {p: matmul_peak(dtypes[p], n, args.matmul_reps, device) for p in precisions}
    report = {"machine": machine(device), "matmul_peak": peaks, "presets": {}}
    for preset in args.presets.split(","):
        batch = args.batch or DEFAULT_BATCH.get(preset, 16)
        key = preset + (f"-dense{args.dense_out_dim}" if args.dense_out_dim else "")
        report["presets"][key] = run_preset(preset, batch, args.steps, args.warmup, precisions, peaks, device,
                                             args.dense_out_dim, args.compile, args.compare_local_targets)
        print(f"{preset}: done", flush=True)
    report["peak_rss_mib"] = peak_rss_mib()
    if device.type == "cuda":
        report["cuda_max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    m = report["machine"]
    peak_text = ", ".join(f"{p} {v['median_flops'] / 1e9:.0f} GFLOP/s (n={v['n']})" for p, v in peaks.items())
    print(f"\ndevice {m['device']} ({m['processor']}), {m['torch_threads']} threads, load {m['load_average_1min']}; "
          f"matmul peak {peak_text}")
    print("\n| preset | batch | precision | full step s | images/s | model-only s | images/s | overhead (full/model) "
          "| model GFLOP/step | achieved GFLOP/s | % of matmul peak |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for preset, r in report["presets"].items():
        nan = float("nan")
        gflop = r["flops_per_step"]["model"] / 1e9 if r["flops_per_step"] else nan
        for a in r["arms"]:
            if "error" in a:
                print(f"| {preset} | {r['batch']} | {a['precision']} | fails: {a['error'][:90]} | | | | | | | |")
                continue
            syncs = f" ({a['host_syncs_per_step']:.0f} host syncs/step)" if "host_syncs_per_step" in a else ""
            print(f"| {preset} | {r['batch']} | {a['precision']}{syncs} | {a['full_step_s']:.3f} | "
                  f"{a['images_per_s']:.1f} | {a['model_s']:.3f} | {a['model_images_per_s']:.1f} | {a['overhead']:.2f}× | "
                  f"{gflop:.2f} | {a.get('achieved_flops', nan) / 1e9:.1f} | {100 * a.get('achieved_over_peak', nan):.1f} % |")
    print("\n| preset | backbone | global head | dense head | parts / model | executed FLOPs of the full step / model |"
          "\n|---|---|---|---|---|---|")
    for preset, r in report["presets"].items():
        if not r["flops_per_step"]:
            continue
        s = r["flop_share"]
        dense = f"{100 * s['dense_head']:.1f} % (out_dim {r['dense_out_dim']})" if "dense_head" in s else "—"
        print(f"| {preset} | {100 * s['backbone']:.1f} % | {100 * s['head']:.1f} % (out_dim {r['head_out_dim']}) | "
              f"{dense} | {r['parts_sum_over_model']:.3f} | {s['full_step_executed']:.2f}× |")
    print(f"\npeak RSS {report['peak_rss_mib']:.0f} MiB")
    write_report(args.out, report)


if __name__ == "__main__":
    main()
