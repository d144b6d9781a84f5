"""Local (dense) self-distillation loss of GLSD, and EsViT's similarity matching (docs/algorithms.md §2–3).

For every pair (teacher global view t, student view s != t) and every student patch token i with
match j(i) in view t (see :mod:`glsd_cli.geometry` or :func:`match_similarity`):

    P   = softmax((teacher_last(z_t[j(i)]) - c_d) / tau_t)        # teacher target, no gradient
    CE  = -sum_k P_k * log_softmax(student_last(z_s[i]) / tau_s)_k
    L   = mean over pairs of  mean over batch of  mean over ALL Ns tokens of  (mask * CE)

(masked tokens count as zero; the mean is not renormalised by the number of valid tokens).

Cost. The pairs of one student view s share its B x N_s tokens, so they merge exactly:
    sum_t w_t (logsumexp(x) - P_t . x) = (sum_t w_t) logsumexp(x) - (sum_t w_t P_t) . x
with x the student's logits and w_t the pair's mask and weight. Each student token then goes through
the K-wide prototype layer, log-softmax and backward once (not once per teacher view), and each teacher
token through its prototype layer and softmax once; the teachers' probabilities are gathered in K space.
With ViT-S/16's 2 global (196 tokens) and 8 local views (36 tokens) that is 680 student and 392 teacher
token passes per image instead of 968 and 968.

Memory. The dense head's last layer maps the ~256-d bottleneck to K = out_dim logits (65536 in
DINO); B x tokens x K logits would not fit. So the loss takes bottleneck features and the two last
layers, and works in chunks of whole images of about ``chunk_tokens`` student tokens (at least one
image). A chunk whose float32 logits exceed ``recompute_above_mib`` runs under
``torch.utils.checkpoint`` so backward recomputes its logits and targets instead of storing them;
smaller chunks keep one (tokens x K) buffer, the logits' gradient. Peak extra memory is a few chunk-
sized buffers, independent of batch size; the price of recomputing is one extra prototype-layer
forward per token (student and teacher) during backward.
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

# Default chunk size, in MiB of one float32 (tokens x K) buffer. The K-wide passes are bound by memory
# traffic, and glibc's malloc serves blocks up to 32 MiB from its reusable heap once warm while larger
# ones are fresh mmaps, page-faulted on every use: ViT-S/16's local loss at K = 8192, batch 8, took
# 0.95 / 1.07 / 1.22 s (fp32) and 0.52 / 0.54 / 0.76 s (bf16) with 21 / 42 / 170 MiB chunks
# (bench/local_loss_chunks.py, 2026-11-22), before counting that chunks above
# recompute_above_mib (32) are also recomputed in backward.
AUTO_CHUNK_MIB = 16


@torch.no_grad()
def match_similarity(student_tokens: Tensor, teacher_tokens: Tensor) -> Tensor:
    """EsViT region matching (docs/algorithms.md §2): for each student token, the teacher token of
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


def _scaled_logits(layer: nn.Module, scale: float) -> Callable[[Tensor], Tensor]:
    """``x -> layer(x) * scale``. For a plain bias-free linear layer (DINO's prototypes) the scale is
    applied to the d-dim input instead of the K-wide output: the same logits, one K-wide pass fewer."""
    if _is_plain_linear_without_bias(layer):
        return lambda x: layer(x * scale)
    return lambda x: layer(x) * scale


