"""`glsd visualize attention | matches | embedding`: PNG pictures of what a checkpoint learned.

Thin: arguments -> checkpoint and image -> glsd_cli.viz -> PNG paths, one per line on stdout.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Optional

import typer

from glsd_cli.commands.options import DeviceOpt
from glsd_cli.errors import GlsdError

app = typer.Typer(help="Pictures: attention maps, token matches, feature embeddings (PNG files).",
                  no_args_is_help=True)

CheckpointArg = Annotated[Path, typer.Argument(help="a run directory or a .safetensors pre-training checkpoint")]
# The help of viz/images.read_image's argument; that module is not imported here, as it loads torch.
ImageArg = Annotated[str, typer.Argument(help="an image file (any format Pillow reads), or synthetic:INDEX for "
                                              "image INDEX of the built-in val set")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="folder for the PNG files (created if missing)")]
StudentOpt = Annotated[bool, typer.Option("--student", help="use the student backbone instead of the teacher")]


def _load(checkpoint: Path, device: str):
    """(config, method, torch device) with the weights of `checkpoint`, in eval mode."""
    from glsd_cli.engine.precision import pick_device
    from glsd_cli.eval.loading import load_pretrained

    dev = pick_device(device)
    cfg, method, _ = load_pretrained(checkpoint, dev)
    return cfg, method, dev


def _echo(paths: list[Path]) -> None:
    for p in paths:
        typer.echo(str(p))


@app.command("attention")
def attention(
    checkpoint: CheckpointArg,
    image: ImageArg,
    out: OutOpt,
    size: Annotated[Optional[int], typer.Option("--size", help="shorter image side fed to the model, px (default: the run's global crop size)")] = None,
    student: StudentOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Last block's CLS attention of each head, and their mean, as heat maps over the image (DINO's figure)."""
    import torch

    from glsd_cli.viz.attention import check_attention_model, last_block_cls_attention, prepare_image, render_attention
    from glsd_cli.viz.images import read_image

    if size is not None and size < 1:
        raise GlsdError(f"--size must be a positive number of pixels, got {size}")
    cfg, method, dev = _load(checkpoint, device)
    backbone = method.backbone("student" if student else "teacher")
    check_attention_model(backbone, cfg.model.arch)  # before reading the image: the first problem is this one
    side = size or cfg.data.global_crop_size
    crop, x = prepare_image(read_image(image, side), side, backbone.patch_size)
    with torch.no_grad():
        att = last_block_cls_attention(backbone, x.to(dev), cfg.model.arch)
    att.probs = att.probs.cpu()
    paths = render_attention(crop, att, out)
    rows, cols = att.grid
    typer.echo(f"{att.probs.shape[1]} heads, {rows}x{cols} patch grid, {crop.shape[-1]}x{crop.shape[-2]} px", err=True)
    _echo(paths)


