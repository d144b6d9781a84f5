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


def grad_norms(params: list[nn.Parameter]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The gradients present and their L2 norms (one fused kernel)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return [], torch.zeros(0)
    return grads, torch.stack(torch._foreach_norm(grads))


def clip_per_parameter(params: list[nn.Parameter], clip: float) -> float:
    """DINO's `clip_gradients`: each parameter's gradient norm is clipped separately. Returns the mean norm."""
    return clip_gradients(*grad_norms(params), clip)


def clip_gradients(grads: list[torch.Tensor], norms: torch.Tensor, clip: float) -> float:
    """Scale each gradient to norm <= clip, given the norms from `grad_norms`; returns their mean."""
    if not grads:
        return 0.0
    coefs = torch.clamp(clip / (norms + 1e-6), max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind()))
    return float(norms.mean())
