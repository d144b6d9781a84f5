"""Global-local self-distillation: DINO's global loss plus the local loss between patch tokens.

`method.local.matching`:
- "none": plain DINO (Caron et al. 2021);
- "geometric": GLSD (Lebailly & Tuytelaars 2023) — tokens paired by their position in the image;
- "similarity": EsViT's region loss (Li et al. 2022) — tokens paired by feature similarity.
L = (1 − w)·L_global + w·L_local (docs/algorithms.md §3).
`method.sd.enabled` adds SDSSL's layer terms: L + λ(t)·mean_l L_l (methods/layerwise.py).

One step, top to bottom (`training_step`): the teacher sees the global views and its targets are made
once; the student sees every view, one backbone pass per resolution; the global loss, the local loss
(tokens paired by glsd_cli/matching.py), SD's layer terms and KoLeo are added; the step's statistics
(losses, the teacher's collapse statistics, centre norms) stay on the device. `after_step` then moves
the centres from this step's teacher outputs and the teacher by EMA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from glsd_cli.config import Config
from glsd_cli.data.multicrop import NUM_GLOBAL_VIEWS
from glsd_cli.engine.monitors import collapse_stats
from glsd_cli.engine.schedules import teacher_temp_schedule
from glsd_cli.engine.task import StepContext, StepOutput
from glsd_cli.errors import ConfigError
from glsd_cli.losses.dino import DINOLoss
from glsd_cli.losses.koleo import koleo_loss
from glsd_cli.losses.local import LocalDistillationLoss
from glsd_cli.matching import geometric_matches, similarity_matches
from glsd_cli.methods.base import Method, copy_as_teacher
from glsd_cli.methods.layerwise import DinoLayerDistillation, sd_weight_schedule
from glsd_cli.models.backbone import Backbone, TokenOutput
from glsd_cli.models.heads import DINOHead

G = NUM_GLOBAL_VIEWS


@dataclass
class TeacherOutputs:
    """What `after_step` needs from one micro-batch: the inputs of the centre updates."""

    logits: list[Tensor]       # global head, one (B, K) per global view
    dense: Tensor | None       # dense bottleneck of the global views' patch tokens (B, G·Nt, d)


def image_major(tokens: Tensor, views: int) -> Tensor:
    """(views·B, N, D) stacked view after view → (B, views·N, D): each image's tokens together,
    view after view (the layout of glsd_cli/matching.TokenMatches)."""
    vb, n, d = tokens.shape
    return tokens.view(views, vb // views, n, d).transpose(0, 1).reshape(vb // views, views * n, d)


def watched_targets(cfg: Config) -> tuple[int, int | None, bool]:
    """What the collapse monitors watch in a run of this method: the global head's number of prototypes,
    the dense head's (None without a local loss), and whether the targets come from Sinkhorn-Knopp (the
    advice then does not suggest it). The method sets these on itself; bench/common.py reads them from a
    finished run's config."""
    loss, local = cfg.method.loss, cfg.method.local
    return cfg.head.out_dim, (local.out_dim if local.matching != "none" else None), loss.centering == "sinkhorn"


