"""Datasets of augmented views and a sampler whose order is a function of (seed, epoch).

The sampler splits each global batch across processes (rank r takes its contiguous share of every
global batch), and can start mid-epoch, so a resumed or distributed run sees exactly the images
that one uninterrupted process would. Nothing here draws from the global torch RNG: the views of
item i in epoch e come from a generator seeded by (seed, e, i), and the loader gets its own
generator, so the training RNG (drop path) is the same whether or not a run was interrupted.
"""
from __future__ import annotations

import signal
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from glsd_cli.data.base import ImageSource, innermost
from glsd_cli.data.multicrop import MultiCrop, sample_generator
from glsd_cli.errors import ConfigError


class SeededEpochDataset(Dataset):
    """A source whose item i in epoch e is augmented from `sample_generator(seed, e, i)`; the training
    loops call `set_epoch` before each epoch."""

    def __init__(self, source: ImageSource, seed: int):
        self.source = source
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)


class ViewsDataset(SeededEpochDataset):
    """Wraps a source: item i of epoch e → its multi-crop views with boxes and flips.

    `photometric_on_device`: the workers stop after the geometric part and hand over uint8 views with
    their photometric parameters ("photometric", (V, NUM_PARAMS)), for `DevicePhotometric` to finish
    on the training device; the same generator draws the same numbers either way."""

    def __init__(self, source: ImageSource, transform: MultiCrop, seed: int, photometric_on_device: bool = False):
        super().__init__(source, seed)
        self.transform = transform
        self.photometric_on_device = photometric_on_device

    def __getitem__(self, index: int) -> dict:
        image, label = self.source[index]
        gen = sample_generator(self.seed, self.epoch, index)
        item = {"label": label, "index": index, "unreadable": _was_unreadable(self.source, index)}
        if self.photometric_on_device:
            views, boxes, flips, params = self.transform.geometric(image, gen)
            item["photometric"] = params
        else:
            views, boxes, flips = self.transform(image, gen)
        return {"views": views, "boxes": boxes, "flips": flips, **item}


def _was_unreadable(source: ImageSource, index: int) -> bool:
    """Whether item `index` could not be decoded (a folder source then returned the next readable
    image). Decided per item, not from a counter, so it is the same in any worker or process."""
    source, index = innermost(source, index)
    bad = getattr(source, "unreadable_paths", None)
    return bool(bad) and str(source.paths[index]) in bad


class EpochSampler(Sampler[int]):
    """Shuffled indices from (seed, epoch); this rank's share of each full global batch."""

    def __init__(self, num_items: int, global_batch: int, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True):
        if global_batch % world:
            raise ConfigError(f"data.batch_size {global_batch} must be divisible by the {world} processes")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_items // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def global_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.num_items, generator=gen).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        local = self.global_batch // self.world
        for step in range(self.start_step, self.steps_per_epoch):
            begin = step * self.global_batch + self.rank * local
            yield from order[begin:begin + local]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * (self.global_batch // self.world)


def make_loader(dataset: Dataset, sampler: Sampler, local_batch: int, num_workers: int,
                collate: Callable | None = None, seed: int = 0) -> DataLoader:
    """A DataLoader that leaves the global torch RNG alone: the DataLoader draws its workers' base
    seed from `generator`, which would otherwise be the global one (and shift drop path on resume)."""
    return DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, drop_last=True, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=_ignore_interrupts if num_workers > 0 else None)


def _ignore_interrupts(worker_id: int) -> None:  # noqa: ARG001
    # Ctrl-C reaches the whole process group. Workers must not die of it: the main process
    # finishes its step, saves a checkpoint and then shuts them down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class EvalDataset(Dataset):
    """Source images through a deterministic eval transform; yields (image, label, index)."""

    def __init__(self, source: ImageSource, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image, label = self.source[index]
        return self.transform(image), label, index
