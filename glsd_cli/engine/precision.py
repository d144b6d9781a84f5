"""Device and precision choice: `run.device` and `run.precision = auto | fp32 | bf16 | fp16`.

auto → bf16 autocast where the hardware computes in bf16 natively (CPUs with AMX or AVX512-BF16,
CUDA GPUs from Ampere on), fp16 autocast with a gradient scaler on older CUDA GPUs, fp32 elsewhere
(bf16 emulated on a CPU without those instructions is slower than fp32).
"""
from __future__ import annotations

import torch

from glsd_cli.errors import GlsdError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GlsdError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions: AMX tiles or AVX512-BF16."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None and fn():
            return True
    return False


def cuda_supports_bf16() -> bool:
    """Native bf16 (Ampere and newer); older GPUs only emulate it, slower than fp16."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3 had no emulation and no such argument
        return torch.cuda.is_bf16_supported()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`; None means plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise GlsdError("precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if cuda_supports_bf16() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def describe(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
