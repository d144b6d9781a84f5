"""`glsd finetune`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from glsd_cli.commands.options import CheckpointArg, DeviceOpt


def command(
    checkpoint: CheckpointArg,
    train_data: Annotated[Optional[str], typer.Option("--train-data", help="labelled training data (default: the run's data, train split)")] = None,
    val_data: Annotated[Optional[str], typer.Option("--val-data", help="labelled data the accuracy is reported on (default: the training data's held-out split); nothing is selected on it")] = None,
    select_data: Annotated[Optional[str], typer.Option("--select-data", help="labelled data to select the best epoch on, instead of a holdout carved from --train-data")] = None,
    holdout_fraction: Annotated[float, typer.Option("--holdout-fraction", help="fraction of the training data held out (stratified, seeded) to select the best epoch on; 0: train on all of it, select nothing")] = 0.1,
    out: Annotated[Optional[Path], typer.Option("--out", help="output folder (default: finetune/ beside the checkpoint)")] = None,
    student: Annotated[bool, typer.Option("--student", help="start from the student backbone instead of the teacher")] = False,
    epochs: Annotated[int, typer.Option(help="training epochs")] = 100,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="images per step (even, for mixup/cutmix)")] = 128,
    lr: Annotated[float, typer.Option(help="peak learning rate per 256 images (scaled by batch/256)")] = 5e-4,
    min_lr: Annotated[float, typer.Option("--min-lr", help="learning rate at the end of the cosine")] = 1e-6,
    warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", help="linear warm-up epochs")] = 5,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay (not on biases, norms, tokens)")] = 0.05,
    layer_decay: Annotated[float, typer.Option("--layer-decay", help="layer-wise lr decay: block b of L trains at lr x decay^(L-b) (BEiT; 0.65-0.75)")] = 0.65,
    mixup: Annotated[float, typer.Option(help="mixup alpha (0: off)")] = 0.8,
    cutmix: Annotated[float, typer.Option(help="cutmix alpha (0: off)")] = 1.0,
    smoothing: Annotated[float, typer.Option(help="label smoothing")] = 0.1,
    randaug_magnitude: Annotated[int, typer.Option("--randaug-magnitude", help="RandAugment magnitude 0-10, 2 ops per image (0: off)")] = 9,
    min_crop_scale: Annotated[float, typer.Option("--min-crop-scale", help="smallest RandomResizedCrop area fraction (0.08 as DeiT; larger for tiny images)")] = 0.08,
    drop_path: Annotated[float, typer.Option("--drop-path", help="stochastic depth rate of the last block")] = 0.1,
    seed: Annotated[int, typer.Option(help="seed of the head, the data order, the augmentation, mixup and the holdout")] = 0,
    device: DeviceOpt = "auto",
    precision: Annotated[Optional[str], typer.Option(help="auto | fp32 | bf16 | fp16 (default: the run's)")] = None,
    num_workers: Annotated[Optional[int], typer.Option("--num-workers", help="data-loading workers (default: the run's)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Fine-tune the backbone with a linear head (DeiT/BEiT recipe); saves the classifier as safetensors."""
    from glsd_cli.eval.finetune import FinetuneOptions, run_finetune

    opts = FinetuneOptions(train_uri=train_data, val_uri=val_data, select_uri=select_data,
                           holdout_fraction=holdout_fraction, seed=seed, student=student, epochs=epochs,
                           batch_size=batch_size, lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs,
                           weight_decay=weight_decay, layer_decay=layer_decay, mixup=mixup, cutmix=cutmix,
                           smoothing=smoothing, randaug_magnitude=randaug_magnitude,
                           min_crop_scale=min_crop_scale, drop_path=drop_path,
                           device=device, precision=precision, num_workers=num_workers, out=out, quiet=quiet)
    result = run_finetune(checkpoint, opts)
    typer.echo(json.dumps(result["summary"]))
