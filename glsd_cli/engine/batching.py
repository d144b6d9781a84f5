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


def prepared_ahead(batches: Iterable[dict], prepare: Callable[[dict], dict], device: torch.device
                   ) -> Iterator[dict]:
    """`prepare(batch)` of each batch (e.g. the photometric augmentation on the device), in order.

    On a GPU the next batch is prepared on a side stream before the current one is handed over: its
    kernels are launched while the host would otherwise wait for the current step (the Trainer reads
    its flags once per step), and they run beside the step's kernels instead of between two steps (as
    NVIDIA's ImageNet example and Lightning prefetch). The step's stream waits for its own batch's
    event only. Elsewhere each batch is prepared when it is asked for: same values, no concurrency.
    """
    if device.type != "cuda":
        for batch in batches:
            yield prepare(batch)
        return
    side = torch.cuda.Stream(device)

    def launch(batch: dict) -> tuple[dict, torch.cuda.Event]:
        with torch.cuda.stream(side):
            ready = prepare(batch)
            done = torch.cuda.Event()
            done.record(side)
        return ready, done

    pending = None
    for batch in batches:
        upcoming = launch(batch)
        if pending is not None:
            yield _hand_over(*pending)
        pending = upcoming
    if pending is not None:
        yield _hand_over(*pending)


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
