"""Student batches built by worker processes: a torch DataLoader over the epoch's batch sequence.

`student.data.student_parts` fixes an epoch's batches (which pools or rows,
in which order) from the store, the config, the epoch and the rank alone. A
loader of N workers has every worker walk that same sequence, reading each
shard's tar and Parquet file side by side as the inline path does, but
keeping the images encoded; worker w decodes, preprocesses and collates only
batches w, w + N, w + 2N, ... The DataLoader hands batches out round robin
from workers 0..N-1, so the training loop sees batch 0, 1, 2, ... in order:
the same pools, the same order and the same pixels whatever N is (N = 0
builds them inline, in the training process, through the same functions).
Every worker reads the headers, captions and Parquet rows of the whole
sequence, but an image's bytes only when it decodes it (pipeline.shards
MemberRef, local uncompressed tars): reading images, decoding, the image
processor and the tokenizer, the costly part with web photos, are split N ways.

    batches = BatchLoader(lambda epoch: student_parts(store, cfg, samples=encoded, epoch=epoch, crop=defer_crop),
                          processor=processor, decode=decode, workers=2)
    for batch in batches(epoch): ...     # the workers live on from epoch to epoch

Images are decoded by `decode(sample, box)` (jobs/train_student.py hands in
one that decodes EncodedSamples, full or in JPEG draft mode, and cuts a
stored view's box); `defer_crop` is the `crop` that leaves the cut to it. A
worker's bad input (InputError, OSError: a tar that changed, an image that
no longer decodes) reaches the training process as the same one-line error.
"""
from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from mcad.storage import schema
from mcad.storage.errors import InputError, error_line
from mcad.student.data import collate

_ERROR = "__mcad_loader_error__"  # a batch that carries a worker's one-line error instead


@dataclass(frozen=True)
class Deferred:
    """A stored view of a sample, to be cut when the sample is decoded (box: the view's box)."""

    sample: Any
    box: Any


def defer_crop(sample, box) -> Deferred:
    """student_parts' `crop` for a loader: remember the box, cut nothing yet."""
    return Deferred(sample, box)


def build_batch(parts: Sequence[dict], remix: bool, *, processor, decode: Callable) -> dict[str, torch.Tensor]:
    """One batch: each part's samples decoded (and cut) by `decode(sample, box or None)`, then collated."""
    shown = [{**part, schema.DATA: [decode(s.sample, s.box) if isinstance(s, Deferred) else decode(s, None)
                                    for s in part[schema.DATA]]} for part in parts]
    return collate(shown, processor=processor, remix=remix)


class EpochBatches(torch.utils.data.IterableDataset):
    """The batches of the epoch `epoch.value`; in a DataLoader worker, only that worker's share
    (batch i with i mod N = w)."""

    def __init__(self, parts: Callable[[int], Iterable[tuple[list[dict], bool]]], *, processor, decode: Callable,
                 epoch=None):
        super().__init__()
        self.parts, self.processor, self.decode = parts, processor, decode
        self.epoch = epoch if epoch is not None else multiprocessing.RawValue("q", 0)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            for i, (parts, remix) in enumerate(self.parts(self.epoch.value)):
                if i % workers == worker:
                    yield build_batch(parts, remix, processor=self.processor, decode=self.decode)
        except (InputError, OSError) as exc:
            if info is None:
                raise
            # Through the DataLoader an exception would come back as a multi-line traceback
            # with its message lost: send it as a batch and raise it in the training process.
            yield {_ERROR: error_line(exc)}


class BatchLoader:
    """batches(epoch) for the training loop: the epoch's collated batches, in order, built inline
    (workers 0) or by `workers` processes that live as long as this loader (persistent
    DataLoader workers, forked at the first epoch: the epoch number reaches them through
    shared memory, set before each epoch starts).

    parts(epoch) gives the epoch's sequence (student.data.student_parts); each
    worker walks it. `prefetch_factor` batches ahead per worker, pinned memory
    when asked (a CUDA device), and a seed generator of its own: the global torch
    RNG is left as it was.
    """

    def __init__(self, parts: Callable[[int], Iterable[tuple[list[dict], bool]]], *, processor, decode: Callable,
                 workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 2):
        self.workers = workers
        self.dataset = EpochBatches(parts, processor=processor, decode=decode)
        self.loader = None
        if workers > 0:
            self.loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                prefetch_factor=prefetch_factor, persistent_workers=True, generator=torch.Generator())

    def __call__(self, epoch: int) -> Iterator[dict]:
        self.dataset.epoch.value = epoch  # before the iterator starts (or resumes) the workers
        if self.loader is None:
            yield from self.dataset
            return
        for batch in self.loader:
            if _ERROR in batch:
                raise InputError(batch[_ERROR])
            yield batch

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage collected)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
            self.loader._iterator = None


def epoch_batches(parts: Callable[[], Iterable[tuple[list[dict], bool]]], *, processor, decode: Callable,
                  workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 2) -> Iterator[dict]:
    """One epoch's batches from parts() (a BatchLoader of its own, closed at the end)."""
    loader = BatchLoader(lambda _: parts(), processor=processor, decode=decode, workers=workers,
                         pin_memory=pin_memory, prefetch_factor=prefetch_factor)
    try:
        yield from loader(0)
    finally:
        loader.close()
