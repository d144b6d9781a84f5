"""SimCLR, BYOL and MoCo v3 on a ViT, with or without SDSSL's intermediate-layer self-distillation.

`method.name` picks the loss, `method.sd` the distillation (docs/algorithms.md §4; Jang et al., WACV 2023):
    L = L_final + λ(t) · mean_{l distilled} L_l (+ the predictor-only term, BYOL / MoCo v3)
with λ(t) = r·(1 − cos(πt/T))/2 (the engine's 'sd_weight' schedule). The losses themselves live in
losses/contrastive.py and the heads in models/projectors.py; this module wires them to the engine:

- student: the backbone plus `LayerwiseHeads` (a projector per distilled block and for the final
  block; BYOL / MoCo v3 also a predictor per block). With SD off the heads hold the final block only.
- teacher (BYOL, MoCo v3): an EMA copy of the backbone and of the FINAL projector — no predictors
  (BYOL §3.1, MoCo v3 Alg. 1), momentum from the engine's 'momentum' schedule. SimCLR has none:
  `backbone('teacher')` then answers the student's backbone, which is what evaluation should use.
- per-block CLS features come from ONE backbone pass over both views (`Backbone.forward_layers`);
  the ViT has LayerNorm only, so batching the two views together changes nothing, while the heads
  (BatchNorm) still see each view as its own batch, as in MoCo v3.
- views: two global crops of the BYOL / MoCo v3 recipe (`make_transform`), area scale from
  `data.global_crop_scale` (the presets set MoCo v3's (0.08, 1)); local crops are not used.
- MoCo v3's frozen random patch embedding and fixed sin-cos position embeddings are config options
  (`method.contrastive.freeze_patch_embed` / `sincos_pos_embed`, models/mocov3_vit.py).

Timing of the EMA: the engine updates the teacher after each optimiser step, so the keys of step t
come from the teacher updated with the student of step t − 1 — MoCo v3's order (it updates the
momentum encoder at the start of step t from the same student weights).
"""
from __future__ import annotations

import torch
from torch import nn

from glsd_cli.config import Config
from glsd_cli.data.multicrop import MultiCrop
from glsd_cli.errors import ConfigError
from glsd_cli.losses.contrastive import LayerwiseContrastiveLoss
from glsd_cli.engine.task import StepContext, StepOutput
from glsd_cli.methods.base import Method
from glsd_cli.methods.layerwise import resolve_distilled_layers, sd_weight_schedule
from glsd_cli.models.backbone import Backbone
from glsd_cli.models.mocov3_vit import freeze_random_patch_embed, use_sincos_pos_embed
from glsd_cli.models.projectors import LayerwiseHeads, LayerwiseOutputs

NUM_VIEWS = 2


def make_backbone(cfg: Config, drop_path_rate: float) -> Backbone:
    """The timm ViT of the config, with MoCo v3's stability options when they are switched on."""
    backbone = Backbone(cfg.model, cfg.data.global_crop_size, drop_path_rate)
    c = cfg.method.contrastive
    if c.sincos_pos_embed:
        use_sincos_pos_embed(backbone.model)
    if c.freeze_patch_embed:
        freeze_random_patch_embed(backbone.model)
    return backbone


