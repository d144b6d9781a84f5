"""Global-local self-distillation: DINO's global loss plus the local loss between patch tokens.

`method.local.matching`:
- "none": plain DINO (Caron et al. 2021);
- "geometric": GLSD (Lebailly & Tuytelaars 2023) — tokens paired by their position in the image;
- "similarity": EsViT's region loss (Li et al. 2022) — tokens paired by feature similarity.
L = (1 − w)·L_global + w·L_local (docs/algorithms.md §3).
`method.sd.enabled` adds SDSSL's layer terms: L + λ(t)·mean_l L_l (methods/layerwise.py).
"""
from __future__ import annotations

import torch
from torch import nn

from glsd_cli.config import Config
from glsd_cli.engine.schedules import teacher_temp_schedule
from glsd_cli.errors import ConfigError
from glsd_cli.losses.dino import DINOLoss
from glsd_cli.losses.koleo import koleo_loss
from glsd_cli.methods.base import Method, StepContext, copy_as_teacher
from glsd_cli.methods.layerwise import DinoLayerDistillation, sd_weight_schedule
from glsd_cli.models.backbone import Backbone, TokenOutput
from glsd_cli.models.heads import DINOHead

NUM_GLOBAL = 2


def _as_int(value, name: str) -> int:
    if not isinstance(value, int):
        raise ValueError(f"{name} must be resolved to an integer before building the model (got {value!r})")
    return value


