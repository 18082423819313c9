"""Integrity: page checksums, file digests in the manifest, the manifest's own digest (real files)."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from mcad.storage import schema
from mcad.storage.errors import InputError
from mcad.storage.integrity import NO_FILE, check_integrity
from mcad.storage.manifest import (
    MANIFEST_NAME, REJECTS_DIR, SIGNALS_DIR, Manifest, file_digest, signals_path,
)
from mcad.storage.reader import open_store

from helpers import flip_byte, flip_in_pages, invoke, strip_digests


@pytest.fixture
def store_dir(tmp_path, make_store):
    return make_store(tmp_path / "store", shards=2, rows_per_shard=(300, 7), rejects_per_shard=40)


def test_the_writer_checksums_every_page_and_records_digests(store_dir):
    manifest = Manifest.load(store_dir)
    assert manifest.sealed
    entry = manifest.shards["00000"]
    path = signals_path(store_dir, "00000")
    assert entry["signals_sha256"] == file_digest(path) and entry["signals_bytes"] == path.stat().st_size
    store = open_store(store_dir)
    assert check_integrity(store) == {"files": 4, "manifest_digest": "checked", "file_digests": "checked",
                                      "fusion_proj_digest": NO_FILE}  # make_store writes no W
    # The page checksum sees a flip before the page is decompressed.
    flip_in_pages(path, schema.IMG_EMB, row_group=1)
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        pq.ParquetFile(path, page_checksum_verification=True).read_row_group(1, columns=[schema.IMG_EMB])


@pytest.mark.parametrize("column", schema.REJECTS_SCHEMA.names)
def test_a_flipped_byte_in_a_rejects_column_stops_validate(store_dir, column):
    flip_in_pages(store_dir / REJECTS_DIR / "00001.parquet", column)
    result = invoke("signals", "validate", store_dir)
    assert result.exit_code == 2
    assert f"shard 00001: {REJECTS_DIR}/00001.parquet: column {column}: unreadable" in result.output


def test_the_reader_checks_digests_once_and_pages_when_no_digest_is_recorded(store_dir):
    store = open_store(store_dir)
    assert sum(len(p[schema.KEY]) for p in store.iter_pools()) == 307
    assert store._verified == {("00000", SIGNALS_DIR), ("00001", SIGNALS_DIR)}  # hashed on first open
    # With the digests gone (a store from before them), the page checksum still stops the reader.
    strip_digests(store_dir)
    flip_in_pages(signals_path(store_dir, "00000"), schema.FUSED, row_group=1)
    old = open_store(store_dir)
    assert not old.has_digests and not old.manifest.sealed and not old.verify_files()
    with pytest.raises(InputError, match=f"{store_dir}: shard 00000: signals/00000.parquet: column fused: "
                                         f"unreadable \\(could not verify page integrity"):
        list(old.iter_pools())
    pools = list(old.iter_pools(columns=[schema.KEY, schema.IMG_EMB]))  # the other columns still read
    assert sum(len(p[schema.KEY]) for p in pools) == 307


def test_every_single_bit_flip_of_the_manifest_is_refused(store_dir):
    path = store_dir / MANIFEST_NAME
    original = path.read_bytes()
    Manifest.load(store_dir)
    for at in range(len(original)):
        for mask in (0x01,):
            flip_byte(path, at, mask)
            with pytest.raises(InputError, match=f"{path}: (not valid JSON|contents do not match|unknown manifest "
                                                 f"fields|not a manifest|signal schema version|expected a JSON object)"):
                Manifest.load(store_dir)
            path.write_bytes(original)
