"""`glsd linear-eval`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from glsd_cli.commands.options import CheckpointArg, DeviceOpt, parse_list



def command(
    checkpoint: CheckpointArg,
    train_data: Annotated[Optional[str], typer.Option("--train-data", help="labelled training data (default: the run's data, train split)")] = None,
    val_data: Annotated[Optional[str], typer.Option("--val-data", help="labelled data the accuracy is reported on (default: the training data's held-out split); nothing is selected on it")] = None,
    select_data: Annotated[Optional[str], typer.Option("--select-data", help="labelled data to select the lr and epoch on, instead of a holdout carved from --train-data")] = None,
    holdout_fraction: Annotated[float, typer.Option("--holdout-fraction", help="fraction of the training data held out (stratified, seeded) for selecting the lr and epoch; 0: train on all of it, select nothing")] = 0.1,
    cached: Annotated[bool, typer.Option("--cached", help="extract the frozen features once (no augmentation) and train a grid of learning rates on them: much faster")] = False,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="augmented mode: RandomResizedCrop + flip (DINO), or the evaluation transform")] = True,
    min_crop_scale: Annotated[float, typer.Option("--min-crop-scale", help="augmented mode: smallest RandomResizedCrop area fraction (0.08 as DINO; larger for tiny images)")] = 0.08,
    layers: Annotated[Optional[str], typer.Option("--layers", help="one probe per block instead: 'all' or block numbers counted from 1 like 4,8,12 (-1 = the last); prints a per-block table")] = None,
    n_last_blocks: Annotated[Optional[int], typer.Option("--n-last-blocks", help="concatenate the CLS of the last n blocks (default: 4; 1 for ViT-B and wider, as DINO)")] = None,
    avgpool_patchtokens: Annotated[Optional[bool], typer.Option("--avgpool-patchtokens/--no-avgpool-patchtokens", help="also concatenate the mean patch token (default: only for ViT-B and wider, as DINO)")] = None,
    student: Annotated[bool, typer.Option("--student", help="probe the student backbone instead of the teacher")] = False,
    epochs: Annotated[int, typer.Option(help="training epochs")] = 100,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="images per step (also per extraction batch)")] = 256,
    lr: Annotated[float, typer.Option(help="the protocol's learning rate per 256 images (scaled by batch/256)")] = 0.001,
    lr_grid: Annotated[Optional[str], typer.Option("--lr-grid", help="learning rates per 256 images trained at once, comma-separated (default: DINOv2's 13 from 1e-5 to 0.1 with --cached, only --lr otherwise)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the probes, the data order, the augmentation and the holdout")] = 0,
    device: DeviceOpt = "auto",
    num_workers: Annotated[Optional[int], typer.Option("--num-workers", help="data-loading workers: feature extraction and the augmented mode (default: the run's)")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="reuse and store frozen features in features/ beside the checkpoint")] = True,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="folder of the feature cache")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="result JSON path (CSV beside it); default: linear*.json beside the checkpoint")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Linear probe on a frozen backbone (DINO's protocol); reports the final epoch, and what it selects on a holdout, separately."""
    from glsd_cli.eval.linear import LinearOptions, run_linear_eval

    opts = LinearOptions(train_uri=train_data, val_uri=val_data, select_uri=select_data,
                         holdout_fraction=holdout_fraction, seed=seed, layers=layers, n_last_blocks=n_last_blocks,
                         avgpool=avgpool_patchtokens, student=student, cached=cached, augment=augment,
                         min_crop_scale=min_crop_scale, epochs=epochs,
                         batch_size=batch_size, lr=lr, lr_grid=None if lr_grid is None else parse_list(lr_grid, float, "--lr-grid"), device=device,
                         num_workers=num_workers, cache=cache, cache_dir=cache_dir, output=output, quiet=quiet)
    result = run_linear_eval(checkpoint, opts)
    typer.echo(json.dumps(result["summary"]))