class GlobalLocalDistillation(Method):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        h, loc = cfg.head, cfg.method.local
        self.local_on = loc.matching != "none"

        def modules(drop_path: float) -> nn.ModuleDict:
            backbone = Backbone(cfg.model, cfg.data.global_crop_size, drop_path)
            mods = {"backbone": backbone,
                    "head": DINOHead(backbone.embed_dim, _as_int(h.out_dim, "head.out_dim"), h.hidden_dim,
                                     h.bottleneck_dim, h.num_layers, h.norm_last_layer)}
            if self.local_on:
                mods["dense_head"] = DINOHead(backbone.embed_dim, _as_int(loc.out_dim, "method.local.out_dim"),
                                              h.hidden_dim, h.bottleneck_dim, h.num_layers, h.norm_last_layer)
            return nn.ModuleDict(mods)

        self.student = modules(cfg.model.drop_path_rate)
        self.teacher = copy_as_teacher(self.student, modules(0.0))
        # -- SD on DINO/GLSD (methods/layerwise.py): per-layer heads in the student only, added after
        # the teacher copy, so the teacher (targets: final layer only) has none.
        self.sd_on = cfg.method.sd.enabled
        if self.sd_on:
            backbone = self.student["backbone"]
            self.student["sd"] = DinoLayerDistillation(cfg, backbone.embed_dim, backbone.num_blocks)
        # -- end SD
        lc = cfg.method.loss
        self.dino_loss = DINOLoss(_as_int(h.out_dim, "head.out_dim"), lc.student_temp, lc.center_momentum,
                                  lc.centering, lc.sinkhorn_iterations)
        if self.local_on:
            from glsd_cli.losses.local import LocalDistillationLoss

            self.local_loss = LocalDistillationLoss(loc.out_dim, lc.student_temp, lc.center_momentum,
                                                    chunk_tokens=None if loc.chunk_tokens == "auto" else loc.chunk_tokens,
                                                    recompute_above_mib=loc.recompute_above_mib)

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
    def _student_forward(self, views: list[torch.Tensor]) -> list[TokenOutput]:
        """One backbone forward per resolution (globals together, locals together), split per view."""
        outs: list[TokenOutput] = []
        groups = [views[:NUM_GLOBAL], views[NUM_GLOBAL:]]
        backbone = self.student["backbone"]
        for i, group in enumerate(groups):
            if not group:
                continue
            n = len(group)
            if self.sd_on and i == 0:  # SD: the globals' per-layer CLS from the same pass
                tok = backbone.forward_layers(torch.cat(group), self.student["sd"].layers)
                layer_cls = [list(c.chunk(n)) for c in tok.layer_cls]
            else:
                tok, layer_cls = backbone.forward_tokens(torch.cat(group)), None
            for v, (cls, patches) in enumerate(zip(tok.cls.chunk(n), tok.patches.chunk(n))):
                outs.append(TokenOutput(cls, patches, tok.grid, layer_cls and [c[v] for c in layer_cls]))
        return outs

    def training_step(self, batch: dict, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        views: list[torch.Tensor] = batch["views"]
        temp = ctx.values["teacher_temp"]
        with torch.no_grad():
            t_tok = self.teacher["backbone"].forward_tokens(torch.cat(views[:NUM_GLOBAL]))
            t_logits = list(self.teacher["head"](t_tok.cls).chunk(NUM_GLOBAL))
        s_out = self._student_forward(views)
        s_logits = list(self.student["head"](torch.cat([o.cls for o in s_out])).split([len(v) for v in views]))
        loss_global = self.dino_loss(s_logits, t_logits, temp)
        metrics = {"loss_global": loss_global.item()}
        loss = loss_global
        if self.local_on:
            loss_local, local_stats, t_z = self._local_term(batch, s_out, t_tok, temp)
            w = self.cfg.method.local.weight
            loss = (1 - w) * loss_global + w * loss_local
            metrics["loss_local"] = loss_local.item()
            metrics.update(local_stats)
        if self.sd_on:  # SD on DINO/GLSD: L + λ(t)·mean_l L_l, targets the teacher's final P_t
            probs = self.dino_loss.teacher_targets(t_logits, temp)
            loss_sd, sd_stats = self.student["sd"]([o.layer_cls for o in s_out[:NUM_GLOBAL]],
                                                   self.student["head"].last_layer, probs)
            loss = loss + ctx.values["sd_weight"] * loss_sd
            metrics.update(sd_stats, sd_weight=ctx.values["sd_weight"])
        koleo_weight = self.cfg.method.loss.koleo_weight
        if koleo_weight > 0:  # DINOv2: the sum over the global views of KoLeo on the student's CLS tokens
            if len(views[0]) < 2:
                raise ConfigError("method.loss.koleo_weight > 0 needs at least 2 images per process and "
                                  f"micro-batch (nearest neighbours); this step has {len(views[0])}")
            loss_koleo = sum(koleo_loss(o.cls) for o in s_out[:NUM_GLOBAL])
            loss = loss + koleo_weight * loss_koleo
            metrics["loss_koleo"] = loss_koleo.item()
        # Centres move after the loss, from this step's teacher outputs (DINO's order). With gradient
        # accumulation a step has several micro-batches: the centre moves once, from all of them.
        if getattr(self, "_pending_step", None) != ctx.step:  # also drops a skipped step's outputs
            self._pending_step, self._pending_center = ctx.step, []
        self._pending_center.append((t_logits, t_z if self.local_on else None))
        metrics["loss"] = loss.item()
        return loss, metrics

    def _local_term(self, batch: dict, s_out: list[TokenOutput], t_tok: TokenOutput, temp: float):
        from glsd_cli.geometry import match_geometric
        from glsd_cli.losses.local import match_similarity

        loc = self.cfg.method.local
        dense_s, dense_t = self.student["dense_head"], self.teacher["dense_head"]
        # Patch tokens of each resolution go through the dense bottleneck in one call.
        s_z: list[torch.Tensor] = []
        for group in (s_out[:NUM_GLOBAL], s_out[NUM_GLOBAL:]):
            if group:
                z = dense_s.forward_bottleneck(torch.cat([o.patches for o in group]))
                s_z += list(z.chunk(len(group)))
        with torch.no_grad():
            t_patches = list(t_tok.patches.chunk(NUM_GLOBAL))
            t_z = list(dense_t.forward_bottleneck(t_tok.patches).chunk(NUM_GLOBAL))
        boxes, flips = batch["boxes"], batch["flips"]
        matches = {}
        for t in range(NUM_GLOBAL):
            for s in range(len(s_out)):
                if s == t:
                    continue
                if loc.matching == "geometric":
                    matches[(t, s)] = match_geometric(boxes[:, s], flips[:, s], s_out[s].grid,
                                                      boxes[:, t], flips[:, t], t_tok.grid, hinge=loc.hinge)
                else:
                    matches[(t, s)] = (match_similarity(s_out[s].patches.detach(), t_patches[t]), None)
        loss, stats = self.local_loss(s_z, t_z, dense_s.last_layer, dense_t.last_layer, matches, temp)
        return loss, stats, t_z

    def after_step(self, ctx: StepContext) -> None:
        pending, self._pending_center = self._pending_center, []
        self.dino_loss.update_center([t for t_logits, _ in pending for t in t_logits])
        if self.local_on:
            self.local_loss.update_center([z for _, t_z in pending for z in t_z], self.teacher["dense_head"].last_layer)
        super().after_step(ctx)
