"""Projection / prediction MLPs and the per-layer heads of SDSSL (docs/algorithms.md §4).

Sources:
- MoCo v3 (facebookresearch/moco-v3, ``moco/builder.py``, ``MoCo._build_mlp`` and
  ``MoCo_ViT._build_projector_and_predictor_mlps``): bias-free Linear layers with BatchNorm1d + ReLU
  in between; the last Linear is followed by ``BatchNorm1d(affine=False)`` when ``last_bn``. The ViT
  projector has 3 layers and the ViT predictor 2 layers, both with ``last_bn=True``.
- BYOL (Grill et al., NeurIPS 2020, §3.3): projector and predictor end in a plain Linear (no BN).
- SDSSL (Jang et al., WACV 2023, §3 and the supplementary recipe): every distilled block gets its own
  3-layer projector (hidden 2048, output 256; the final layer's hidden is 4096) and, for BYOL and
  MoCo v3, its own 2-layer predictor (hidden 4096).

SyncBatchNorm: these modules use plain ``nn.BatchNorm1d``. Under distributed training the engine
converts the whole student (and teacher) with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` so
batch statistics are computed over the global batch, as in MoCo v3 and BYOL; nothing here needs to
know whether training is distributed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

from torch import Tensor, nn

METHODS = ("simclr", "byol", "mocov3")

# Per-view input of LayerwiseHeads: anything indexable by the 0-based block index that returns the
# (B, embed_dim) CLS feature of that block (after the backbone's final norm): a dict {block: tensor},
# a list with one entry per block, or a (num_blocks, B, embed_dim) tensor.
LayerFeatures = Union[Mapping[int, Tensor], Sequence[Tensor], Tensor]


def _build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool,
               last_bn_affine: bool = False) -> nn.Sequential:
    """MoCo v3's ``_build_mlp``: Linear(bias=False) [-> BN -> ReLU] ... -> Linear [-> BN].

    The Linear layers have no bias because every one of them is followed by a BatchNorm that would
    cancel it (except the last when ``last_bn`` is False, where we still follow MoCo v3 / SDSSL).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            # SimCLR's design, with gamma/beta removed as in MoCo v3 ("for simplicity").
            layers.append(nn.BatchNorm1d(d_out, affine=last_bn_affine))
    return nn.Sequential(*layers)