class SelfDistilledSSL(Method):
    """SimCLR / BYOL / MoCo v3, baseline (`method.sd.enabled = false`) or SD-* (SDSSL)."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        name, c, sd = cfg.method.name, cfg.method.contrastive, cfg.method.sd
        if name not in ("simclr", "byol", "mocov3"):
            raise ValueError(f"SelfDistilledSSL handles simclr, byol and mocov3, not {name!r}")
        self.has_teacher = name != "simclr"
        backbone = make_backbone(cfg, cfg.model.drop_path_rate)
        if not backbone.has_cls:
            raise ConfigError(f"{name} needs a ViT with a CLS token (model.arch = {cfg.model.arch!r} has none)")
        self.distilled = resolve_distilled_layers(sd.layers, backbone.num_blocks) if sd.enabled else []

        def heads(distilled: list[int]) -> LayerwiseHeads:
            return LayerwiseHeads(backbone.num_blocks, backbone.embed_dim, name, distilled, c.out_dim,
                                  c.layer_proj_hidden_dim, c.proj_hidden_dim, c.pred_hidden_dim)

        self.student = nn.ModuleDict({"backbone": backbone, "heads": heads(self.distilled)})
        self.teacher = nn.ModuleDict()
        if self.has_teacher:
            t_heads = heads([])
            t_heads.predictors = None  # the momentum encoder has no predictor
            self.teacher = nn.ModuleDict({"backbone": make_backbone(cfg, 0.0), "heads": t_heads})
            self._init_teacher()
        self.loss = LayerwiseContrastiveLoss(name, c.temperature, sd.enabled, sd.predictor_only_term)
        self.detached_predictions = bool(sd.enabled and sd.predictor_only_term and self.has_teacher)

    @torch.no_grad()
    def _init_teacher(self) -> None:
        """Teacher = the student's backbone and final projector (every teacher key exists in the student)."""
        student = self.student.state_dict()
        self.teacher.load_state_dict({k: student[k] for k in self.teacher.state_dict()})
        self.teacher.requires_grad_(False)

    # ------------------------------------------------------------------ engine hooks
    def make_transform(self) -> MultiCrop:
        """Two views per image: blur p = 1.0 / p = 0.1 + solarize p = 0.2 (BYOL, MoCo v3); no local crops.

        SimCLR gets the same recipe rather than its own (stronger jitter, blur p = 0.5 on both): the
        comparison is SD vs no SD under one augmentation, as SDSSL's reference code uses one
        augmentation for all three methods (docs/algorithms.md §4 names only the BYOL/MoCo v3 one)."""
        d = self.cfg.data
        return MultiCrop(d.global_crop_size, d.local_crop_size, 0, tuple(d.global_crop_scale), color=d.color_jitter)

    def schedules(self, epochs: int, steps_per_epoch: int) -> dict:
        return sd_weight_schedule(self.cfg.method.sd, epochs, steps_per_epoch)

    def after_step(self, ctx: StepContext, outputs: list[StepOutput]) -> None:
        if self.has_teacher:  # SimCLR has no teacher to move
            super().after_step(ctx, outputs)

    def backbone(self, which: str = "teacher") -> Backbone:
        if which == "teacher" and not self.has_teacher:
            return self.student["backbone"]  # SimCLR: the trained network is the only one
        return super().backbone(which)

    # ------------------------------------------------------------------ the step
    def layer_features(self, backbone: Backbone, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """{block: CLS after the final norm} for the distilled blocks and the final one, one forward pass."""
        final = backbone.num_blocks - 1
        if not self.distilled:
            return {final: backbone.forward_tokens(x).cls}
        out = backbone.forward_layers(x, self.distilled)
        feats = dict(zip(self.distilled, out.layer_cls))
        feats[final] = out.cls
        return feats

    def training_step(self, batch: dict, ctx: StepContext) -> StepOutput:
        views = batch["views"][:NUM_VIEWS]
        b = views[0].shape[0]
        x = torch.cat(views)
        feats = self.layer_features(self.student["backbone"], x)
        per_view = [{l: f[i * b:(i + 1) * b] for l, f in feats.items()} for i in range(NUM_VIEWS)]
        s_out = self.student["heads"](per_view, detached_predictions=self.detached_predictions)
        t_out: LayerwiseOutputs | None = None
        if self.has_teacher:
            with torch.no_grad():
                t_cls = self.teacher["backbone"].forward_tokens(x).cls
                final = s_out.final_layer
                t_out = self.teacher["heads"]([{final: c} for c in t_cls.chunk(NUM_VIEWS)],
                                              final_only=True, predict=False)
        loss, stats = self.loss(s_out, t_out, ctx.values.sd_weight)
        return StepOutput(loss, stats)


def build_sdssl(cfg: Config) -> Method:
    return SelfDistilledSSL(cfg)


__all__ = ["SelfDistilledSSL", "build_sdssl", "make_backbone"]
