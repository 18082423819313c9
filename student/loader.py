"""Student batches built by worker processes: a torch DataLoader over the epoch's batch sequence.

`student.data.student_parts` fixes an epoch's batches (which pools or rows,
in which order) from the store, the config, the epoch and the rank alone. A
loader of N workers has every worker walk that same sequence, epoch after
epoch (each closed by an end item), reading each shard's tar and Parquet
file side by side as the inline path does, but keeping the images encoded;
worker w decodes, preprocesses and collates only items w, w + N, w + 2N, ...
The DataLoader hands them out round robin from workers 0..N-1, so the
training loop sees batch 0, 1, 2, ... of each epoch in order:
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

On CUDA, `gpu_device` moves decoding to the GPU: workers hand over each
batch's encoded images, and the training process decodes them with
torchvision.io.decode_jpeg(device=...) and resizes, crops and normalises them
there (`tensor_pixels`: bicubic antialiased resize, close to the PIL
processor's pixels but not equal to them). Needs torchvision; whole images
only (no replayed views).
"""
from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from mcad.storage import schema
from mcad.storage.errors import InputError, error_line
from mcad.student.data import PIXELS, collate, encode_texts, signal_tensors

_ERROR = "__mcad_loader_error__"  # a batch that carries a worker's one-line error instead
ENCODED = "encoded_images"  # gpu decoding: a batch's images as uint8 tensors of their file bytes
_EPOCH_END = "__mcad_epoch_end__"  # the item that closes an epoch in the stream of batches


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


def build_encoded_batch(parts: Sequence[dict], remix: bool, *, processor) -> dict:
    """One batch whose images stay encoded (ENCODED: each sample's `.data` as a uint8 tensor) for the GPU."""
    samples = [s for part in parts for s in part[schema.DATA]]
    if any(isinstance(s, Deferred) for s in samples):
        raise InputError("GPU decoding takes whole images: stored views are cut on the CPU (--decode draft|full)")
    batch = {**encode_texts(samples, processor=processor), **signal_tensors(parts, remix=remix)}
    batch[ENCODED] = [torch.frombuffer(bytearray(s.data), dtype=torch.uint8) for s in samples]
    return batch


def gpu_pixels(encoded: Sequence[torch.Tensor], image_processor, device) -> torch.Tensor:
    """pixel_values of encoded images, decoded on `device` (JPEGs by nvJPEG through
    torchvision.io.decode_jpeg, anything else by torchvision on the CPU first) and preprocessed there."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    jpeg = [i for i, data in enumerate(encoded) if data[:2].tolist() == [0xFF, 0xD8]]
    images: list = [None] * len(encoded)
    if jpeg:
        decoded = decode_jpeg([encoded[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
        for i, image in zip(jpeg, decoded):
            images[i] = image
    for i, data in enumerate(encoded):
        if images[i] is None:
            images[i] = decode_image(data, mode=ImageReadMode.RGB).to(device)
    return torch.stack([tensor_pixels(image, image_processor) for image in images])


def tensor_pixels(image: torch.Tensor, image_processor) -> torch.Tensor:
    """A (3, H, W) uint8 image as the processor's pixel_values, with torch ops on its device: resize
    (shortest edge then centre crop, or straight to the square) bicubic with antialiasing, rounded
    to 8 bits, rescaled and normalised. Close to the PIL processor's pixels, not equal to them."""
    from mcad.student.models import image_size

    side = image_size(image_processor)
    x = image[None].float()
    h, w = x.shape[-2:]
    if (getattr(image_processor, "size", None) or {}).get("shortest_edge"):
        scale = side / min(h, w)
        size = (max(side, round(h * scale)), max(side, round(w * scale)))
    else:
        size = (side, side)
    x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    top, left = (size[0] - side) // 2, (size[1] - side) // 2
    x = x[..., top:top + side, left:left + side].clamp(0, 255).round() * float(image_processor.rescale_factor)
    mean = torch.tensor(image_processor.image_mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std)[0]


class EpochBatches(torch.utils.data.IterableDataset):
    """The batches of epochs start, start + 1, ... (up to `stop`), each epoch closed by an end item;
    in a DataLoader worker only that worker's share: item g of the whole stream with g mod N = w.

    One stream over the epochs, so a worker that has built its last batch of an epoch goes on
    with the next epoch's while the training loop finishes (and validates) this one.
    """

    def __init__(self, parts: Callable[[int], Iterable[tuple[list[dict], bool]]], *, processor,
                 decode: Callable | None, stop: int | None = None):
        super().__init__()
        self.parts, self.processor, self.decode = parts, processor, decode  # decode None: left to the GPU
        self.start = multiprocessing.RawValue("q", 0)  # set before each (re)start: forked workers read it
        self.stop = stop

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        item, epoch = 0, self.start.value
        try:
            while self.stop is None or epoch < self.stop:
                for parts, remix in self.parts(epoch):
                    if item % workers == worker:
                        if self.decode is None:
                            yield build_encoded_batch(parts, remix, processor=self.processor)
                        else:
                            yield build_batch(parts, remix, processor=self.processor, decode=self.decode)
                    item += 1
                if item % workers == worker:
                    yield {_EPOCH_END: epoch}
                item, epoch = item + 1, epoch + 1
        except (InputError, OSError) as exc:
            if info is None:
                raise
            # Through the DataLoader an exception would come back as a multi-line traceback
            # with its message lost: send it as a batch and raise it in the training process.
            yield {_ERROR: error_line(exc)}


class BatchLoader:
    """batches(epoch) for the training loop: the epoch's collated batches, in order, built inline
    (workers 0) or by `workers` processes that live as long as this loader (persistent
    DataLoader workers, forked at the first call).

    The workers walk one stream over the epochs from the first epoch asked for
    (student.data.student_parts of each; up to `stop`), so they start on the
    next epoch while the loop finishes this one. Asking for any epoch other than
    the one after the last epoch read to its end restarts the stream there.
    `prefetch_factor` batches ahead per worker, pinned memory when asked (a CUDA
    device), and a seed generator of its own: the global torch RNG is left as it was.
    """

    def __init__(self, parts: Callable[[int], Iterable[tuple[list[dict], bool]]], *, processor, decode: Callable,
                 workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 2, gpu_device=None,
                 stop: int | None = None):
        self.workers, self.processor, self.gpu_device = workers, processor, gpu_device
        self.dataset = EpochBatches(parts, processor=processor, decode=None if gpu_device is not None else decode,
                                    stop=stop)
        self.loader = None
        if workers > 0:
            self.loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                prefetch_factor=prefetch_factor, persistent_workers=True, generator=torch.Generator())
        self._stream: Iterator | None = None
        self._next_epoch: int | None = None  # the epoch the stream is at, after a finished one

    def __call__(self, epoch: int) -> Iterator[dict]:
        if self._stream is None or self._next_epoch != epoch:
            self.dataset.start.value = epoch  # before the iterator starts (or resets) the workers
            self._stream = iter(self.dataset if self.loader is None else self.loader)
        self._next_epoch = None  # until this epoch's end is read
        for batch in self._stream:
            if _ERROR in batch:
                raise InputError(batch[_ERROR])
            if _EPOCH_END in batch:
                self._next_epoch = epoch + 1
                return
            if ENCODED in batch:
                batch[PIXELS] = gpu_pixels(batch.pop(ENCODED), self.processor.image_processor, self.gpu_device)
            yield batch

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage collected)."""
        self._stream = None
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
            self.loader._iterator = None

