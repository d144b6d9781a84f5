"""Local (dense) self-distillation loss of GLSD, and EsViT's similarity matching (ALGORITHMS.md §2–3).

For every pair (teacher global view t, student view s != t) and every student patch token i with
match j(i) in view t (see :mod:`glsd_cli.geometry` or :func:`match_similarity`):

    P   = softmax((teacher_last(z_t[j(i)]) - c_d) / tau_t)        # teacher target, no gradient
    CE  = -sum_k P_k * log_softmax(student_last(z_s[i]) / tau_s)_k
    L   = mean over pairs of  mean over batch of  mean over ALL Ns tokens of  (mask * CE)

(masked tokens count as zero; the mean is not renormalised by the number of valid tokens).

Memory. The dense head's last layer maps the ~256-d bottleneck to K = out_dim logits (65536 in
DINO); B x tokens x K logits would not fit. So the loss takes bottleneck features and the two last
layers, and works in chunks of ``chunk_tokens`` tokens: teacher bottlenecks are gathered by match
index first (cheap, d-dim), then pushed through the teacher last layer per chunk under no_grad, and
each student chunk whose float32 logits exceed ``recompute_above_mib`` runs under
``torch.utils.checkpoint`` so backward recomputes its logits instead of storing them. Peak extra
memory is then a few (chunk x K) float32 buffers, independent of batch size; the price is one extra
last-layer forward per token (student and teacher) during backward. Smaller chunks keep theirs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from glsd_cli.engine.distributed import all_reduce_mean

__all__ = ["match_similarity", "LocalDistillationLoss"]

Matches = dict[tuple[int, int], tuple[Tensor, "Tensor | None"]]


@torch.no_grad()
def match_similarity(student_tokens: Tensor, teacher_tokens: Tensor) -> Tensor:
    """EsViT region matching (ALGORITHMS.md §2): for each student token, the teacher token of
    highest cosine similarity between L2-normalised backbone output tokens. No hinge.

    ``(B, Ns, D)``, ``(B, Nt, D)`` -> long ``(B, Ns)``; ties go to the lower teacher index
    (``argmax`` returns the first maximum).
    """
    if student_tokens.ndim != 3 or teacher_tokens.ndim != 3 or student_tokens.shape[0] != teacher_tokens.shape[0] \
            or student_tokens.shape[-1] != teacher_tokens.shape[-1]:
        raise ValueError(f"expected (B, Ns, D) and (B, Nt, D), got {tuple(student_tokens.shape)} and "
                         f"{tuple(teacher_tokens.shape)}")
    # float32: the argmax should not depend on bf16 rounding of the similarities.
    s = F.normalize(student_tokens.float(), dim=-1)
    t = F.normalize(teacher_tokens.float(), dim=-1)
    return torch.bmm(s, t.transpose(1, 2)).argmax(dim=-1)


def _is_plain_linear_without_bias(module: nn.Module) -> bool:
    """True when ``module(x) = x @ W.T`` exactly: an nn.Linear (weight-normalised or not) whose
    forward is Linear's own and that has no bias."""
    return (
        isinstance(module, nn.Linear)
        and module.bias is None
        and type(module).forward is nn.Linear.forward  # parametrized subclasses keep Linear.forward
    )