@app.command("matches")
def matches(
    checkpoint: CheckpointArg,
    image: ImageArg,
    out: OutOpt,
    seed: Annotated[int, typer.Option("--seed", help="seed of the sampled views (sample 0 of epoch 0)")] = 0,
    student_view: Annotated[str, typer.Option("--student-view", help="local | global: which view the student's tokens come from (local falls back to global when the run has no local crops)")] = "local",
    device: DeviceOpt = "auto",
) -> None:
    """Two sampled views side by side with lines between matched tokens: geometric and similarity matching."""
    import torch

    from glsd_cli.pretraining import make_views
    from glsd_cli.viz import matches as vm
    from glsd_cli.viz.drawing import denormalise, save_png
    from glsd_cli.viz.images import read_image

    if student_view not in ("local", "global"):
        raise GlsdError(f"--student-view must be local or global, got '{student_view}'")
    cfg, method, dev = _load(checkpoint, device)
    img = read_image(image, cfg.data.global_crop_size)
    pair = vm.sample_views(make_views(cfg, method), img, seed, student_view)
    with torch.no_grad():
        # As in training (methods/glsd.py): the student network sees the student view, the teacher
        # the teacher view; both give their patch tokens after the final norm.
        s_tok = method.backbone("student").forward_tokens(pair.student[None].to(dev))
        t_tok = method.backbone("teacher").forward_tokens(pair.teacher[None].to(dev))
    s_rgb, t_rgb = denormalise(pair.student), denormalise(pair.teacher)
    outline = vm.student_outline_in_teacher(pair)
    hinge = cfg.method.local.hinge if cfg.method.name == "dino" else True  # two-view methods have no local loss
    geo = vm.geometric_matches(pair, s_tok.grid, t_tok.grid, hinge=hinge)
    sim = vm.similarity_matches(pair, s_tok.patches[0].cpu(), t_tok.patches[0].cpu(), s_tok.grid, t_tok.grid)
    grids = f"{pair.student_name} {s_tok.grid[0]}x{s_tok.grid[1]} -> {pair.teacher_name} {t_tok.grid[0]}x{t_tok.grid[1]}"
    n = geo.valid.numel()
    kept = int(geo.valid.sum())
    paths = [
        save_png(vm.draw_matches(s_rgb, t_rgb, geo, f"geometric matching{' (hinge)' if hinge else ''}: {grids}", outline),
                 out / "matches-geometric.png"),
        save_png(vm.draw_matches(s_rgb, t_rgb, sim, f"similarity matching: {grids}", outline),
                 out / "matches-similarity.png"),
    ]
    agree = int((geo.index == sim.index)[geo.valid].sum())
    typer.echo(f"geometric: {kept} of {n} student tokens matched ({n - kept} dropped by the hinge); "
               f"similarity agrees with geometric on {agree} of them", err=True)
    _echo(paths)


@app.command("embedding")
def embedding(
    checkpoint: CheckpointArg,
    out: OutOpt,
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="dataset URI or folder (default: the run's training data)")] = None,
    split: Annotated[str, typer.Option("--split", help="train | val")] = "val",
    max_images: Annotated[int, typer.Option("--max-images", help="use at most this many images, spread evenly over the split")] = 2000,
    method_name: Annotated[str, typer.Option("--method", help="pca | tsne (t-SNE needs scikit-learn)")] = "pca",
    student: StudentOpt = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="images per feature-extraction batch")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="seed of t-SNE and of the drawing order")] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """2-D projection (PCA or t-SNE) of the backbone's CLS features, coloured by label, with a legend."""
    from glsd_cli.data.base import SubsetSource
    from glsd_cli.data.sources import open_source
    from glsd_cli.eval.features import extract_features
    from glsd_cli.viz import embedding as ve
    from glsd_cli.viz.drawing import save_png

    method_name = method_name.lower()
    if method_name not in ("pca", "tsne"):
        raise GlsdError(f"--method must be pca or tsne, got '{method_name}'")
    if max_images < 2:
        raise GlsdError(f"--max-images must be at least 2, got {max_images}")
    if batch_size < 1:
        raise GlsdError(f"--batch-size must be positive, got {batch_size}")
    # Fail before the minutes of feature extraction, not after them.
    if method_name == "tsne" and importlib.util.find_spec("sklearn") is None:
        raise GlsdError("--method tsne needs scikit-learn (pip install scikit-learn); --method pca works without it")
    cfg, method, dev = _load(checkpoint, device)
    uri = data or cfg.data.train
    source = open_source(uri, split)
    subset = SubsetSource(source, ve.evenly_spaced(len(source), max_images))
    backbone = method.backbone("student" if student else "teacher")
    feats, labels = extract_features(backbone, subset, cfg.data.global_crop_size, dev, batch_size=batch_size)
    which = "student" if student else "teacher"
    labelled = f"of {len(source.classes)} classes" if source.classes else "(unlabelled)"
    title = (f"{'PCA' if method_name == 'pca' else 't-SNE'} of {which} CLS features: {len(subset)} images "
             f"{labelled}\n{uri} ({split})")
    if method_name == "pca":
        points, explained = ve.pca_2d(feats)
        title += f"   axes: {100 * explained[0]:.0f}% and {100 * explained[1]:.0f}% of the variance"
    else:
        points = ve.tsne_2d(feats, seed)
    picture = ve.draw_embedding(points, labels.numpy(), list(source.classes), title, seed)
    _echo([save_png(picture, out / f"embedding-{method_name}.png")])


