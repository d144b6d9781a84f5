"""`glsd knn-eval`: features of a checkpoint's teacher backbone → DINO's weighted k-NN → a result file."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from glsd_cli.data.sources import open_source
from glsd_cli.engine.checkpoint import atomic_write_bytes
from glsd_cli.engine.metrics import console
from glsd_cli.engine.trainer import pick_device
from glsd_cli.errors import DataError
from glsd_cli.eval.features import extract_features
from glsd_cli.eval.knn import knn_classify
from glsd_cli.eval.loading import load_pretrained
from glsd_cli.methods import build_method


def open_eval_pair(cfg_train_uri: str, train_uri: str | None, val_uri: str | None):
    """The labelled bank and query sources: explicit URIs, else the run's data with its held-out split."""
    bank = open_source(train_uri or cfg_train_uri, "train")
    queries = open_source(val_uri or train_uri or cfg_train_uri, "val")
    for what, src in (("training", bank), ("test", queries)):
        if not src.labelled:
            raise DataError(f"k-NN needs labelled {what} data, but {src.uri} has no labels; pass --train-data/--val-data")
    if bank.classes != queries.classes:
        raise DataError(f"the training data ({len(bank.classes)} classes) and test data ({len(queries.classes)} "
                        "classes) have different class lists")
    return bank, queries


def run_knn_eval(checkpoint: Path, train_uri: str | None, val_uri: str | None, ks: tuple[int, ...],
                 temperature: float, device_name: str = "auto", batch_size: int = 256,
                 random_init: bool = False) -> dict:
    device = pick_device(device_name)
    cfg, method, file = load_pretrained(checkpoint, device)
    if random_init:
        # The same network as the run's at step 0: pretrain seeds with run.seed before building it.
        torch.manual_seed(cfg.run.seed)
        method = build_method(cfg).to(device).eval()
    bank, queries = open_eval_pair(cfg.data.train, train_uri, val_uri)
    backbone = method.backbone("teacher")
    size = cfg.data.global_crop_size
    xb, yb = extract_features(backbone, bank, size, device, batch_size=batch_size, quiet=False, description="bank")
    xq, yq = extract_features(backbone, queries, size, device, batch_size=batch_size, quiet=False, description="test")
    res = knn_classify(xb, yb, xq, yq, len(bank.classes), ks=ks, temperature=temperature)
    console.print(f"k-NN of the {'randomly initialised' if random_init else 'pre-trained'} teacher backbone "
                  f"({len(bank)} train / {len(queries)} test images, T = {temperature}):")
    for k, acc in res.items():
        console.print(f"k = {k:>4}: top-1 {acc['top1']:6.2f}   top-5 {acc['top5']:6.2f}")
    headline = 20 if 20 in res else ks[0]
    result = {
        "checkpoint": str(file), "train_data": bank.uri, "val_data": queries.uri,
        "backbone": "random-init" if random_init else "teacher",
        "num_train": len(bank), "num_test": len(queries), "temperature": temperature,
        "results": {str(k): v for k, v in res.items()},
        "summary": {"k": headline, "top1": res[headline]["top1"], "top5": res[headline]["top5"]},
    }
    name = "knn-random-init.json" if random_init else "knn.json"
    atomic_write_bytes(file.parent / name, json.dumps(result, indent=2).encode())
    return result
