"""`glsd dense-eval`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from glsd_cli.commands.options import CheckpointArg, DeviceOpt, parse_list

LAYERS_HELP = ("evaluate these blocks' patch tokens instead of the final block's: 'all' or block numbers counted "
               "from 1 like 2,4 (-1 = the last); each block's tokens go through the shared final norm. Prints a "
               "per-block table")


def command(
    checkpoint: CheckpointArg,
    train_data: Annotated[Optional[str], typer.Option("--train-data", help="images with masks to train the probe on and to take k-NN neighbours from (default: the run's data, train split)")] = None,
    val_data: Annotated[Optional[str], typer.Option("--val-data", help="images with masks the scores are reported on (default: the training data's val split)")] = None,
    layers: Annotated[Optional[str], typer.Option("--layers", help=LAYERS_HELP)] = None,
    k: Annotated[int, typer.Option("--k", help="neighbours of each evaluation token in the patch k-NN")] = 20,
    temperature: Annotated[float, typer.Option(help="temperature T of the k-NN's exp(sim/T) vote")] = 0.07,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="side the whole image is resized to, px (default: the run's global crop size)")] = None,
    mask_size: Annotated[Optional[int], typer.Option("--mask-size", help="side masks are resized to (nearest) and scored at, px (default: the image size)")] = None,
    epochs: Annotated[int, typer.Option(help="epochs of the linear probes")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="images per probe step and per extraction batch")] = 32,
    # No defaults here: the probe's own (eval/dense_probe.py) apply. Importing it to show them would
    # load torch before any argument is read, and make `glsd --bogus` take seconds.
    lr_grid: Annotated[Optional[str], typer.Option("--lr-grid", help="probe learning rates per 256 images, trained at once; the one with the best holdout mIoU is reported (default: 0.01 to 1, five values)")] = None,
    lr: Annotated[Optional[float], typer.Option(help="the probe's lr per 256 images when nothing is selected (--holdout-fraction 0; default 0.1)")] = None,
    holdout_fraction: Annotated[float, typer.Option("--holdout-fraction", help="fraction of the training images held out (seeded) to choose the probe's lr on; 0: train on all, use --lr")] = 0.1,
    train_fraction: Annotated[Optional[float], typer.Option("--train-fraction", help="use this seeded, stratified fraction of the training images (their masks) for the probe and the k-NN bank: a low-label regime")] = None,
    seed: Annotated[int, typer.Option(help="seed of the probes, their data order, the holdout and the --train-fraction subset")] = 0,
    student: Annotated[bool, typer.Option("--student", help="evaluate the student backbone instead of the teacher")] = False,
    random_init: Annotated[bool, typer.Option("--random-init", help="evaluate the run's network at its random initialisation instead (a baseline)")] = False,
    device: DeviceOpt = "auto",
    num_workers: Annotated[Optional[int], typer.Option("--num-workers", help="feature-extraction loader workers (default: the run's data.num_workers)")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="reuse and store features in features/ beside the checkpoint")] = True,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="folder of the feature cache")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="result JSON path (CSV beside it); default: dense*.json beside the checkpoint")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Dense evaluation of a frozen backbone's patch tokens: linear segmentation probe and patch k-NN, mIoU."""
    from glsd_cli.eval.dense_command import DenseOptions, run_dense_eval

    probe_lrs = {"lr": lr} if lr is not None else {}
    if lr_grid is not None:
        probe_lrs["lr_grid"] = parse_list(lr_grid, float, "--lr-grid")
    opts = DenseOptions(train_uri=train_data, val_uri=val_data, layers=layers, k=k, temperature=temperature,
                        image_size=image_size, mask_size=mask_size, epochs=epochs, batch_size=batch_size,
                        holdout_fraction=holdout_fraction, train_fraction=train_fraction, seed=seed,
                        student=student, random_init=random_init, device=device, num_workers=num_workers,
                        cache=cache, cache_dir=cache_dir, output=output, quiet=quiet, **probe_lrs)
    result = run_dense_eval(checkpoint, opts)
    typer.echo(json.dumps(result["summary"]))
