"""How much of a patch token do the ViT's blocks write? Per block, against the patch embedding.

A pre-norm ViT adds each block's output to a residual stream that starts as the patch embedding
(plus position). If the blocks add little, every block's patch tokens after the final norm point
where the embedding's do, and a patch k-NN reads a linear function of the pixels whatever the
training did to the blocks. This prints, for each run and for the same network at its random
initialisation, per block over the patch tokens of evaluation images (the run's data, val split,
whole images as dense-eval sees them):

- resid / embed: mean ‖block output − embedding‖ / mean ‖embedding‖ (how much the blocks added);
- token-specific: the same for the part of the addition that differs between the tokens of one
  image (an addition shared by every token of an image cannot tell its regions apart);
- cos: mean cosine between a token after the final norm and its embedding after the final norm.

    python bench/token_residuals.py RUN [RUN ...] [--images 128] [--out bench/results/token_residuals.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402  (first: sets paths and the OpenMP wait policy)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from glsd_cli.data.segmentation import DenseEvalDataset  # noqa: E402
from glsd_cli.data.sources import open_source  # noqa: E402
from glsd_cli.eval.loading import backbone_to_evaluate  # noqa: E402


@torch.no_grad()
def per_block(vit: torch.nn.Module, images: torch.Tensor) -> list[dict]:
    """The three statistics of every block's patch tokens (timm's VisionTransformer, prefix tokens dropped)."""
    prefix = vit.num_prefix_tokens
    # The stem of timm's forward_features, step by step: forward_intermediates gives each block's output
    # but not the embedding the blocks add to.
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    embed = h[:, prefix:]
    embed_norm = embed.norm(dim=-1).mean()
    rows = []
    for number, block in enumerate(vit.blocks, start=1):
        h = block(h)
        added = h[:, prefix:] - embed
        specific = added - added.mean(dim=1, keepdim=True)
        cos = F.cosine_similarity(vit.norm(h[:, prefix:]), vit.norm(embed), dim=-1).mean()
        rows.append({"block": number, "resid_over_embed": round(float(added.norm(dim=-1).mean() / embed_norm), 4),
                     "token_specific_over_embed": round(float(specific.norm(dim=-1).mean() / embed_norm), 4),
                     "cos_to_embedding": round(float(cos), 4)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--images", type=int, default=128, help="evaluation images (the first of the val split)")
    parser.add_argument("--out", type=Path, default=RESULTS / "token_residuals.json")
    args = parser.parse_args()
    device = torch.device("cpu")
    report = []
    for run in args.runs:
        entry = {"run": str(run)}
        cfg, trained, _, _ = backbone_to_evaluate(run, device)
        val = open_source(cfg.data.train, "val")
        size = cfg.data.global_crop_size
        dataset = Subset(DenseEvalDataset(val, size, size), range(min(args.images, len(val))))
        images = torch.cat([x for x, _, _ in DataLoader(dataset, batch_size=64)])
        entry["data"] = val.uri
        for name, random_init in (("trained", False), ("random_init", True)):
            backbone = backbone_to_evaluate(run, device, random_init=True)[1] if random_init else trained
            entry[name] = per_block(backbone.model.eval(), images)
        report.append(entry)
        print(run)
        print(f"  {'block':>5} | {'resid / embed':>22} | {'token-specific':>22} | {'cos to embedding':>22}")
        print(f"  {'':>5} | {'trained   random init':>22} | {'trained   random init':>22} | {'trained   random init':>22}")
        for t, r in zip(entry["trained"], entry["random_init"]):
            print(f"  {t['block']:>5} | {t['resid_over_embed']:>9.3f} {r['resid_over_embed']:>12.3f} | "
                  f"{t['token_specific_over_embed']:>9.3f} {r['token_specific_over_embed']:>12.3f} | "
                  f"{t['cos_to_embedding']:>9.3f} {r['cos_to_embedding']:>12.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
