"""Helpers over the batches a loader yields: grouping into micro-batches, sizes, worker errors."""
from __future__ import annotations

from typing import Iterable, Iterator

from glsd_cli.errors import GlsdError


def clear_worker_errors(loader: Iterable) -> Iterator:
    """The loader's batches; an error raised in a worker process is re-raised as its one clear line."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except GlsdError as e:
            lines = str(e).strip().splitlines()
            if len(lines) > 1 and lines[0].startswith("Caught "):  # DataLoader's wrapped worker traceback
                raise type(e)(lines[-1].split(": ", 1)[-1]) from None
            raise
        yield batch


def grouped(items: Iterator, n: int) -> Iterator[list]:
    """Consecutive groups of n items (a trailing incomplete group is dropped)."""
    group = []
    for item in items:
        group.append(item)
        if len(group) == n:
            yield group
            group = []


def batch_size(batch) -> int:
    if isinstance(batch, dict):
        for key in ("views", "image", "images"):
            if key in batch:
                v = batch[key]
                return len(v[0]) if isinstance(v, (list, tuple)) else len(v)
        return len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return len(batch[0])
    return len(batch)
