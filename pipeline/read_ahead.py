"""Background reading: a shard's next pools read, decoded and prepared while the caller works.

`read_ahead(iter_shard(path), pool_size=P, prepare=...)` yields the very items
of the shard (pipeline/shards.py), in order, while a thread reads, decodes and
prepares the pools after the current one. The teacher pass uses it
(`process_shard(prefetch=1)`: the next pool's teacher pixels computed ahead).
Decoding inside one read is `iter_shard(..., decode_threads=N)`, in shards.py.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

from mcad.pipeline.shards import Reject

_END, _ERROR = object(), object()


def read_ahead(items: Iterable, *, pool_size: int, depth: int = 1,
               prepare: Callable[[list], None] | None = None) -> Iterator:
    """The same items, read (and decoded) in a background thread up to `depth` pools ahead.

    Items are a shard's Samples and Rejects (iter_shard) or anything else; a
    pool is `pool_size` consecutive non-Reject items, as the teacher pass
    groups them. Once the thread has a pool's samples it calls
    `prepare(samples)` there (the pass precomputes the teachers' pixels), then
    queues them. So while the caller works on pool i, pool i + 1 is read,
    decoded and prepared. An exception in the thread is raised in the caller
    at the point it happened; a caller that stops early stops the thread.
    depth 0: no thread, the items as they come (prepare is not called).
    """
    if depth < 1:
        yield from items
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value) -> bool:
        while not stop.is_set():
            try:
                ready.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        chunk: list = []
        try:
            kept = 0
            for item in items:
                chunk.append(item)
                kept += not isinstance(item, Reject)
                if kept == pool_size:
                    if prepare is not None:
                        prepare([x for x in chunk if not isinstance(x, Reject)])
                    if not put(chunk):
                        return
                    chunk, kept = [], 0
            if chunk and kept and prepare is not None:
                prepare([x for x in chunk if not isinstance(x, Reject)])
            if (chunk and not put(chunk)) or not put(_END):
                return
        except BaseException as exc:  # raised again in the caller's thread, after the items before it
            if not chunk or put(chunk):
                put((_ERROR, exc))

    thread = threading.Thread(target=work, name="mcad-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            got = ready.get()
            if got is _END:
                return
            if isinstance(got, tuple) and got and got[0] is _ERROR:
                raise got[1]
            yield from got
    finally:
        stop.set()
        thread.join()
        getattr(items, "close", lambda: None)()