class GlobalLocalDistillation(Method):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        h, loc, lc = cfg.head, cfg.method.local, cfg.method.loss
        self.local_on = loc.matching != "none"
        self.num_prototypes, self.dense_prototypes, self.sinkhorn_targets = watched_targets(cfg)

        def modules(drop_path: float) -> nn.ModuleDict:
            backbone = Backbone(cfg.model, cfg.data.global_crop_size, drop_path)
            mods = {"backbone": backbone,
                    "head": DINOHead(backbone.embed_dim, h.out_dim, h.hidden_dim, h.bottleneck_dim, h.num_layers,
                                     h.norm_last_layer)}
            if self.local_on:
                mods["dense_head"] = DINOHead(backbone.embed_dim, loc.out_dim, h.hidden_dim, h.bottleneck_dim,
                                              h.num_layers, h.norm_last_layer)
            return nn.ModuleDict(mods)

        self.student = modules(cfg.model.drop_path_rate)
        self.teacher = copy_as_teacher(self.student, modules(0.0))
        # SD on DINO/GLSD (methods/layerwise.py): per-layer heads in the student only, added after the
        # teacher copy, so the teacher (targets: final layer only) has none.
        self.sd_on = cfg.method.sd.enabled
        if self.sd_on:
            backbone = self.student["backbone"]
            self.student["sd"] = DinoLayerDistillation(cfg, backbone.embed_dim, backbone.num_blocks)
        self.dino_loss = DINOLoss(h.out_dim, lc.student_temp, lc.center_momentum, lc.centering,
                                  lc.sinkhorn_iterations)
        if self.local_on:
            self.local_loss = LocalDistillationLoss(
                loc.out_dim, lc.student_temp, lc.center_momentum,
                chunk_tokens=None if loc.chunk_tokens == "auto" else loc.chunk_tokens,
                recompute_above_mib=None if loc.recompute_above_mib == "auto" else loc.recompute_above_mib,
                centering=lc.centering, sinkhorn_iterations=lc.sinkhorn_iterations)

    # ------------------------------------------------------------------ schedules and freezing
    def schedules(self, epochs: int, steps_per_epoch: int) -> dict:
        lc = self.cfg.method.loss
        return {"teacher_temp": teacher_temp_schedule(lc.warmup_teacher_temp, float(lc.teacher_temp),
                                                      lc.warmup_teacher_temp_epochs, epochs, steps_per_epoch),
                **sd_weight_schedule(self.cfg.method.sd, epochs, steps_per_epoch)}

    def frozen_parameters(self, ctx: StepContext) -> list[nn.Parameter]:
        if ctx.epoch >= self.cfg.head.freeze_last_layer_epochs:
            return []
        params = self.student["head"].last_layer_parameters()
        if self.local_on:
            params += self.student["dense_head"].last_layer_parameters()
        return params

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: dict, ctx: StepContext) -> StepOutput:
        views: list[Tensor] = batch["views"]
        temp = ctx.values.teacher_temp
        # The teacher sees the global views; its targets are made once, for every loss and statistic.
        with torch.no_grad():
            t_tok = self.teacher["backbone"].forward_tokens(torch.cat(views[:G]))
            t_logits = list(self.teacher["head"](t_tok.cls).chunk(G))
            targets = self.dino_loss.teacher_targets(t_logits, temp)
        # The student sees every view: one backbone pass per resolution (globals, then locals).
        groups = self._student_forward(views)
        s_logits = self.student["head"](torch.cat([tok.cls for tok, _ in groups])).chunk(len(views))
        loss_global = self.dino_loss(list(s_logits), targets)
        loss, metrics = loss_global, {"loss_global": loss_global.detach(), **collapse_stats(torch.cat(targets))}
        if self.dino_loss.centering == "ema":
            metrics["center_norm"] = self.dino_loss.center.norm()
        t_dense = None
        if self.local_on:
            loss_local, local_metrics, t_dense = self._local_term(batch, groups, t_tok, temp)
            w = self.cfg.method.local.weight
            loss = (1 - w) * loss_global + w * loss_local
            metrics.update(loss_local=loss_local.detach(), **local_metrics)
            if self.local_loss.centering == "ema":
                metrics["center_norm_local_loss"] = self.local_loss.center.norm()
        if self.sd_on:  # SD on DINO/GLSD: L + λ(t)·mean_l L_l toward the same targets
            global_tok = groups[0][0]
            layer_cls = [[c.chunk(G)[v] for c in global_tok.layer_cls] for v in range(G)]
            loss_sd, sd_stats = self.student["sd"](layer_cls, self.student["head"].last_layer, targets)
            loss = loss + ctx.values.sd_weight * loss_sd
            metrics.update(sd_stats)
        koleo_weight = self.cfg.method.loss.koleo_weight
        if koleo_weight > 0:  # DINOv2: the sum over the global views of KoLeo on the student's CLS tokens
            if len(views[0]) < 2:
                raise ConfigError("method.loss.koleo_weight > 0 needs at least 2 images per process and "
                                  f"micro-batch (nearest neighbours); this step has {len(views[0])}")
            loss_koleo = sum(koleo_loss(c) for c in groups[0][0].cls.chunk(G))
            loss = loss + koleo_weight * loss_koleo
            metrics["loss_koleo"] = loss_koleo.detach()
        metrics["loss"] = loss.detach()
        return StepOutput(loss, metrics, TeacherOutputs(t_logits, t_dense))

    def _student_forward(self, views: list[Tensor]) -> list[tuple[TokenOutput, int]]:
        """(tokens, number of views) per resolution group: the globals, then the locals if any; SD takes
        the globals' per-layer CLS from the same pass."""
        backbone = self.student["backbone"]
        groups = [(views[:G], self.sd_on), (views[G:], False)]
        return [(backbone.forward_layers(torch.cat(group), self.student["sd"].layers) if per_layer
                 else backbone.forward_tokens(torch.cat(group)), len(group))
                for group, per_layer in groups if group]

    def _local_term(self, batch: dict, groups: list[tuple[TokenOutput, int]], t_tok: TokenOutput,
                    temp: float) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """The local loss over every (teacher global view, other student view) pair; its metrics (kept-token
        fraction, the dense head's collapse statistics); and the teacher's dense bottleneck (for the centre)."""
        dense_s, dense_t = self.student["dense_head"], self.teacher["dense_head"]
        s_z = torch.cat([image_major(dense_s.forward_bottleneck(tok.patches), n) for tok, n in groups], 1)
        with torch.no_grad():
            t_z = image_major(dense_t.forward_bottleneck(t_tok.patches), G)
            loc = self.cfg.method.local
            if loc.matching == "geometric":
                grids = [tok.grid for tok, n in groups for _ in range(n)]
                matches = geometric_matches(batch["boxes"], batch["flips"], grids, G, hinge=loc.hinge)
            else:
                s_patches = torch.cat([image_major(tok.patches.detach(), n) for tok, n in groups], 1)
                sizes = [tok.patches.shape[1] for tok, n in groups for _ in range(n)]
                matches = similarity_matches(s_patches, image_major(t_tok.patches, G), sizes, G)
        loss, metrics = self.local_loss(s_z, t_z, dense_s.last_layer, dense_t.last_layer, matches, temp)
        return loss, metrics, t_z

    def after_step(self, ctx: StepContext, outputs: list[StepOutput]) -> None:
        """Centres move after the optimiser step, from the teacher outputs of all the step's
        micro-batches (DINO's order; with gradient accumulation they move once per step), then the
        teacher's EMA."""
        teachers: list[TeacherOutputs] = [o.teacher for o in outputs]
        self.dino_loss.update_center([t for out in teachers for t in out.logits])
        if self.local_on:
            self.local_loss.update_center(torch.cat([out.dense for out in teachers]),
                                          self.teacher["dense_head"].last_layer)
        super().after_step(ctx, outputs)
