"""Local (dense) self-distillation loss of GLSD (docs/algorithms.md §3).

For every pair (teacher global view t, student view s != t) and every student patch token i with
match j(i) in view t (glsd_cli/matching.py: geometric or similarity):

    P   = softmax((teacher_last(z_t[j(i)]) - c_d) / tau_t)        # teacher target, no gradient
    CE  = -sum_k P_k * log_softmax(student_last(z_s[i]) / tau_s)_k
    L   = mean over pairs of  mean over batch of  mean over ALL Ns tokens of  (mask * CE)

(masked tokens count as zero; the mean is not renormalised by the number of valid tokens).

Cost. The pairs of one student token share its logits x, so they merge exactly:
    sum_t w_t (logsumexp(x) - P_t . x) = (sum_t w_t) logsumexp(x) - (sum_t w_t P_t) . x
with w_t the pair's mask and weight. Each student token goes through the K-wide prototype layer,
log-softmax and backward once, each teacher token through its prototype layer and softmax once. On the
CPU every student token's target sum_t w_t P_t is gathered in one indexed pass over the teacher
probabilities (`gather_targets`; no loop over pairs, views or images); on an accelerator the targets
go through the prototypes in d dimensions instead (`_PrototypeSoftTargetCrossEntropy`: no (tokens x K)
target table, two extra (M x K) x (K x d) products). With ViT-S/16's 2 global (196 tokens) and 8
local views (36 tokens) that is 680 student and 392 teacher token passes per image instead of 968
and 968.

Precision. Under autocast the K-wide buffers stay in the autocast dtype (half the memory traffic of
float32); softmax accumulates in float32 inside its kernel, and the log-sum-exp and the dot products
that make the loss value are accumulated in float32 (tests: within tolerance of the float32 loss).

Targets. `centering="ema"` (GLSD): P as above, with the dense head's own EMA centre c_d.
`centering="sinkhorn"` (DINOv2's iBOT head, Oquab et al. 2023): P = Sinkhorn-Knopp of the teacher
logits over every teacher token of the batch (all processes), so that every prototype gets the same
mass; there is no centre to lag behind the head, which an EMA centre did over longer runs (README
"Longer runs"). It needs the whole batch's teacher table at once (B x T*Nt x K float32).

Memory. The dense head's last layer maps the ~256-d bottleneck to K = out_dim logits (8192-65536); B x
tokens x K logits may not fit. So the loss takes bottleneck features and the two last layers, and works
in chunks of whole images, planned from the device's memory (`plan_chunks`): on the CPU small chunks
(16 MiB, measured), on an accelerator as many images per chunk as a quarter of its free memory holds,
usually the whole batch. A chunk either keeps its buffers for backward (the logits' gradient, or the
weighted softmax and the teacher targets on the way through the prototypes), or runs under
`torch.utils.checkpoint` and recomputes its logits in backward when keeping the buffers of every chunk
would not fit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from glsd_cli.engine.distributed import all_reduce_mean
from glsd_cli.engine.monitors import DENSE, CollapseTally
from glsd_cli.losses.dino import sinkhorn_knopp
from glsd_cli.matching import TokenMatches

__all__ = ["ChunkPlan", "LocalDistillationLoss", "plan_chunks"]

# CPU chunk size, in MiB of one float32 (tokens x K) buffer. The K-wide passes are bound by memory
# traffic, and glibc's malloc serves blocks up to 32 MiB from its reusable heap once warm while larger
# ones are fresh mmaps, page-faulted on every use: ViT-S/16's local loss at K = 8192, batch 8, took
# 0.95 / 1.07 / 1.22 s (fp32) and 0.52 / 0.54 / 0.76 s (bf16) with 21 / 42 / 170 MiB chunks
# (bench/local_loss_chunks.py, 2026-11-22). Chunks whose float32 logits exceed CPU_RECOMPUTE_ABOVE_MIB
# are recomputed in backward.
CPU_CHUNK_MIB = 16
CPU_RECOMPUTE_ABOVE_MIB = 32.0
# On an accelerator: the share of free device memory (measured at the first step) that one chunk's
# K-wide buffers may take, and the share that the buffers kept for backward by all chunks may take.
# Backbone activations are already allocated when the loss runs; backward needs about as much again.
DEVICE_CHUNK_SHARE = 0.25
DEVICE_KEEP_SHARE = 0.25
# K-wide buffers alive at once per chunk row, in units of (rows x K) elements of the compute dtype:
# student logits, their softmax, the target and the product target * logits; teacher logits and softmax.
STUDENT_BUFFERS, TEACHER_BUFFERS = 4, 2
# Teacher tokens per step whose targets the dense head's collapse statistics are taken from (at most
# about; every stride-th token of the batch, so all images and views are in).
STATS_ROWS = 2048


@dataclass(frozen=True)
class ChunkPlan:
    images: int       # whole images per chunk
    recompute: bool   # checkpoint the chunks (recompute their logits in backward) instead of keeping them


def device_free_bytes(device: torch.device) -> int | None:
    """Memory an accelerator can still give (free on the device plus what torch's caching allocator
    holds unused); None on the CPU, which has no such budget."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def plan_chunks(batch: int, student_rows: int, teacher_rows: int, out_dim: int, elem_bytes: int,
                free_bytes: int | None, chunk_tokens: int | None = None,
                recompute_above_mib: float | None = None) -> ChunkPlan:
    """How to cut a batch of `batch` images with `student_rows` / `teacher_rows` tokens each into chunks.

    Explicit settings win: `chunk_tokens` student tokens per chunk (rounded down to whole images, at
    least one); recompute when a chunk's float32 logits exceed `recompute_above_mib`. Otherwise (None):
    without a device budget (`free_bytes` None: the CPU) 16 MiB chunks that are kept; with one, the
    largest chunk whose buffers fit DEVICE_CHUNK_SHARE of it, kept unless the buffers of the whole batch
    exceed DEVICE_KEEP_SHARE."""
    if chunk_tokens is not None:
        images = chunk_tokens // student_rows
    elif free_bytes is None:
        images = CPU_CHUNK_MIB * 2**20 // (4 * out_dim) // student_rows
    else:
        per_image = out_dim * elem_bytes * (STUDENT_BUFFERS * student_rows + TEACHER_BUFFERS * teacher_rows)
        images = int(DEVICE_CHUNK_SHARE * free_bytes) // per_image
    images = min(batch, max(1, images))
    if recompute_above_mib is not None or free_bytes is None:
        limit = CPU_RECOMPUTE_ABOVE_MIB if recompute_above_mib is None else recompute_above_mib
        recompute = 4 * out_dim * images * student_rows > limit * 2**20
    else:
        # Kept for backward on an accelerator: each chunk's weighted student softmax and its teacher
        # targets (which the targets' way through the prototypes reads again in backward).
        recompute = batch * (student_rows + teacher_rows) * out_dim * elem_bytes > DEVICE_KEEP_SHARE * free_bytes
    return ChunkPlan(images, recompute)


