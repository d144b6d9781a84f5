"""`glsd knn-eval`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from glsd_cli.commands.options import CheckpointArg, DeviceOpt, parse_list

LAYERS_HELP = ("also evaluate intermediate blocks: 'all' or block numbers counted from 1 like 4,8,12 "
               "(-1 = the last block); each block's CLS goes through the shared final norm. Prints a per-block table")


def command(
    checkpoint: CheckpointArg,
    train_data: Annotated[Optional[str], typer.Option("--train-data", help="labelled data for the k-NN bank (default: the run's data, train split)")] = None,
    val_data: Annotated[Optional[str], typer.Option("--val-data", help="labelled test data (default: the run's data, held-out split)")] = None,
    k: Annotated[str, typer.Option("--k", help="neighbour counts, comma-separated")] = "10,20,100,200",
    temperature: Annotated[float, typer.Option(help="temperature T of the exp(sim/T) vote")] = 0.07,
    layers: Annotated[Optional[str], typer.Option("--layers", help=LAYERS_HELP)] = None,
    student: Annotated[bool, typer.Option("--student", help="evaluate the student backbone instead of the teacher")] = False,
    train_fraction: Annotated[Optional[float], typer.Option("--train-fraction", help="use this stratified, seeded fraction of the training data as the bank (e.g. 0.01, 0.1)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the --train-fraction subset")] = 0,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="images per feature-extraction batch")] = 256,
    num_workers: Annotated[Optional[int], typer.Option("--num-workers", help="feature-extraction loader workers (default: the run's data.num_workers)")] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="evaluate the run's network at its random initialisation instead (a baseline)")] = False,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="reuse and store features in a features/ folder beside the checkpoint; an entry is used only for the same backbone weights, data and layers")] = True,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="folder of the feature cache (default: features/ beside the checkpoint)")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="result JSON path (a CSV is written beside it); default: knn*.json beside the checkpoint")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """k-NN accuracy (DINO's weighted vote) of a backbone's CLS features, for the final block or per block."""
    from glsd_cli.eval.knn_command import KnnOptions, run_knn_eval

    opts = KnnOptions(train_uri=train_data, val_uri=val_data, ks=parse_list(k, int, "--k"), temperature=temperature,
                      layers=layers, student=student, train_fraction=train_fraction, seed=seed, device=device,
                      batch_size=batch_size, num_workers=num_workers, random_init=random_init, cache=cache, cache_dir=cache_dir, output=output,
                      quiet=quiet)
    result = run_knn_eval(checkpoint, opts)
    typer.echo(json.dumps(result["summary"]))