class ProjectionMLP(nn.Sequential):
    """Projector g: ``num_layers`` bias-free Linear layers, BN + ReLU between them.

    ``last_bn=True`` (SimCLR, MoCo v3) appends ``BatchNorm1d(out_dim, affine=last_bn_affine)``;
    BYOL uses ``last_bn=False``. Input (B, in_dim) -> output (B, out_dim).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256, num_layers: int = 3,
                 last_bn: bool = True, last_bn_affine: bool = False) -> None:
        super().__init__(*_build_mlp(num_layers, in_dim, hidden_dim, out_dim, last_bn, last_bn_affine))


class PredictionMLP(nn.Sequential):
    """Predictor q (BYOL, MoCo v3): 2 bias-free Linear layers, hidden 4096, dim -> dim.

    MoCo v3's ViT predictor keeps the final ``BatchNorm1d(affine=False)`` (``last_bn=True``, the
    default of ``_build_mlp``); BYOL's predictor ends in a plain Linear (``last_bn=False``).
    """

    def __init__(self, dim: int = 256, hidden_dim: int = 4096, num_layers: int = 2,
                 last_bn: bool = True) -> None:
        super().__init__(*_build_mlp(num_layers, dim, hidden_dim, dim, last_bn))


@dataclass
class LayerwiseOutputs:
    """Per-layer, per-view head outputs of one network for the LOCAL batch (B images, 2 views).

    Keys are 0-based block indices; ``final_layer`` is the last block (num_blocks - 1). Every value
    is a list with one (B, out_dim) tensor per view, in view order [view 0, view 1].

    - ``proj[l][v]``: projection of block l's CLS feature of view v (with gradient).
    - ``pred[l][v]``: predictor output on ``proj[l][v]`` (BYOL / MoCo v3; empty for SimCLR or the
      teacher).
    - ``pred_detached[l][v]``: the same predictor run a second time on ``proj[l][v].detach()``; used
      by SDSSL's predictor-only term, so its gradient reaches only predictor parameters. Empty when
      not requested.
    """

    final_layer: int
    proj: dict[int, list[Tensor]]
    pred: dict[int, list[Tensor]] = field(default_factory=dict)
    pred_detached: dict[int, list[Tensor]] = field(default_factory=dict)

    @property
    def distilled_layers(self) -> list[int]:
        """Blocks other than the final one that have a projection, ascending."""
        return sorted(l for l in self.proj if l != self.final_layer)

    @property
    def final_proj(self) -> list[Tensor]:
        return self.proj[self.final_layer]


class LayerwiseHeads(nn.Module):
    """A projector per distilled block plus the final block's projector (and predictors).

    Args:
        num_blocks: depth of the backbone; the final layer is block ``num_blocks - 1``.
        embed_dim: width of the CLS features fed in.
        method: "simclr", "byol" or "mocov3" (decides last-BN and whether predictors exist).
        distilled_layers: 0-based blocks distilled toward the final one. ``None`` = every block but
            the last (SDSSL's default); ``[]`` = plain baseline (final projector/predictor only).
        out_dim: projection / prediction width (256).
        layer_hidden_dim: hidden width of intermediate projectors (2048).
        final_hidden_dim: hidden width of the final projector (4096).
        predictor_hidden_dim: hidden width of every predictor (4096).
        proj_layers / pred_layers: MLP depths (3 / 2).
    """

    def __init__(self, num_blocks: int, embed_dim: int, method: str,
                 distilled_layers: Sequence[int] | None = None, out_dim: int = 256,
                 layer_hidden_dim: int = 2048, final_hidden_dim: int = 4096,
                 predictor_hidden_dim: int = 4096, proj_layers: int = 3, pred_layers: int = 2) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.final_layer = num_blocks - 1
        if distilled_layers is None:
            distilled_layers = range(num_blocks - 1)
        layers = sorted(set(int(l) for l in distilled_layers))
        bad = [l for l in layers if not 0 <= l < self.final_layer]
        if bad:
            raise ValueError(f"distilled layers must be in [0, {self.final_layer - 1}], got {bad}")
        self.distilled_layers: list[int] = layers
        self.layers: list[int] = layers + [self.final_layer]

        # BYOL ends its projector with a plain Linear; SimCLR and MoCo v3 with BN(affine=False).
        proj_last_bn = method != "byol"
        self.projectors = nn.ModuleDict({
            str(l): ProjectionMLP(embed_dim,
                                  final_hidden_dim if l == self.final_layer else layer_hidden_dim,
                                  out_dim, proj_layers, last_bn=proj_last_bn)
            for l in self.layers
        })
        self.predictors: nn.ModuleDict | None = None
        if method in ("byol", "mocov3"):
            # MoCo v3's ViT predictor keeps the last BN; BYOL's does not.
            self.predictors = nn.ModuleDict({
                str(l): PredictionMLP(out_dim, predictor_hidden_dim, pred_layers,
                                      last_bn=(method == "mocov3"))
                for l in self.layers
            })

    def forward(self, views: Sequence[LayerFeatures], *, final_only: bool = False,
                predict: bool = True, detached_predictions: bool = False) -> LayerwiseOutputs:
        """Project every view's per-block features.

        Args:
            views: one ``LayerFeatures`` per view; ``views[v][l]`` is (B, embed_dim).
            final_only: only the final block (e.g. for the momentum teacher).
            predict: run the predictors (ignored for SimCLR).
            detached_predictions: also run each predictor on the detached projections (the SDSSL
                predictor-only term). This is a second predictor forward; its BatchNorm sees the
                same batch, so it outputs the same values, but running statistics are updated twice.

        Each view goes through the MLPs separately, so BatchNorm statistics are per view, as in
        MoCo v3 (``self.predictor(self.base_encoder(x1))``, then x2).
        """
        layers = [self.final_layer] if final_only else self.layers
        out = LayerwiseOutputs(final_layer=self.final_layer, proj={})
        for l in layers:
            out.proj[l] = [self.projectors[str(l)](feats[l]) for feats in views]
        if self.predictors is not None and predict:
            for l in layers:
                predictor = self.predictors[str(l)]
                out.pred[l] = [predictor(p) for p in out.proj[l]]
                if detached_predictions:
                    out.pred_detached[l] = [predictor(p.detach()) for p in out.proj[l]]
        return out


__all__ = ["LayerFeatures", "LayerwiseHeads", "LayerwiseOutputs", "PredictionMLP", "ProjectionMLP",
           "METHODS"]