def _is_plain_linear_without_bias(module: nn.Module) -> bool:
    """True when ``module(x) = x @ W.T`` exactly: an nn.Linear (weight-normalised or not) whose
    forward is Linear's own and that has no bias."""
    return (
        isinstance(module, nn.Linear)
        and module.bias is None
        and type(module).forward is nn.Linear.forward  # parametrized subclasses keep Linear.forward
    )


def _logits(layer: nn.Module, scale: float, shift: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """``x -> layer(x) * scale - shift``. For a plain bias-free linear layer (DINO's prototypes) the
    scale goes onto the d-dim input and the shift into the matrix product as its bias: the same
    logits with no K-wide pass of their own."""
    if _is_plain_linear_without_bias(layer):
        bias = None if shift is None else -shift.reshape(-1)
        return lambda x: F.linear(x * scale, layer.weight, bias)
    if shift is None:
        return lambda x: layer(x) * scale
    return lambda x: layer(x) * scale - shift


def _softmax_in_dtype(logits: Tensor) -> Tensor:
    """softmax in the logits' dtype (float32 accumulation inside the kernel). Autocast would make it a
    float32 (tokens x K) table, and every product with it a float32 one: on an H200 one such
    (M x K) x (K x d) product took 4 ms of vits16-geo's step (bench/results/profile_step-cuda-h200-run4.txt)."""
    with torch.autocast(logits.device.type, enabled=False):
        return torch.softmax(logits, dim=-1)


def gather_targets(probs: Tensor, rows: Tensor, weights: Tensor) -> Tensor:
    """``target[i] = sum_t weights[i, t] * probs[rows[i, t]]``: every student token's target in ONE
    indexed pass, a weighted `embedding_bag`. A gather per teacher view with a multiply-add is 4x
    slower on the CPU; on an H100 it was faster alone (8.6 against 11.1 ms, bench/target_gather.py) but
    made the whole vits16-geo step slower (0.193 against 0.167 s, bench/results/step_bound-cuda-*.json):
    it needs a second (tokens x K) buffer."""
    return F.embedding_bag(rows, probs, mode="sum", per_sample_weights=weights)


class _SoftTargetCrossEntropy(torch.autograd.Function):
    """``sum_i (W_i * logsumexp(x_i) - t_i . x_i)`` for logits ``x`` (N, K), soft targets ``t`` (N, K)
    of x's dtype with row sums ``W`` (N,) float32; no gradient to ``t`` or ``W``.

    Autograd of the plain expression keeps ``x`` and ``t`` and runs about a dozen K-wide passes; here
    forward runs one fused softmax, two row maxima and a dot product, and leaves the one buffer
    backward needs, t - W softmax(x) (= -d/dx), built in place over ``t`` (which it consumes).
    ``logsumexp(x) = max(x) - log(max softmax(x))``: exact, and safe since max softmax >= 1/K; both
    terms and the sums are float32 whatever x's dtype."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            probs = torch.softmax(logits, dim=-1)  # float32 accumulation inside, also for bf16 / fp16
            lse = logits.amax(dim=-1).float() - probs.amax(dim=-1).float().log()
            if logits.dtype == torch.float32:
                target_dot = torch.dot(target.reshape(-1), logits.reshape(-1))
            else:  # a low-precision dot would round the sum itself: accumulate in float32
                target_dot = (target * logits).sum(dtype=torch.float32)
            total = torch.dot(weight, lse) - target_dot
            neg_grad = target.addcmul_(probs, weight.to(target.dtype)[:, None], value=-1.0)
        ctx.save_for_backward(neg_grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (neg_grad,) = ctx.saved_tensors
        return neg_grad * -grad_output.to(neg_grad.dtype), None, None


class _PrototypeSoftTargetCrossEntropy(torch.autograd.Function):
    """The loss of `_SoftTargetCrossEntropy` for logits ``x = (scale z) W^T`` of a bias-free prototype
    layer ``W`` (K, d) and targets ``t_i = sum_t w_it P[rows_it]``, without ever making the student-sized
    (N, K) target table: its two uses go through the prototypes in d dimensions,

        sum_i t_i . x_i = sum_j (P W)_j . a_j,     a_j = sum over (i, t) with rows_it = j of w_it scale z_i
        dL/dz_i = scale (W_i softmax(x_i) W - sum_t w_it (P W)[rows_it])
        dL/dW   = (W softmax(x))^T (scale z) - P^T a

    so a teacher token's target is read once, by two (M x K) x (K x d) products, instead of being
    gathered once per student token that matches it (on an H100 the gather alone took ~10 ms of
    vits16-geo's step, bench/results/target_gather-cuda-h100.json). The one (N, K) buffer kept for
    backward is W_i softmax(x_i), made in place over the softmax; float32 sums as in
    `_SoftTargetCrossEntropy`."""

    @staticmethod
    def forward(ctx, z: Tensor, weight: Tensor, probs: Tensor, rows: Tensor, w: Tensor, scale: float) -> Tensor:
        x = F.linear(z * scale, weight)  # the autocast dtype under autocast
        with torch.autocast(z.device.type, enabled=False):
            probs_s = torch.softmax(x, dim=-1)
            lse = x.amax(dim=-1).float() - probs_s.amax(dim=-1).float().log()
            del x
            w = w.float()
            row_weight = w.sum(-1)
            scaled_z = z.float() * scale
            a = scaled_z.new_zeros(probs.shape[0], z.shape[1]).index_add_(
                0, rows.reshape(-1), (scaled_z[:, None, :] * w[..., None]).reshape(-1, z.shape[1]))
            target_through_w = (probs @ weight.to(probs.dtype)).float()  # (M, d): P W
            total = torch.dot(row_weight, lse) - torch.dot(target_through_w.reshape(-1), a.reshape(-1))
            weighted_softmax = probs_s.mul_(row_weight.to(probs_s.dtype)[:, None])
        ctx.scale = scale
        ctx.save_for_backward(weighted_softmax, scaled_z, weight, probs, target_through_w, a, rows, w)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        weighted_softmax, scaled_z, weight, probs, target_through_w, a, rows, w = ctx.saved_tensors
        dtype = weighted_softmax.dtype
        g = grad_output.float()
        grad_z = (weighted_softmax @ weight.to(dtype)).float() - (target_through_w[rows] * w[..., None]).sum(1)
        grad_w = (weighted_softmax.t() @ scaled_z.to(dtype)).float() - (probs.t() @ a.to(probs.dtype)).float()
        return (grad_z * (g * ctx.scale)).to(scaled_z.dtype), (grad_w * g).to(weight.dtype), None, None, None, None


class LocalDistillationLoss(nn.Module):
    """GLSD local term with its own centre ``c_d`` (docs/algorithms.md §3), chunked by a memory plan."""

    center: Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 chunk_tokens: int | None = None, recompute_above_mib: float | None = None,
                 centering: str = "ema", sinkhorn_iterations: int = 3,
                 targets_through_prototypes: bool | None = None) -> None:
        super().__init__()
        if out_dim < 1 or (chunk_tokens is not None and chunk_tokens < 1):
            raise ValueError(f"out_dim and chunk_tokens must be >= 1, got {out_dim}, {chunk_tokens}")
        if centering not in ("ema", "sinkhorn"):
            raise ValueError(f"centering must be 'ema' or 'sinkhorn', got {centering!r}")
        self.out_dim = out_dim
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        # None: on an accelerator (where the row gather is the slow part), else the gather (on the CPU
        # the two extra (M x K) x (K x d) products cost more than the gather: ViT-S/16 shapes, batch 4,
        # 1 thread, 0.65 against 0.58 s fp32 and 0.34 against 0.29 s bf16, 2026-11-28).
        self.targets_through_prototypes = targets_through_prototypes
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.chunk_tokens = chunk_tokens                # None: from the device's memory (plan_chunks)
        self.recompute_above_mib = recompute_above_mib  # None: likewise
        self._plans: dict[tuple, ChunkPlan] = {}        # planned once per shape: no query per step
        # With centering = "sinkhorn" the centre is unused: kept (zero) so checkpoints have one layout.
        self.register_buffer("center", torch.zeros(1, out_dim))

    def plan(self, batch: int, student_rows: int, teacher_rows: int, elem_bytes: int,
             device: torch.device) -> ChunkPlan:
        key = (batch, student_rows, teacher_rows, elem_bytes, str(device))
        if key not in self._plans:
            self._plans[key] = plan_chunks(batch, student_rows, teacher_rows, self.out_dim, elem_bytes,
                                           device_free_bytes(device), self.chunk_tokens, self.recompute_above_mib)
        return self._plans[key]

    def forward(self, student_z: Tensor, teacher_z: Tensor, student_last: nn.Module, teacher_last: nn.Module,
                matches: TokenMatches, teacher_temp: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean local cross-entropy over the pairs of ``matches`` (a 0-d tensor on the device), and metrics:
        the fraction of pairs' tokens that the hinge kept (``local_valid_fraction``) and the collapse
        statistics of the teacher's targets (engine/monitors.py, prefix DENSE) over about STATS_ROWS of
        its tokens, evenly strided over the batch.

        ``student_z`` (B, N, d): the student bottleneck of all student views' tokens, in the order of
        ``matches``; ``teacher_z`` (B, T·Nt, d): the teacher bottleneck of the T global views, view after
        view (no gradient flows into it).
        """
        batch, n_student, dim = student_z.shape
        n_teachers = matches.num_teachers
        n_teacher = teacher_z.shape[1]
        if matches.index.shape[:2] != (batch, n_student) or teacher_z.shape[0] != batch \
                or teacher_z.shape[-1] != dim or n_teacher % n_teachers:
            raise ValueError(f"student_z {tuple(student_z.shape)}, teacher_z {tuple(teacher_z.shape)} and matches "
                             f"{tuple(matches.index.shape)} do not fit together")
        weights = matches.token_weights()
        # Snapshot of the centre: checkpoint recomputes teacher targets during backward, and they must
        # use the centre of this forward even if update_center() runs before backward.
        shift = self.center.detach().clone() / teacher_temp
        student_logits = _logits(student_last, 1.0 / self.student_temp)
        teacher_logits = _logits(teacher_last, 1.0 / teacher_temp, shift)
        elem_bytes = torch.get_autocast_dtype(student_z.device.type).itemsize \
            if torch.is_autocast_enabled(student_z.device.type) else 4
        plan = self.plan(batch, n_student, n_teacher, elem_bytes, student_z.device)
        # Row of teacher token (image b of the chunk, view t, token j) in the chunk's flattened teacher_z.
        view_offset = torch.arange(n_teachers, device=student_z.device) * (n_teacher // n_teachers)
        image_offset = torch.arange(plan.images, device=student_z.device)[:, None, None] * n_teacher

        if self.centering == "sinkhorn":
            # One table of targets for the whole batch (its columns are balanced over all of it); each
            # chunk takes the rows of its own images.
            with torch.no_grad():
                table = sinkhorn_knopp(teacher_last(teacher_z.detach().reshape(-1, dim)), teacher_temp,
                                       self.sinkhorn_iterations)
                table = table.to(torch.get_autocast_dtype(table.device.type)) if elem_bytes < 4 else table
        # Collapse statistics of the targets of every `stride`-th teacher token of the batch (an entropy
        # pass over all of them cost tiny-geo's CPU step 3-6 %), tallied in forward.
        stride = max(1, batch * n_teacher // STATS_ROWS)
        tally, recording = CollapseTally(), self.centering == "ema"
        if self.centering == "sinkhorn":
            tally.add(table[::stride])
        through_prototypes = _is_plain_linear_without_bias(student_last) and (
            student_z.device.type != "cpu" if self.targets_through_prototypes is None else self.targets_through_prototypes)

        def chunk(sz: Tensor, teacher: Tensor, rows: Tensor, w: Tensor, first_row: int) -> Tensor:
            """`teacher`: the chunk's teacher bottleneck (EMA centre) or its rows of the Sinkhorn table,
            the batch's teacher rows from `first_row` on."""
            with torch.no_grad():
                probs = teacher if self.centering == "sinkhorn" else _softmax_in_dtype(teacher_logits(teacher))
                if recording:  # read when the chunk runs: False once backward recomputes it
                    tally.add(probs[(-first_row) % stride::stride])
            if through_prototypes:
                return _PrototypeSoftTargetCrossEntropy.apply(sz, student_last.weight, probs, rows, w,
                                                              1.0 / self.student_temp)
            with torch.no_grad():
                target = gather_targets(probs, rows, w.to(probs.dtype))
                del probs
            x = student_logits(sz)
            return _SoftTargetCrossEntropy.apply(x, target.to(x.dtype), w.float().sum(-1))

        total = student_z.new_zeros((), dtype=torch.float32)
        for start in range(0, batch, plan.images):
            images = slice(start, start + plan.images)
            count = min(plan.images, batch - start)
            sz = student_z[images].reshape(-1, dim)
            if self.centering == "sinkhorn":
                teacher = table[start * n_teacher:(start + count) * n_teacher]
            else:
                teacher = teacher_z[images].detach().reshape(-1, dim)
            rows = (matches.index[images] + view_offset + image_offset[:count]).reshape(-1, n_teachers)
            w = weights[images].reshape(-1, n_teachers)
            if torch.is_grad_enabled() and plan.recompute:
                # Non-reentrant: works when sz does not require grad, and with parameters that are
                # not explicit inputs (the last layers are captured by the closure).
                total = total + checkpoint(chunk, sz, teacher, rows, w, start * n_teacher, use_reentrant=False)
            else:
                total = total + chunk(sz, teacher, rows, w, start * n_teacher)
        recording = False  # backward's recomputation of a checkpointed chunk need not tally again
        # The weights of the kept tokens sum to the mean over pairs of each pair's kept fraction.
        return total, {"local_valid_fraction": weights.sum(), **tally.stats(DENSE)}

    @torch.no_grad()
    def update_center(self, teacher_z: Tensor, teacher_last: nn.Module) -> None:
        """``c_d <- m c_d + (1 - m) mean of teacher logits`` over every token of every global view and
        image (``teacher_z`` (..., d)), all-reduced across processes (docs/algorithms.md §3; DINO's centre,
        applied per token)."""
        if self.centering == "sinkhorn":  # no centre to move (and no all-reduce to pay for)
            return
        # Teacher tokens may be bf16 (made under autocast) while this runs outside autocast with the
        # layer's own (fp32) weights: feed the layer its parameters' dtype.
        dtype = next(teacher_last.parameters()).dtype
        flat = teacher_z.detach().reshape(-1, teacher_z.shape[-1]).to(dtype)
        if flat.shape[0] == 0:
            raise ValueError("teacher_z has no tokens")
        if _is_plain_linear_without_bias(teacher_last):
            # Linear, no bias: mean_i(W z_i) = W mean_i(z_i) exactly (up to float rounding), so one
            # d-dim mean replaces count x K logits.
            mean = teacher_last(flat.float().mean(0, keepdim=True).to(dtype)).float()[0]
        else:
            # General module (bias, non-linear, custom forward): sum logits chunk by chunk.
            mean = self.center.new_zeros(self.out_dim)
            rows = max(1, CPU_CHUNK_MIB * 2**20 // (4 * self.out_dim))
            for start in range(0, flat.shape[0], rows):
                mean += teacher_last(flat[start:start + rows]).float().sum(0)
            mean /= flat.shape[0]
        mean = all_reduce_mean(mean)
        self.center.mul_(self.center_momentum).add_(mean[None].to(self.center.dtype),
                                                    alpha=1.0 - self.center_momentum)

