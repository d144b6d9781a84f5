"""safetensors checkpoints: no pickle anywhere, atomic writes, strict loads that name bad keys.

Layout of a training checkpoint:
    tensors   model/<key>            the task's state_dict (student, teacher, heads, centres)
              optim/<param>/<name>   optimiser state per parameter index
              rng/<name>             RNG states (torch CPU, CUDA) of rank 0; rng/rankR/<name> of rank R
    metadata  format = glsd-checkpoint-v1, kind = pretrain|linear|finetune|export-*, config (JSON),
              position (JSON: epoch, step in epoch, global step, skipped steps, the epoch's running
              metric sums), optim_groups (JSON hyper-parameters), grad_scaler (JSON, fp16 only)
A checkpoint alone rebuilds its model: the resolved config travels in its metadata.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from glsd_cli.engine import distributed as dist
from glsd_cli.errors import CheckpointError

FORMAT = "glsd-checkpoint-v1"
CHECKPOINT_NAME = "last.safetensors"


TMP_MARKER = ".tmp-"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename: readers never see half a file.

    If anything fails before the rename, the temporary file is removed and the previous file at
    `path` is untouched; a writer killed outright leaves only a hidden `.NAME.tmp-PID` behind,
    which `remove_stale_temporaries` clears on the next resume.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # persist the rename itself
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete half-written `.NAME.tmp-PID` files that a killed writer left next to `path`."""
    path = Path(path)
    stale = [p for p in path.parent.glob(f".{path.name}{TMP_MARKER}*") if p != _tmp_name(path)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # safetensors refuses tensors that share storage; copy the rare ones that do.
    seen: set[int] = set()
    for k, v in flat.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen:
            flat[k] = v.clone()
        seen.add(ptr)
    atomic_write_bytes(path, safetensors_bytes(flat, metadata={"format": FORMAT, **metadata}))


def _looks_like_pickle(path: Path) -> bool:
    """A pickle (protocol byte 0x80) or torch.save zip ("PK") that is not a safetensors file.

    A safetensors file starts with its header length (u64, little-endian) and then the JSON header
    '{': its first byte is the low byte of that length and can itself be 0x80 (a header of 33408
    bytes does it), so that layout is ruled out before the pickle signatures are looked at.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return False
    return head[:1] == b"\x80" or head[:2] == b"PK"


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A run directory → its last checkpoint; a file → itself. Clear errors otherwise."""
    p = Path(path)
    if p.is_dir():
        candidate = p / CHECKPOINT_NAME
        if not candidate.is_file():
            raise CheckpointError(f"{p} is a folder without {CHECKPOINT_NAME}: is it a glsd run directory?")
        return candidate
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a glsd safetensors file; never unpickles anything."""
    p = resolve_checkpoint_path(path)
    if _looks_like_pickle(p):
        raise CheckpointError(
            f"{p} is a pickle/torch.save file; glsd reads only safetensors and never unpickles (it could run code)")
    try:
        with safe_open(str(p), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{p} is truncated or corrupt and cannot be read ({str(e).splitlines()[0]})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{p} is a safetensors file but not a glsd checkpoint (no '{FORMAT}' metadata)")
    return tensors, metadata


def sub_dict(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True), with an error that names the mismatched keys and shapes."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if wrong:
            parts.append("shape mismatch " + _few([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong]))
        raise CheckpointError(f"{what} does not fit this model: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def _few(items: list[str], n: int = 4) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# ------------------------------------------------------------------ optimiser and RNG state


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim/{pid}/{name}"] = val
            else:
                scalars.setdefault(str(pid), {})[name] = val
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, json.dumps({"groups": groups, "scalars": scalars})


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups_json: str) -> None:
    meta = json.loads(groups_json)
    state: dict[int, dict[str, Any]] = {}
    for key, val in sub_dict(tensors, "optim/").items():
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = val
    for pid, vals in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(vals)
    try:
        opt.load_state_dict({"state": state, "param_groups": meta["groups"]})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimiser state does not fit this model: {e}") from None


def rng_tensors() -> dict[str, torch.Tensor]:
    """RNG states of every process: `rng/torch` (and `rng/cudaI`) for rank 0 or a single process,
    `rng/rankR/torch` (and `rng/rankR/cuda`) for the other ranks. Collective under torchrun."""
    states = dist.gather_cpu_tensors(torch.get_rng_state())
    out = {"rng/torch": states[0]}
    out.update({f"rng/rank{r}/torch": s for r, s in enumerate(states[1:], 1)})
    if torch.cuda.is_available():
        if dist.is_distributed():  # each process drives one device: its current one
            cuda = dist.gather_cpu_tensors(torch.cuda.get_rng_state())
            out.update({("rng/cuda" if r == 0 else f"rng/rank{r}/cuda"): s for r, s in enumerate(cuda)})
        else:
            out.update({f"rng/cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Restore this process's RNG states. A rank the checkpoint has no state for (the run was
    started with fewer processes) keeps its freshly seeded generator."""
    r = dist.rank()
    prefix = "rng/" if r == 0 else f"rng/rank{r}/"
    if prefix + "torch" in tensors:
        torch.set_rng_state(tensors[prefix + "torch"].to("cpu", torch.uint8))
    if not torch.cuda.is_available():
        return
    if dist.is_distributed():
        if prefix + "cuda" in tensors:
            torch.cuda.set_rng_state(tensors[prefix + "cuda"].to("cpu", torch.uint8))
        return
    states = [tensors[f"rng/cuda{i}"] for i in range(torch.cuda.device_count()) if f"rng/cuda{i}" in tensors]
    if states:
        torch.cuda.set_rng_state_all([s.to("cpu", torch.uint8) for s in states])
