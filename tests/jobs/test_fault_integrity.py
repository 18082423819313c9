"""Fault matrix, integrity: one byte damaged in a real store (a real teacher pass), caught in one line.

Each case copies the pass's store, flips one bit of one file in place (its
size and mtime kept, so only a content check can see it) and runs the CLI:
`mcad signals validate` and the student (train-student in one process, on
Ray Train, online, and a sweep) must each stop with exit 2 and one line
naming the store, the shard and the column.
"""
from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from mcad.storage import schema
from mcad.storage.manifest import (
    FUSION_PROJ_NAME, MANIFEST_NAME, MANIFEST_SHA256, SIGNALS_DIR, store_file,
)

from helpers import (
    assert_one_line_error, flip_byte, flip_in_footer, flip_in_pages, invoke, strip_digests, write_manifest,
)

pytestmark = pytest.mark.ray  # tiny_store is a real teacher pass
SHARD = "000000"
SIGNALS = f"{SIGNALS_DIR}/{SHARD}.parquet"


@pytest.fixture
def store(tiny_store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(tiny_store, copy)
    return copy


def _student(store, shapes_data, out, *extra):
    return invoke("pipeline", "train-student", "--store", store, "--data", shapes_data / "train",
                  "--out", out, "--preset", "smoke", "--epochs", "1", *extra)


@pytest.mark.parametrize("column", schema.SIGNAL_COLUMNS)
def test_a_flipped_byte_in_any_signals_column_stops_validate_and_the_student(store, shapes_data, tmp_path, column):
    flip_in_pages(store / SIGNALS, column)
    where = (f"{store}: shard {SHARD}: {SIGNALS}: column {column}: unreadable (could not verify page integrity, "
             f"CRC checksum verification failed")
    assert_one_line_error(invoke("signals", "validate", store), where)
    assert_one_line_error(_student(store, shapes_data, tmp_path / "run"), where)
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_a_flipped_byte_in_a_footer_is_caught_by_its_digest(store, shapes_data, tmp_path):
    path = store / SIGNALS
    flip_in_footer(path)  # in created_by: the footer parses either way
    assert pq.ParquetFile(path).metadata.num_rows  # the footer still parses: only the digest sees it
    want = (f"{store}: shard {SHARD}: {SIGNALS}: the file does not match its manifest signals_sha256",
            "the footer or a page header is damaged")
    assert_one_line_error(invoke("signals", "validate", store), *want)
    assert_one_line_error(_student(store, shapes_data, tmp_path / "run"), *want)
    assert invoke("signals", "validate", store, "--quick").exit_code == 0  # the cheap checks cannot see it


@pytest.mark.parametrize("flip", ["invalid json", "changed value"])
def test_a_flipped_byte_in_the_manifest_is_caught(store, shapes_data, tmp_path, flip):
    path = store / MANIFEST_NAME
    text = path.read_text()
    # '{' -> 'z' breaks the JSON; a digit of a shard's seconds (checked by nothing else) changes a value.
    at = 0 if flip == "invalid json" else text.index('"seconds": ') + len('"seconds": ')
    flip_byte(path, at)
    want = "not valid JSON" if flip == "invalid json" else f"contents do not match its {MANIFEST_SHA256}"
    for result in (invoke("signals", "validate", store), invoke("signals", "validate", store, "--quick"),
                   invoke("signals", "stats", store), _student(store, shapes_data, tmp_path / "run")):
        assert_one_line_error(result, f"{path}", want)


def test_a_damaged_fusion_projection_is_caught(store, shapes_data, tiny_teachers, tmp_path):
    flip_byte(store / FUSION_PROJ_NAME, (store / FUSION_PROJ_NAME).stat().st_size - 3)
    want = f"{store}: {FUSION_PROJ_NAME} does not match the manifest's fusion_proj_sha256"
    assert_one_line_error(invoke("signals", "validate", store), want)
    assert_one_line_error(_student(store, shapes_data, tmp_path / "run", "--online-teachers",
                                   *map(str, tiny_teachers)), want)
    # A resumed pass would score its remaining shards with the damaged W: it refuses too.
    dual, single = tiny_teachers
    assert_one_line_error(invoke("pipeline", "teacher-pass", "--data", shapes_data / "train", "--dual", dual,
                                 "--single", single, "--out", store, "--pool", "8", "--topk", "3",
                                 "--pair-batch", "16", "--calibration-rows", "24", "--resume"), want)


def test_ray_train_and_a_sweep_refuse_a_damaged_store(store, shapes_data, tmp_path):
    flip_in_pages(store / SIGNALS, schema.IMG_EMB)
    where = f"{store}: shard {SHARD}: {SIGNALS}: column {schema.IMG_EMB}: unreadable"
    assert_one_line_error(_student(store, shapes_data, tmp_path / "run", "--workers", "2"), where)
    assert_one_line_error(invoke("pipeline", "sweep", "--store", store, "--data", shapes_data / "train",
                                 "--val-data", shapes_data / "val", "--out", tmp_path / "sweep",
                                 "--grid", "alpha=0,1", "--grid", "preset=smoke", "--epochs", "1"), where)


def test_a_store_without_digests_reads_and_its_pages_are_still_checked(store, shapes_data, tmp_path):
    """A store from before the digests: it reads, validate says what it cannot check, and a
    page checksum failure still stops the student's reader in one line."""
    strip_digests(store)
    result = invoke("signals", "validate", store)
    assert result.exit_code == 0, result.output
    assert "note: this store records no manifest digest, no file digests" in result.output
    flip_in_pages(store / SIGNALS, schema.IMG_EMB)
    assert invoke("signals", "validate", store, "--quick").exit_code == 0  # float16 pages decode as they are
    where = f"{store}: shard {SHARD}: {SIGNALS}: column {schema.IMG_EMB}: unreadable"
    assert_one_line_error(invoke("signals", "validate", store), where)
    assert_one_line_error(_student(store, shapes_data, tmp_path / "run"), where)


def test_the_pass_records_every_files_digest(store):
    from mcad.storage.manifest import FILE_DIGEST_FIELDS, Manifest, file_digest

    manifest = Manifest.load(store)
    assert manifest.sealed and manifest.shards
    for name, entry in manifest.shards.items():
        for folder, (sha, size) in FILE_DIGEST_FIELDS.items():
            path = store_file(store, folder, f"{name}.parquet")
            assert entry[sha] == file_digest(path) and entry[size] == path.stat().st_size
    # write_manifest is how tests edit a manifest on purpose: it reseals it.
    write_manifest(store, json.loads((store / MANIFEST_NAME).read_text()))
    assert Manifest.load(store) == manifest
