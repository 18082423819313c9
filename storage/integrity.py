"""A store proves its own bytes: the full check behind `mcad signals validate`.

Three layers, each written by the teacher pass and checked here:

- manifest.json carries its own sha256 (`manifest_sha256`, checked whenever
  it is loaded: storage/manifest.py);
- each shard's manifest entry records the sha256 and size of its signals and
  rejects files (and view file, a store with views), and the params the fusion
  projection's (`fusion_proj_sha256`);
- every Parquet page carries a CRC-32 checksum, verified as it is decoded.

`check_integrity` recomputes every digest and decodes every column of every
signals, rejects and view file with the page checksums verified, and raises
InputError naming the first file (and column) that fails. A store written
before these digests existed still reads; the result says what could not be
checked. DuckDB does not verify page checksums, so the decoding is pyarrow's.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from mcad.storage import fs
from mcad.storage.manifest import FILE_DIGEST_FIELDS, FUSION_PROJ_NAME, VIEWS_DIR, store_file
from mcad.storage.parquet_files import decode_file
from mcad.storage.reader import Store

NOT_RECORDED, NO_FILE = "not recorded", "no file"


def check_integrity(store: Store, *, progress: Callable[[Iterable[str]], Iterable[str]] = iter) -> dict[str, Any]:
    """Check every digest and decode every page of a store; return what was checked.

    Returns {"files": files decoded, "manifest_digest", "file_digests",
    "fusion_proj_digest"}, each digest "checked" or NOT_RECORDED (a store
    from before 2026-12-01; the projection's: NO_FILE when the store has
    none). `progress` wraps the shard names (a progress bar).
    """
    folders = [*FILE_DIGEST_FIELDS, *([VIEWS_DIR] if store.manifest.num_views > 1 else [])]
    for name in progress(store.shards):
        for folder in folders:
            store.verify_file(name, folder)
            decode_file(store_file(store.path, folder, f"{name}.parquet"), store.file_where(name, folder))
    state = {True: "checked", False: NOT_RECORDED}
    projection = state[store.verify_projection()]
    if projection == NOT_RECORDED and not fs.exists(store_file(store.path, FUSION_PROJ_NAME)):
        projection = NO_FILE  # a store made without one (synthetic stores, benches)
    return {
        "files": len(store.shards) * len(folders),
        "manifest_digest": state[store.manifest.sealed],
        "file_digests": state[store.has_digests],
        "fusion_proj_digest": projection,
    }
