"""`glsd knn-eval`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from glsd_cli.errors import GlsdError

DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda")]


def _parse_ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise GlsdError(f"{what} must be a comma-separated list of integers, got '{text}'") from None


def command(
    checkpoint: Annotated[Path, typer.Argument(help="a run directory or a .safetensors checkpoint")],
    train_data: Annotated[Optional[str], typer.Option("--train-data", help="labelled data for the k-NN bank (default: the run's data, train split)")] = None,
    val_data: Annotated[Optional[str], typer.Option("--val-data", help="labelled test data (default: the run's data, held-out split)")] = None,
    k: Annotated[str, typer.Option("--k", help="neighbour counts, comma-separated")] = "10,20,100,200",
    temperature: Annotated[float, typer.Option(help="temperature T of the exp(sim/T) vote")] = 0.07,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="images per feature-extraction batch")] = 256,
    random_init: Annotated[bool, typer.Option("--random-init", help="evaluate the run's network at its random initialisation instead (a baseline)")] = False,
) -> None:
    """k-NN accuracy (DINO's weighted vote) of the teacher backbone's CLS features."""
    from glsd_cli.eval.knn_command import run_knn_eval

    result = run_knn_eval(checkpoint, train_data, val_data, tuple(_parse_ints(k, "--k")), temperature,
                          device, batch_size, random_init)
    typer.echo(json.dumps(result["summary"]))