@app.command("segmentation")
def segmentation(
    checkpoint: CheckpointArg,
    out: OutOpt,
    train_data: Annotated[Optional[str], typer.Option("--train-data", help="images with masks the k-NN takes its neighbours from (default: the run's data, train split)")] = None,
    val_data: Annotated[Optional[str], typer.Option("--val-data", help="images with masks to draw (default: the training data's val split)")] = None,
    num_images: Annotated[int, typer.Option("--num-images", "-n", help="evaluation images to draw, spread evenly over the split")] = 4,
    k: Annotated[int, typer.Option("--k", help="neighbours of each token in the patch k-NN")] = 20,
    student: StudentOpt = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="images per feature-extraction batch")] = 32,
    device: DeviceOpt = "auto",
) -> None:
    """Evaluation images with their true masks and the predicted ones: the patch k-NN's, and the linear
    probe's when `glsd dense-eval` of the same backbone left one beside the checkpoint."""
    import json

    import torch

    from glsd_cli.data.base import SubsetSource
    from glsd_cli.data.segmentation import sample_with_mask
    from glsd_cli.engine.precision import pick_device
    from glsd_cli.eval.dense import knn_pixel_scores, pixel_scores
    from glsd_cli.eval.dense_command import open_segmentation_pair
    from glsd_cli.eval.dense_probe import load_selected_probe
    from glsd_cli.eval.feature_cache import FeatureCache
    from glsd_cli.eval.features import FeatureRequest, extract_representations
    from glsd_cli.eval.loading import load_pretrained
    from glsd_cli.eval.report import result_paths
    from glsd_cli.viz.drawing import save_png
    from glsd_cli.viz.embedding import evenly_spaced
    from glsd_cli.viz.segmentation import draw_predictions

    if num_images < 1 or k < 1 or batch_size < 1:
        raise GlsdError("--num-images, --k and --batch-size must be positive")
    dev = pick_device(device)
    cfg, method, file = load_pretrained(checkpoint, dev)
    which = "student" if student else "teacher"
    backbone = method.backbone(which)
    train, val = open_segmentation_pair(cfg, train_data, val_data)
    size = cfg.data.global_crop_size
    request = FeatureRequest(None, mask_size=size)  # what dense-eval extracts by default: its cache serves here
    cache = FeatureCache.for_backbone(file, which, backbone, cfg.model.model_dump_json())
    train_feats, train_masks = cache.features(backbone, train, size, dev, request, batch_size)
    shown = SubsetSource(val, evenly_spaced(len(val), num_images))
    feats, masks = extract_representations(backbone, shown, size, dev, request, batch_size)
    num_classes = len(train.classes)
    knn = [s.argmax(1) for _, s in knn_pixel_scores(train_feats["patches"][0], train_masks, feats["patches"][0], size,
                                                    num_classes, k, device=dev)]
    predictions = {"k-NN": [p.cpu().numpy() for p in torch.cat(knn)]}
    results = result_paths(file, "dense-student" if student else "dense")[0]
    note = f"no linear probe: run `glsd dense-eval {checkpoint}{' --student' if student else ''}` first to draw one"
    if results.is_file():
        result = json.loads(results.read_text())
        matching = (result["image_size"] == size and result["mask_size"] == size
                    and result["rows"][-1]["block"] == backbone.num_blocks)
        head = load_selected_probe(result) if matching else None
        if head is not None:
            with torch.no_grad():
                logits = head.to(dev)(feats["patches"][0].to(dev))
            predictions = {"linear": [p.cpu().numpy() for p in pixel_scores(logits, size).argmax(1)], **predictions}
            note = f"linear probe of {results} (lr {result['rows'][-1]['linear_lr']:g})"
        elif not matching:
            note = f"no linear probe: {results} is of other sizes or blocks; rerun dense-eval with its defaults"
    images = [sample_with_mask(shown, i)[0].permute(1, 2, 0).numpy() for i in range(len(shown))]
    picture = draw_predictions(images, [m.numpy() for m in masks], predictions, list(train.classes))
    typer.echo(f"{len(shown)} images of {val.uri} ({val.split}); {note}", err=True)
    _echo([save_png(picture, out / "segmentation.png")])
