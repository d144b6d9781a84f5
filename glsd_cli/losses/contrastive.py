"""Two-view contrastive / regression losses and their SDSSL layer-wise versions (docs/algorithms.md §4).

Layout conventions (all functions): two views per image, v in {0, 1}; every per-view tensor is the
LOCAL slice (B, D) of this process, row i = image i of the local batch. Global batch N = world * B;
this rank's images are rows [rank * B, (rank + 1) * B) of a gathered tensor (rank order, see
``engine.distributed``). In one process every gather is the identity.

Distributed gradients: each rank returns the mean over its LOCAL anchors; the engine averages
parameter gradients over ranks (DDP or ``engine.distributed.average_gradients``), so the optimised
quantity is the mean over the global batch. When keys carry gradient (SimCLR final layer) they are
gathered with ``all_gather_with_grad``, whose backward all-reduces the key gradients and hands each
rank its own slice — the SimCLR / MoCo v3 convention. (Checked with 2 gloo processes: loss and
input gradients equal the single-process global-batch values.)

Sources: SimCLR (Chen et al., ICML 2020, NT-Xent, eq. 1); BYOL (Grill et al., NeurIPS 2020, eq. 2
and the symmetrised loss of §3.1); MoCo v3 (Chen et al., ICCV 2021; facebookresearch/moco-v3
``moco/builder.py``: ``contrastive_loss`` x 2T and ``contrastive_loss(q1, k2) +
contrastive_loss(q2, k1)``); SDSSL (Jang et al., WACV 2023, §3.2 and eq. 3-5, and its reference code).

What "r = 0 equals the baseline" means here (``LayerwiseContrastiveLoss``):
- SD disabled (``sd_enabled=False``): the loss is exactly the published baseline — no layer terms and
  no predictor-only term.
- SD enabled with sd_weight (lambda) = 0: gradients on the backbone and on every projector are
  identical to the baseline's (the layer term is multiplied by 0 and the predictor-only term sees
  detached projections). ``stats["loss_final"]`` equals the baseline value exactly; the returned
  loss equals baseline + ``stats["loss_pred_only"]`` (BYOL / MoCo v3 only), and predictor gradients
  differ by that term (which, like the reference, includes the final predictor).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glsd_cli.engine.distributed import all_gather_no_grad, all_gather_with_grad, rank
from glsd_cli.models.projectors import METHODS, LayerwiseOutputs

TeacherOutputs = Union[LayerwiseOutputs, Sequence[Tensor]]


def _check_views(name: str, views: Sequence[Tensor]) -> None:
    if len(views) != 2:
        raise ValueError(f"{name}: expected 2 views, got {len(views)}")
    if views[0].shape != views[1].shape or views[0].dim() != 2:
        raise ValueError(f"{name}: views must be (B, D) tensors of equal shape, got "
                         f"{tuple(views[0].shape)} and {tuple(views[1].shape)}")


def _two_view_nce(q0: Tensor, q1: Tensor, k0: Tensor, k1: Tensor, temperature: float) -> Tensor:
    """Cross-view InfoNCE over 2N candidates, excluding each anchor's own (image, view) slot.

    q0, q1: local L2-normalised queries (B, D) of view 0 / 1. k0, k1: GLOBAL L2-normalised keys
    (N, D) of view 0 / 1. For query (i, v): positive = k_{1-v}[g(i)], candidates = all 2N keys except
    k_v[g(i)], where g(i) = rank * B + i. Mean over the 2B local queries.
    """
    b, n = q0.shape[0], k0.shape[0]
    q = torch.cat([q0, q1], 0)                                   # (2B, D): view-major
    k = torch.cat([k0, k1], 0)                                   # (2N, D): view-major
    logits = q @ k.t() / temperature                             # (2B, 2N)
    g = torch.arange(b, device=q.device) + rank() * b            # global index of local images
    view = torch.arange(2, device=q.device).repeat_interleave(b)  # view of each query row
    gi = g.repeat(2)
    self_col = view * n + gi                                     # the anchor's own slot
    pos_col = (1 - view) * n + gi                                # same image, other view
    self_mask = torch.zeros(2 * b, 2 * n, dtype=torch.bool, device=q.device)
    self_mask[torch.arange(2 * b, device=q.device), self_col] = True
    return F.cross_entropy(logits.masked_fill(self_mask, float("-inf")), pos_col)


def nt_xent(z0: Tensor, z1: Tensor, temperature: float = 0.2) -> Tensor:
    """SimCLR NT-Xent over the global batch.

    z0, z1: local projections (B, D) of view 0 / 1, with gradient. Each of the 2N samples is an
    anchor whose positive is the other view of its image and whose negatives are the other 2N - 2
    samples. Keys are gathered WITH gradient (both ends of a similarity are trained, as in SimCLR).
    """
    _check_views("nt_xent", [z0, z1])
    z0, z1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
    return _two_view_nce(z0, z1, all_gather_with_grad(z0), all_gather_with_grad(z1), temperature)


def sd_simclr_layer_loss(h0: Tensor, h1: Tensor, f0: Tensor, f1: Tensor,
                         temperature: float = 0.2) -> Tensor:
    """SD-SimCLR term of one intermediate layer (SDSSL §3.2, docs/algorithms.md §4).

    h0, h1: layer-l projections (B, D) of view 0 / 1 (queries, with gradient). f0, f1: the same
    network's FINAL projections (B, D) of view 0 / 1, used as stop-gradient keys. For query (i, v):
    positive = final(i, 1 - v); candidates = final projections of every image of the global batch in
    both views except final(i, v).
    """
    _check_views("sd_simclr_layer_loss", [h0, h1])
    _check_views("sd_simclr_layer_loss (final)", [f0, f1])
    h0, h1 = F.normalize(h0, dim=1), F.normalize(h1, dim=1)
    k0 = all_gather_no_grad(F.normalize(f0.detach(), dim=1))
    k1 = all_gather_no_grad(F.normalize(f1.detach(), dim=1))
    return _two_view_nce(h0, h1, k0, k1, temperature)


def byol_regression(p: Tensor, k: Tensor) -> Tensor:
    """Mean over the batch of ``2 - 2 cos(p, sg(k))`` (BYOL eq. 2). p, k: (B, D).

    Per-sample, so no gather is needed: the local mean, averaged over ranks with the
    gradients, is the global mean.
    """
    p = F.normalize(p, dim=1)
    k = F.normalize(k.detach(), dim=1)
    return (2 - 2 * (p * k).sum(dim=1)).mean()


def byol_loss(p0: Tensor, p1: Tensor, k0: Tensor, k1: Tensor) -> Tensor:
    """Symmetrised BYOL loss: ``reg(p0, k1) + reg(p1, k0)``.

    p_v: online predictions of view v (B, D); k_v: target (momentum teacher) projections of view v.
    """
    _check_views("byol_loss", [p0, p1])
    _check_views("byol_loss (targets)", [k0, k1])
    return byol_regression(p0, k1) + byol_regression(p1, k0)


def mocov3_contrastive(q: Tensor, k: Tensor, temperature: float = 0.2) -> Tensor:
    """MoCo v3 ``contrastive_loss(q, k)``: InfoNCE of local queries against all global keys, x 2T.

    q: local predictions (B, D); k: local momentum-teacher projections (B, D), gathered without
    gradient. Positive of local query i is global key rank * B + i.
    """
    q = F.normalize(q, dim=1)
    k = all_gather_no_grad(F.normalize(k.detach(), dim=1))
    logits = q @ k.t() / temperature                               # (B, N)
    labels = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]
    return F.cross_entropy(logits, labels) * (2 * temperature)


def mocov3_infonce(q0: Tensor, q1: Tensor, k0: Tensor, k1: Tensor,
                   temperature: float = 0.2) -> Tensor:
    """Symmetrised MoCo v3 loss: ``contrastive(q0, k1) + contrastive(q1, k0)``."""
    _check_views("mocov3_infonce", [q0, q1])
    _check_views("mocov3_infonce (keys)", [k0, k1])
    return mocov3_contrastive(q0, k1, temperature) + mocov3_contrastive(q1, k0, temperature)


def _teacher_final(teacher_out: TeacherOutputs | None) -> list[Tensor]:
    if teacher_out is None:
        raise ValueError("BYOL / MoCo v3 need the momentum teacher's final projections")
    views = teacher_out.final_proj if isinstance(teacher_out, LayerwiseOutputs) else list(teacher_out)
    _check_views("teacher final projections", views)
    return [t.detach() for t in views]


class LayerwiseContrastiveLoss(nn.Module):
    """Baseline and SDSSL losses for SimCLR, BYOL and MoCo v3 (docs/algorithms.md §4).

    ``L = L_final + sd_weight * mean_{l in distilled} L_l (+ L_pred_only)``, where for
    - simclr: L_final = NT-Xent of the final projections; L_l = ``sd_simclr_layer_loss``.
    - byol:   L_final = ``byol_loss(pred_final, teacher_final)``; L_l = same with layer l's predictions.
    - mocov3: L_final = ``mocov3_infonce(pred_final, teacher_final)``; L_l likewise.
    - L_pred_only (BYOL / MoCo v3, SD enabled, ``predictor_only_term``): sum over all layers (final
      included) of the same loss on ``student_out.pred_detached`` (predictor run on detached
      projections), so it trains predictors only. Not weighted by sd_weight: it exists so the
      intermediate predictors learn while lambda is still near 0 (SDSSL reference).

    Args:
        method: "simclr", "byol" or "mocov3".
        temperature: tau for SimCLR / MoCo v3 (0.2).
        sd_enabled: False = plain baseline (distilled layers in the inputs are ignored).
        predictor_only_term: add L_pred_only when SD is enabled (default True, as the reference).
    """

    def __init__(self, method: str, temperature: float = 0.2, sd_enabled: bool = True,
                 predictor_only_term: bool = True) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.temperature = temperature
        self.sd_enabled = sd_enabled
        self.predictor_only_term = predictor_only_term and method != "simclr"

    def _pair(self, queries: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
        """BYOL / MoCo v3 loss of predictions ``queries`` against teacher ``targets``."""
        if self.method == "byol":
            return byol_loss(queries[0], queries[1], targets[0], targets[1])
        return mocov3_infonce(queries[0], queries[1], targets[0], targets[1], self.temperature)

    @staticmethod
    def _get(table: dict[int, list[Tensor]], layer: int, what: str) -> list[Tensor]:
        if layer not in table:
            hint = " (call the heads with detached_predictions=True)" if what == "pred_detached" else ""
            raise ValueError(f"student_out.{what} has no entry for layer {layer}{hint}")
        return table[layer]

    def forward(self, student_out: LayerwiseOutputs, teacher_out: TeacherOutputs | None,
                sd_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the total loss.

        Args:
            student_out: online heads' outputs (see ``LayerwiseOutputs``): ``proj`` for every layer;
                for BYOL / MoCo v3 also ``pred``, and ``pred_detached`` when the predictor-only term
                is on. Views [0, 1], each (B, D), local batch.
            teacher_out: momentum teacher's final projections of views [0, 1] (a ``LayerwiseOutputs``
                or a 2-sequence of (B, D)); ``None`` for SimCLR (no teacher).
            sd_weight: lambda(t), already ramped by the caller.

        Returns:
            (loss, stats) with detached 0-d tensor stats: ``loss``, ``loss_final``, ``loss_layers`` (mean
            over distilled layers), ``loss_layer{l}`` per distilled layer, ``loss_pred_only``. Stats are
            this rank's values.
        """
        fl = student_out.final_layer
        simclr = self.method == "simclr"
        targets = None if simclr else _teacher_final(teacher_out)

        if simclr:
            final = student_out.final_proj
            loss_final = nt_xent(final[0], final[1], self.temperature)
        else:
            loss_final = self._pair(self._get(student_out.pred, fl, "pred"), targets)
        loss = loss_final
        logged: dict[str, Tensor] = {"loss_final": loss_final}

        if self.sd_enabled:
            layer_losses: list[Tensor] = []
            for l in student_out.distilled_layers:
                if simclr:
                    h, f = student_out.proj[l], student_out.final_proj
                    ll = sd_simclr_layer_loss(h[0], h[1], f[0], f[1], self.temperature)
                else:
                    ll = self._pair(self._get(student_out.pred, l, "pred"), targets)
                layer_losses.append(ll)
                logged[f"loss_layer{l}"] = ll
            if layer_losses:
                loss_layers = torch.stack(layer_losses).mean()
                # sd_weight = 0 adds exactly 0 to the value and to every gradient (finite losses),
                # which is what makes "r = 0" reproduce the baseline's gradients bit for bit.
                loss = loss + sd_weight * loss_layers
                logged["loss_layers"] = loss_layers
            if self.predictor_only_term:
                terms = [self._pair(self._get(student_out.pred_detached, l, "pred_detached"), targets)
                         for l in student_out.distilled_layers + [fl]]
                pred_only = torch.stack(terms).sum()
                loss = loss + pred_only
                logged["loss_pred_only"] = pred_only
        logged["loss"] = loss

        # Detached device tensors: read when a log line is written, not here.
        stats = {k: t.detach().float() for k, t in logged.items()}
        stats.setdefault("loss_layers", loss.new_zeros((), dtype=torch.float32))
        stats.setdefault("loss_pred_only", loss.new_zeros((), dtype=torch.float32))
        return loss, stats


__all__ = ["LayerwiseContrastiveLoss", "LayerwiseOutputs", "TeacherOutputs", "byol_loss",
           "byol_regression", "mocov3_contrastive", "mocov3_infonce", "nt_xent",
           "sd_simclr_layer_loss"]
