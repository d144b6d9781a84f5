"""Thin helpers over torch.distributed that degrade to no-ops in a single process.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; the backend is chosen from the device
(NCCL for CUDA, gloo for CPU), so no code path needs CUDA.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_from_env(device: torch.device) -> None:
    """Initialise the process group when started by torchrun; otherwise do nothing."""
    if not launched_by_torchrun() or is_distributed():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    """NCCL moves only CUDA tensors; gloo only CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


@torch.no_grad()
def all_reduce_sum_cpu(x: torch.Tensor) -> torch.Tensor:
    """Sum of a small CPU tensor over processes, returned on the CPU whatever the backend."""
    if not is_distributed():
        return x
    y = x.to(_comm_device())
    dist.all_reduce(y)
    return y.cpu()


@torch.no_grad()
def gather_cpu_tensors(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of `x` (same shape and dtype everywhere), as CPU tensors in rank order."""
    if not is_distributed():
        return [x]
    y = x.to(_comm_device())
    out = [torch.empty_like(y) for _ in range(world_size())]
    dist.all_gather(out, y)
    return [o.cpu() for o in out]


@torch.no_grad()
def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (what DDP does at construction), so that
    no initialisation difference between processes can survive into training."""
    if not is_distributed():
        return
    device = _comm_device()
    for t in list(module.parameters()) + list(module.buffers()):
        y = t.data.to(device)
        dist.broadcast(y, src=0)
        t.data.copy_(y)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over processes (returns a new tensor; `x` is left untouched)."""
    if not is_distributed():
        return x
    y = x.clone()
    dist.all_reduce(y)
    return y / world_size()


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return x
    y = x.clone()
    dist.all_reduce(y)
    return y


@torch.no_grad()
def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return x
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return y


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (same shape on every rank) along dim 0, in rank order, without gradient."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the gradient of its own slice (summed over ranks)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // world_size()
        return grad[rank() * n : (rank() + 1) * n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` over ranks; gradient flows back to this rank's slice."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average gradients over processes in one flat all-reduce (what DDP does, without its wrapper).

    Done by hand because a Method calls its student's sub-modules several times per step (one
    forward per resolution), which DDP's hooks do not like; the result is the same.
    """
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n