class _SoftTargetCrossEntropy(torch.autograd.Function):
    """``sum_i (W_i * logsumexp(x_i) - t_i . x_i)`` for logits ``x`` (N, K) of any float dtype, soft
    float32 targets ``t`` (N, K) with row sums ``W`` (N,); no gradient to ``t`` or ``W``.

    Autograd of the plain expression keeps ``x`` and ``t`` and runs about a dozen K-wide passes; here
    forward runs one fused softmax, two row maxima and a dot product, and leaves the one buffer
    backward needs, t - W softmax(x) (= -d/dx), built in place over ``t`` (which it consumes).
    ``logsumexp(x) = max(x) - log(max softmax(x))``: exact, and safe since max softmax >= 1/K."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        with torch.autocast(logits.device.type, enabled=False):  # everything K-wide in float32
            x = logits.float()
            probs = torch.softmax(x, dim=-1)
            lse = x.amax(dim=-1) - probs.amax(dim=-1).log()
            total = torch.dot(weight, lse) - torch.dot(target.reshape(-1), x.reshape(-1))
            del x
            neg_grad = target.addcmul_(probs, weight[:, None], value=-1.0)
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(neg_grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (neg_grad,) = ctx.saved_tensors
        return neg_grad.to(ctx.logits_dtype) * -grad_output, None, None


class LocalDistillationLoss(nn.Module):
    """GLSD local term with its own centre ``c_d`` (docs/algorithms.md §3), chunked and checkpointed."""

    center: Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 chunk_tokens: int | None = None, recompute_above_mib: float = 32.0) -> None:
        super().__init__()
        if out_dim < 1 or (chunk_tokens is not None and chunk_tokens < 1):
            raise ValueError(f"out_dim and chunk_tokens must be >= 1, got {out_dim}, {chunk_tokens}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        # None: as many tokens as keep a chunk's float32 (tokens x K) buffers at AUTO_CHUNK_MIB.
        self.chunk_tokens = chunk_tokens or max(1, AUTO_CHUNK_MIB * 2**20 // (4 * out_dim))
        # Small chunks keep their logits' gradient for backward: recomputing costs a second
        # prototype-layer pass (student and teacher) for memory that does not matter (bench/step_bound.py).
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
        The caller chooses the pairs (docs/algorithms.md §2: every global t and every s != t).

        The pairs of one student view share its tokens, so they are merged exactly (see the module
        docstring): each student token goes through the prototype layer and the log-softmax once, each
        teacher token through its prototype layer and softmax once, whatever the number of pairs.
        """
        if not matches:
            raise ValueError("matches is empty: the local loss needs at least one (teacher, student) pair")
        batch = student_z[0].shape[0]
        by_student: dict[int, list[tuple[int, Tensor, Tensor]]] = {}
        fractions: list[Tensor] = []
        for (t, s), (index, valid) in matches.items():
            sz, tz = student_z[s], teacher_z[t]
            n_s, dim = sz.shape[1], sz.shape[2]
            if sz.shape[0] != batch or index.shape != (batch, n_s) or (valid is not None and valid.shape != (batch, n_s)):
                raise ValueError(f"pair {(t, s)}: index/valid must be (B, N_s) = {(batch, n_s)}, got "
                                 f"{tuple(index.shape)} / {None if valid is None else tuple(valid.shape)}")
            if tz.shape[0] != batch or tz.shape[-1] != dim:
                raise ValueError(f"pair {(t, s)}: teacher_z {tuple(tz.shape)} does not fit student_z {tuple(sz.shape)}")
            # Token weight of this pair in the loss: mean over pairs, images and all N_s tokens.
            scale = 1.0 / (len(matches) * batch * n_s)
            weight = (torch.full((batch, n_s), scale, device=sz.device) if valid is None
                      else valid.to(device=sz.device, dtype=torch.float32) * scale)
            by_student.setdefault(s, []).append((t, index.to(sz.device, torch.long), weight))
            fractions.append(sz.new_ones((), dtype=torch.float32) if valid is None
                             else valid.float().mean().to(sz.device))
        # Snapshot of the centre: checkpoint recomputes teacher targets during backward, and they must
        # use the centre of this forward even if update_center() runs before backward (DINO does so).
        center = self.center.detach().clone()
        views = sorted(by_student)
        teachers = sorted({t for pairs in by_student.values() for t, _, _ in pairs})
        tokens_per_image = sum(student_z[s].shape[1] for s in views)
        images_per_chunk = max(1, self.chunk_tokens // tokens_per_image)  # whole images, at least one
        chunk_fn = self._chunk_fn(views, teachers, by_student, student_z, teacher_z, student_last,
                                  teacher_last, center, teacher_temp)
        total = student_z[0].new_zeros((), dtype=torch.float32)
        for start in range(0, batch, images_per_chunk):
            images = slice(start, start + images_per_chunk)
            sz = torch.cat([student_z[s][images].reshape(-1, student_z[s].shape[-1]) for s in views])
            tz = torch.cat([teacher_z[t][images].detach().reshape(-1, teacher_z[t].shape[-1]) for t in teachers])
            flat = [x[images] for s in views for _, index, weight in by_student[s] for x in (index, weight)]
            logits_bytes = 4 * self.out_dim * sz.shape[0]  # float32
            if torch.is_grad_enabled() and logits_bytes > self.recompute_above_bytes:
                # Non-reentrant: works when sz does not require grad, and with parameters that are
                # not explicit inputs (the last layers are captured by the closure).
                total = total + checkpoint(chunk_fn, sz, tz, *flat, use_reentrant=False)
            else:
                total = total + chunk_fn(sz, tz, *flat)
        stats = {"local_valid_fraction": float(torch.stack(fractions).mean().item())}  # one host sync
        return total, stats

    def _chunk_fn(self, views: list[int], teachers: list[int], by_student: dict, student_z: list[Tensor],
                  teacher_z: list[Tensor], student_last: nn.Module, teacher_last: nn.Module, center: Tensor,
                  teacher_temp: float) -> Callable[..., Tensor]:
        """The loss of a run of whole images: ``sz`` = their student tokens view after view (``views``
        order), ``tz`` = their teacher tokens view after view (``teachers`` order), then (index, weight)
        per pair in ``by_student`` order, each (b, N_s)."""
        n_student = [student_z[s].shape[1] for s in views]
        n_teacher = {t: teacher_z[t].shape[1] for t in teachers}
        student_logits = _scaled_logits(student_last, 1.0 / self.student_temp)
        teacher_logits = _scaled_logits(teacher_last, 1.0 / teacher_temp)
        shifted_center = center / teacher_temp

        def chunk(sz: Tensor, tz: Tensor, *flat: Tensor) -> Tensor:
            images = flat[0].shape[0]
            with torch.no_grad():
                # Teacher targets (DINO centring + sharpening) once per teacher token; float32 softmax.
                probs = torch.softmax(teacher_logits(tz).float().sub_(shifted_center), dim=-1)
                teacher_offset, offset = {}, 0
                for t in teachers:
                    teacher_offset[t], offset = offset, offset + images * n_teacher[t]
                # Each student token's target: sum over its pairs of weight * teacher probabilities.
                target = probs.new_empty(sz.shape[0], probs.shape[-1])
                weight = probs.new_zeros(sz.shape[0])
                pairs = iter(zip(flat[0::2], flat[1::2]))
                row = 0
                for s, n_s in zip(views, n_student):
                    rows = slice(row, row + images * n_s)
                    for k, (t, _, _) in enumerate(by_student[s]):
                        index, w = next(pairs)
                        image_base = torch.arange(images, device=index.device)[:, None] * n_teacher[t]
                        flat_index = (teacher_offset[t] + image_base + index).reshape(-1)  # rows of tz
                        w = w.reshape(-1, 1)
                        if k == 0:
                            torch.index_select(probs, 0, flat_index, out=target[rows]).mul_(w)
                        else:
                            target[rows].addcmul_(probs.index_select(0, flat_index), w)
                        weight[rows] += w[:, 0]
                    row = rows.stop
                del probs
            return _SoftTargetCrossEntropy.apply(student_logits(sz), target, weight)

        return chunk

    @torch.no_grad()
    def update_center(self, teacher_z: list[Tensor], teacher_last: nn.Module) -> None:
        """``c_d <- m c_d + (1 - m) mean of teacher logits`` over every token of every global view and
        image, all-reduced across processes (docs/algorithms.md §3; DINO's centre, applied per token)."""
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
