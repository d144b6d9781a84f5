"""Optimiser helpers: DINO's parameter groups and per-parameter gradient clipping."""
from __future__ import annotations

import torch
from torch import nn


def param_groups(module: nn.Module) -> list[dict]:
    """Weight decay on weights only: none on biases and 1-D parameters (norms, tokens) — DINO."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0,
                                                   "fixed_weight_decay": True}]


def adamw(groups: list[dict], **kwargs) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel: one kernel per step for all parameters, and its step counters
    stay on the parameters' device, where the default implementation reads them on the host for
    every parameter (a wait for a GPU). The same update rule; lr set by the schedules."""
    return torch.optim.AdamW(groups, lr=0.0, fused=True, **kwargs)


def grad_norms(params: list[nn.Parameter], device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The gradients present and their L2 norms (one fused kernel), on the device."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return [], torch.zeros(0, device=device)
    return grads, torch.stack(torch._foreach_norm(grads))


def clip_gradients(grads: list[torch.Tensor], norms: torch.Tensor, clip: float) -> torch.Tensor:
    """DINO's `clip_gradients`: scale each gradient to norm <= clip, given the norms from `grad_norms`;
    returns their mean (a 0-d device tensor: nothing waits for the device here)."""
    if not grads:
        return norms.new_zeros(())
    coefs = torch.clamp(clip / (norms + 1e-6), max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind()))
    return norms.mean()
