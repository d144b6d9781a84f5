"""Helpers over the batches a loader yields: grouping into micro-batches, sizes, worker errors, and
finishing them on the device one batch ahead."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

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


class PreparedBatches:
    """The batches of a loader, each finished by `prepare` (e.g. the photometric augmentation on the
    device), in order.

    On a GPU the Trainer calls `prepare_next()` inside each step, after it has queued the step's
    backward and before it waits for the device: the next batch's kernels are then launched on a side
    stream while the host would otherwise wait, and run beside the step's kernels instead of between two
    steps (NVIDIA's ImageNet example and Lightning prefetch the same way). The step's stream waits for
    its own batch's event only. On the CPU nothing runs ahead: each batch is prepared when it is asked
    for (same values, no concurrency to gain).
    """

    def __init__(self, batches: Iterable[dict], prepare: Callable[[dict], dict], device: torch.device):
        self._batches = iter(batches)
        self._prepare = prepare
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ahead: tuple[dict, torch.cuda.Event] | None = None

    def __iter__(self) -> "PreparedBatches":
        return self

    def __next__(self) -> dict:
        if self._side is None:
            return self._prepare(next(self._batches))
        if self._ahead is None:
            self.prepare_next()
            if self._ahead is None:
                raise StopIteration
        batch, done = self._ahead
        self._ahead = None
        return _hand_over(batch, done)

    def prepare_next(self) -> None:
        """Launch the next batch's preparation now (GPU only; nothing when one is already waiting or the
        loader is done)."""
        if self._side is None or self._ahead is not None:
            return
        try:
            batch = next(self._batches)
        except StopIteration:
            return
        with torch.cuda.stream(self._side):
            ready = self._prepare(batch)
            done = torch.cuda.Event()
            done.record(self._side)
        self._ahead = ready, done


def _hand_over(batch: dict, done: torch.cuda.Event) -> dict:
    """The batch made on the side stream, for use on the current stream: wait for its kernels, and
    tell the caching allocator that its tensors are used here (else it could hand their memory to the
    side stream's next batch while the step still reads them)."""
    stream = torch.cuda.current_stream()
    stream.wait_event(done)
    for value in batch.values():
        for t in (value if isinstance(value, (list, tuple)) else [value]):
            if torch.is_tensor(t) and t.is_cuda:
                t.record_stream(stream)
    return batch