class LocalDistillationLoss(nn.Module):
    """GLSD local term with its own centre ``c_d`` (ALGORITHMS.md §3), chunked and checkpointed."""

    center: Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 chunk_tokens: int = 8192, recompute_above_mib: float = 32.0) -> None:
        super().__init__()
        if out_dim < 1 or chunk_tokens < 1:
            raise ValueError(f"out_dim and chunk_tokens must be >= 1, got {out_dim}, {chunk_tokens}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.chunk_tokens = chunk_tokens
        # Small chunks keep their logits for backward: recomputing them costs a second prototype-layer
        # pass (student and teacher) for memory that does not matter (bench/step_bound.py).
        self.recompute_above_bytes = recompute_above_mib * 2**20
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self,
        student_z: list[Tensor],
        teacher_z: list[Tensor],
        student_last: nn.Module,
        teacher_last: nn.Module,
        matches: Matches,
        teacher_temp: float,
    ) -> tuple[Tensor, dict[str, float]]:
        """Mean local cross-entropy over the pairs in ``matches`` and ``{"local_valid_fraction"}``.

        ``student_z[v]``: (B, N_v, d) student bottleneck of view v; ``teacher_z[t]``: (B, N_t, d)
        teacher bottleneck of global view t (no gradient flows into it);
        ``matches[(t, s)] = (index (B, N_s) into view t's tokens, valid mask (B, N_s) or None)``.
        The caller chooses the pairs (ALGORITHMS.md: every global t and every s != t).
        """
        if not matches:
            raise ValueError("matches is empty: the local loss needs at least one (teacher, student) pair")
        # Snapshot of the centre: checkpoint recomputes teacher targets during backward, and they must
        # use the centre of this forward even if update_center() runs before backward (DINO does so).
        center = self.center.detach().clone()
        total: Tensor | None = None
        fractions: list[Tensor] = []
        for (t, s), (index, valid) in matches.items():
            sz, tz = student_z[s], teacher_z[t].detach()
            batch, n_s, dim = sz.shape
            if index.shape != (batch, n_s) or (valid is not None and valid.shape != (batch, n_s)):
                raise ValueError(f"pair {(t, s)}: index/valid must be (B, N_s) = {(batch, n_s)}, got "
                                 f"{tuple(index.shape)} / {None if valid is None else tuple(valid.shape)}")
            if tz.shape[0] != batch or tz.shape[-1] != dim:
                raise ValueError(f"pair {(t, s)}: teacher_z {tuple(tz.shape)} does not fit student_z {tuple(sz.shape)}")
            # Gather in bottleneck space (d ~ 256) before the K-wide last layer: cost O(B*Ns*d).
            target = torch.gather(tz, 1, index.to(tz.device, torch.long)[..., None].expand(-1, -1, dim))
            weight = None if valid is None else valid.reshape(-1).to(device=sz.device, dtype=torch.float32)
            pair_sum = self._masked_ce_sum(sz.reshape(-1, dim), target.reshape(-1, dim), weight,
                                           student_last, teacher_last, center, teacher_temp)
            # Equal N_s for every image, so mean over tokens then over batch = sum / (B * N_s).
            pair_loss = pair_sum / (batch * n_s)
            total = pair_loss if total is None else total + pair_loss
            fractions.append(sz.new_ones((), dtype=torch.float32) if weight is None else weight.mean())
        assert total is not None
        loss = total / len(matches)
        stats = {"local_valid_fraction": float(torch.stack(fractions).mean().item())}  # one host sync
        return loss, stats

    def _masked_ce_sum(self, sz: Tensor, tz: Tensor, weight: Tensor | None, student_last: nn.Module,
                       teacher_last: nn.Module, center: Tensor, teacher_temp: float) -> Tensor:
        """Sum over tokens of ``weight * CE`` for flat (N, d) student / gathered teacher bottlenecks."""
        chunk_fn = self._chunk_fn(student_last, teacher_last, center, teacher_temp)
        total = sz.new_zeros((), dtype=torch.float32)
        for start in range(0, sz.shape[0], self.chunk_tokens):
            sl = slice(start, start + self.chunk_tokens)
            w = None if weight is None else weight[sl]
            logits_bytes = 4 * self.out_dim * min(self.chunk_tokens, sz.shape[0] - start)  # float32
            if torch.is_grad_enabled() and logits_bytes > self.recompute_above_bytes:
                # Non-reentrant: works when sz does not require grad, and with parameters that are
                # not explicit inputs (the last layers are captured by the closure).
                part = checkpoint(chunk_fn, sz[sl], tz[sl], w, use_reentrant=False)
            else:
                part = chunk_fn(sz[sl], tz[sl], w)
            total = total + part
        return total

    def _chunk_fn(self, student_last: nn.Module, teacher_last: nn.Module, center: Tensor,
                  teacher_temp: float) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
        student_temp = self.student_temp

        def chunk(sz: Tensor, tz: Tensor, weight: Tensor | None) -> Tensor:
            # Teacher target (DINO centring + sharpening), float32 for a stable softmax under autocast.
            with torch.no_grad():
                p = torch.softmax((teacher_last(tz).float() - center) / teacher_temp, dim=-1)
            x = student_last(sz).float() / student_temp
            # -sum_k p_k log_softmax(x)_k = logsumexp(x) - sum_k p_k x_k   (sum_k p_k = 1). Written this
            # way autograd keeps only x and p for this chunk, not a third (chunk, K) log-softmax
            # buffer; (p * x).sum rather than bmm so autocast cannot drop it to bf16.
            ce = torch.logsumexp(x, dim=-1) - (p * x).sum(dim=-1)
            if weight is not None:
                ce = ce * weight
            return ce.sum()

        return chunk

    @torch.no_grad()
    def update_center(self, teacher_z: list[Tensor], teacher_last: nn.Module) -> None:
        """``c_d <- m c_d + (1 - m) mean of teacher logits`` over every token of every global view and
        image, all-reduced across processes (ALGORITHMS.md §3; DINO's centre, applied per token)."""
        if not teacher_z:
            raise ValueError("teacher_z is empty")
        # Teacher tokens may be bf16 (made under autocast) while this runs outside autocast with the
        # layer's own (fp32) weights: feed the layer its parameters' dtype.
        dtype = next(teacher_last.parameters()).dtype
        flat = [z.detach().reshape(-1, z.shape[-1]).to(dtype) for z in teacher_z]
        count = sum(z.shape[0] for z in flat)
        if _is_plain_linear_without_bias(teacher_last):
            # Linear, no bias: mean_i(W z_i) = W mean_i(z_i) exactly (up to float rounding), so one
            # d-dim mean replaces count x K logits.
            z_mean = torch.stack([z.float().sum(0) for z in flat]).sum(0) / count
            mean = teacher_last(z_mean[None].to(dtype)).float()[0]
        else:
            # General module (bias, non-linear, custom forward): sum logits chunk by chunk.
            mean = self.center.new_zeros(self.out_dim)
            for z in flat:
                for start in range(0, z.shape[0], self.chunk_tokens):
                    mean += teacher_last(z[start:start + self.chunk_tokens]).float().sum(0)
            mean /= count
        mean = all_reduce_mean(mean)
        self.center.mul_(self.center_momentum).add_(mean[None].to(self.center.dtype),
                                                    alpha=1.0 - self.center_momentum)
