"""Which images an evaluation trains on, selects on and reports on.

- train: the labelled training data (default: the run's own training images: its data's train split,
         restricted to the run's low-data subset when its config selects one);
- val:   the data accuracy is reported on (default: the same data's held-out split). It plays the
         test set's role — as ImageNet's 'val' does in DINO — so nothing is ever chosen on it;
- select: where choices (best learning rate, best epoch) are made: `--select-data`, else a seeded,
         stratified holdout carved from the training data, else nothing (no choice is made).
"""
from __future__ import annotations

from dataclasses import dataclass

from glsd_cli.config import Config
from glsd_cli.data.base import ImageSource, same_files
from glsd_cli.data.sources import open_source
from glsd_cli.data.subsets import make_subset, read_class_file, restrict_to_run_subset, split_holdout
from glsd_cli.errors import DataError


def open_labelled_pair(cfg: Config, train_uri: str | None, val_uri: str | None
                       ) -> tuple[ImageSource, ImageSource]:
    """The labelled training and evaluation sources: explicit URIs, else the run's own training images
    (its low-data subset, if the config selects one) and the same data's held-out split."""
    cfg_train_uri = cfg.data.train
    train = open_source(train_uri or cfg_train_uri, "train")
    val = open_source(val_uri or train_uri or cfg_train_uri, "val")
    if val_uri is None and same_files(train, val):
        raise DataError(f"{train.uri} has no held-out split (no train/ and val/ folders), so accuracy would be "
                        "measured on the training images; pass --val-data")
    if train_uri is None:  # the images the run trained on: a 5k-image run evaluates with its 5k labels
        train = restrict_to_run_subset(cfg, train)
        if cfg.data.classes_file and val_uri is None:  # and the held-out images of its classes only
            val = make_subset(val, classes=read_class_file(cfg.data.classes_file))
    _check_labelled(("training", train), ("evaluation", val))
    _check_same_classes(train, val, "evaluation")
    return train, val


def _check_labelled(*named: tuple[str, ImageSource]) -> None:
    for what, src in named:
        if not src.labelled:
            raise DataError(f"evaluation needs labelled {what} data, but {src.uri} ({src.split}) has no labels; "
                            "pass --train-data/--val-data")


def _check_same_classes(train: ImageSource, other: ImageSource, what: str) -> None:
    if train.classes != other.classes:
        raise DataError(f"the training data ({len(train.classes)} classes) and the {what} data "
                        f"({len(other.classes)} classes) have different class lists")


@dataclass
class EvalSplits:
    full_train: ImageSource       # the training data as given
    train: ImageSource            # what is trained on: full_train minus the holdout, if one was carved
    val: ImageSource              # reported on; never selected on
    select: ImageSource | None    # selected on; None when nothing is selected
    select_note: str              # how `select` was made, for reports

    @property
    def num_classes(self) -> int:
        return len(self.full_train.classes)


def open_eval_splits(cfg: Config, train_uri: str | None, val_uri: str | None, select_uri: str | None,
                     holdout_fraction: float, seed: int) -> EvalSplits:
    full_train, val = open_labelled_pair(cfg, train_uri, val_uri)
    if select_uri is not None:
        select = open_source(select_uri, "val")
        _check_labelled(("selection", select))
        _check_same_classes(full_train, select, "selection")
        return EvalSplits(full_train, full_train, val, select, f"--select-data {select.uri} ({len(select)} images)")
    if holdout_fraction <= 0:
        return EvalSplits(full_train, full_train, val, None, "none (--holdout-fraction 0): nothing was selected")
    if holdout_fraction >= 1:
        raise DataError(f"--holdout-fraction {holdout_fraction} must be below 1 (0 turns selection off)")
    train, holdout = split_holdout(full_train, holdout_fraction, seed)
    note = (f"a stratified {holdout_fraction:.0%} holdout of the training data, seed {seed} "
            f"({len(holdout)} images, not trained on)")
    return EvalSplits(full_train, train, val, holdout, note)
