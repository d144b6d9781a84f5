"""`glsd knn-eval`: a backbone's frozen features → DINO's weighted k-NN → JSON and CSV result files.

Features come from the on-disk cache when the same backbone saw the same data before
(feature_cache.py), so trying other k, temperatures or layers costs no second extraction.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from glsd_cli.data.subsets import make_subset
from glsd_cli.engine.metrics import console
from glsd_cli.engine.precision import pick_device
from glsd_cli.errors import GlsdError
from glsd_cli.eval.feature_cache import FeatureCache
from glsd_cli.eval.features import FeatureRequest, parse_blocks
from glsd_cli.eval.knn import DEFAULT_KS, DEFAULT_TEMPERATURE, knn_classify
from glsd_cli.eval.loading import backbone_to_evaluate, loader_workers, result_tag
from glsd_cli.eval.report import check_output, pct, print_table, result_paths, write_results
from glsd_cli.eval.splits import open_labelled_pair

HEADLINE_K = 20  # DINO's headline k (docs/algorithms.md §5)


@dataclass
class KnnOptions:
    train_uri: str | None = None
    val_uri: str | None = None
    ks: tuple[int, ...] = DEFAULT_KS
    temperature: float = DEFAULT_TEMPERATURE
    layers: str | None = None            # as typed: 'all' or 1-based block numbers; None: the final CLS
    student: bool = False
    train_fraction: float | None = None  # stratified, seeded subset of the k-NN bank
    seed: int = 0
    device: str = "auto"
    batch_size: int = 256
    num_workers: int | None = None       # feature-extraction loader workers; None: the run's data.num_workers
    random_init: bool = False
    cache: bool = True
    cache_dir: Path | None = None
    output: Path | None = None
    quiet: bool = False


def _check(opts: KnnOptions) -> None:
    check_output(opts.output)
    if not opts.ks or any(k < 1 for k in opts.ks):
        raise GlsdError(f"--k needs positive neighbour counts, got {','.join(map(str, opts.ks)) or 'none'}")
    if opts.temperature <= 0:
        raise GlsdError(f"--temperature must be positive, got {opts.temperature}")
    if opts.batch_size < 1:
        raise GlsdError(f"--batch-size must be positive, got {opts.batch_size}")


def run_knn_eval(checkpoint: Path, opts: KnnOptions) -> dict:
    _check(opts)
    device = pick_device(opts.device)
    cfg, backbone, file, name = backbone_to_evaluate(checkpoint, device, opts.student, opts.random_init)
    bank, queries = open_labelled_pair(cfg, opts.train_uri, opts.val_uri)
    if opts.train_fraction is not None:
        bank = make_subset(bank, fraction=opts.train_fraction, seed=opts.seed)
    blocks = parse_blocks(opts.layers, backbone.num_blocks)
    request = FeatureRequest(tuple(blocks) if blocks is not None else None)
    cache = FeatureCache.for_backbone(file, name, backbone, cfg.model.model_dump_json(), opts.cache_dir, opts.cache)
    size = cfg.data.global_crop_size
    workers = loader_workers(opts.num_workers, cfg)
    xb, yb = cache.features(backbone, bank, size, device, request, opts.batch_size, workers, quiet=opts.quiet,
                            description="train features")
    xq, yq = cache.features(backbone, queries, size, device, request, opts.batch_size, workers, quiet=opts.quiet,
                            description="test features")
    num_classes = len(bank.classes)
    numbers = [b + 1 for b in blocks] if blocks is not None else [backbone.num_blocks]
    per_block = [knn_classify(xb["cls"][i], yb, xq["cls"][i], yq, num_classes, ks=opts.ks,
                              temperature=opts.temperature) for i in range(len(numbers))]
    headline_k = HEADLINE_K if HEADLINE_K in opts.ks else opts.ks[0]
    final = per_block[-1]  # the last block asked for (the final CLS when --layers is not given)
    result = {
        "checkpoint": str(file), "train_data": bank.uri, "val_data": queries.uri, "backbone": name,
        "num_train": len(bank), "num_test": len(queries), "train_fraction": opts.train_fraction,
        "subset_seed": opts.seed if opts.train_fraction is not None else None,
        "temperature": opts.temperature, "image_size": size,
        "results": {str(k): v for k, v in final.items()},
        "summary": {"k": headline_k, "top1": final[headline_k]["top1"], "top5": final[headline_k]["top5"]},
        "feature_cache": {"folder": str(cache.folder) if cache.enabled else None, "hits": cache.hits,
                          "misses": cache.misses},
    }
    if blocks is not None:
        result["summary"]["block"] = numbers[-1]
        result["blocks_numbered_from"] = 1
        result["layers"] = [{"block": n, "results": {str(k): v for k, v in res.items()}}
                            for n, res in zip(numbers, per_block)]
    rows = [{"block": n, **{f"k{k}_{m}": round(v[m], 4) for k, v in res.items() for m in ("top1", "top5")}}
            for n, res in zip(numbers, per_block)]
    tag = result_tag("knn", opts.student, opts.random_init, opts.layers, opts.train_fraction)
    json_path, csv_path = result_paths(file, tag, opts.output)
    write_results(json_path, csv_path, result, rows)
    _print(opts, name, len(bank), len(queries), numbers, per_block, headline_k, blocks is not None, json_path)
    return result


def _print(opts: KnnOptions, name: str, num_train: int, num_test: int, numbers: list[int], per_block: list[dict],
           headline_k: int, per_layer: bool, json_path: Path) -> None:
    what = {"random-init": "randomly initialised teacher", "teacher": "pre-trained teacher",
            "student": "pre-trained student"}[name]
    title = (f"k-NN of the {what} backbone ({num_train} train / {num_test} test images, "
             f"T = {opts.temperature})")
    if not per_layer:
        console.print(title + ":")
        for k, acc in per_block[-1].items():
            console.print(f"k = {k:>4}: top-1 {acc['top1']:6.2f}   top-5 {acc['top5']:6.2f}")
        console.print(f"results: {json_path}")
        return
    columns = ["block"] + [f"k={k} top-1" for k in opts.ks] + [f"k={headline_k} top-5"]
    rows = [[str(n)] + [pct(res[k]["top1"]) for k in opts.ks] + [pct(res[headline_k]["top5"])]
            for n, res in zip(numbers, per_block)]
    print_table(title + ", per block (CLS after the final norm; blocks numbered from 1)", columns, rows,
                caption=f"results: {json_path} and .csv")
