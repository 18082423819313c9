"""Writer and manifest: round trip of every column type, input checks, crash safety."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mcad.storage import schema
from mcad.storage import writer
from mcad.storage.atomic import TMP_PREFIX, sweep_temporaries
from mcad.storage.errors import InputError
from mcad.storage.manifest import (
    MANIFEST_NAME, STATUS_DONE, Manifest, file_digest, rejects_path, same_source, signals_path, source_identity,
)
from mcad.storage.writer import write_shard

DIMS = {"d": 8, "f": 12, "k": 3, "pool_size": 4}
TESTS_DIR = Path(__file__).resolve().parents[1]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_round_trip_every_column_type(tmp_path, make_columns):
    cols = make_columns("s0", 10, seed=3)
    rejects = [("s0-x", "decode_error", "truncated jpeg"), ("s0-y", "no_caption", "")]
    info = write_shard(tmp_path, "s0", cols, rejects, **DIMS)
    assert info["rows"] == 10 and info["rejected"] == 2 and info["pools"] == 3
    assert info["bytes"] == signals_path(tmp_path, "s0").stat().st_size

    table = pq.read_table(signals_path(tmp_path, "s0"))
    assert schema.version_of(table.schema) == schema.SCHEMA_VERSION
    assert schema.validate(table) == {"d": 8, "f": 12, "k": 3}
    assert table.column(schema.KEY).to_pylist() == cols[schema.KEY]
    assert table.column(schema.SHARD).to_pylist() == ["s0"] * 10
    for name in (schema.IMG_EMB, schema.TXT_EMB, schema.FUSED, schema.FUSED_PROJ):
        got = np.array(table.column(name).to_pylist(), dtype=np.float16)
        np.testing.assert_array_equal(got, cols[name])
    for name in (schema.ROW, schema.POOL, schema.ITM_POS, schema.col("t2i", schema.DUAL_LSE)):
        np.testing.assert_array_equal(table.column(name).to_numpy(), np.asarray(cols[name]))
    idx = np.array(table.column(schema.col("i2t", schema.IDX)).to_pylist())
    dual = np.array(table.column(schema.col("i2t", schema.DUAL)).to_pylist(), dtype=np.float32)
    itm = np.array(table.column(schema.col("t2i", schema.ITM)).to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(idx, cols[schema.col("i2t", schema.IDX)])
    np.testing.assert_array_equal(dual, cols[schema.col("i2t", schema.DUAL)])
    np.testing.assert_array_equal(itm, cols[schema.col("t2i", schema.ITM)])
    # The last pool (rows 8, 9) is smaller than K = 3: padded.
    assert (idx[8:, 2] == schema.PAD_IDX).all() and np.isneginf(dual[8:, 2]).all()

    rej = pq.read_table(rejects_path(tmp_path, "s0"))
    assert rej.schema.names == schema.REJECTS_SCHEMA.names
    assert [tuple(r.values()) for r in rej.to_pylist()] == rejects
    assert schema.version_of(rej.schema) == schema.SCHEMA_VERSION


def test_row_groups_hold_whole_pools(tmp_path, make_columns, monkeypatch):
    assert writer.row_group_rows(64) == 256 and writer.row_group_rows(300) == 300
    monkeypatch.setattr(writer, "ROW_GROUP_MIN_ROWS", 6)
    write_shard(tmp_path, "s0", make_columns("s0", 19), [], **DIMS)
    meta = pq.read_metadata(signals_path(tmp_path, "s0"))
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [8, 8, 3]


def test_empty_rejects_and_empty_shard_are_written(tmp_path, make_columns):
    info = write_shard(tmp_path, "s0", make_columns("s0", 5), [], **DIMS)
    assert info["rejected"] == 0 and pq.read_table(rejects_path(tmp_path, "s0")).num_rows == 0
    empty = {name: value[:0] for name, value in make_columns("s1", 5).items()}
    info = write_shard(tmp_path, "s1", empty, [("s1-a", "decode_error", "x")], **DIMS)
    assert info == {**info, "rows": 0, "pools": 0, "rejected": 1}
    assert pq.read_table(signals_path(tmp_path, "s1")).num_rows == 0


def _break(cols, name, fn):
    cols[name] = fn(np.array(cols[name]) if not isinstance(cols[name], list) else list(cols[name]))
    return cols


def _set(index, value):
    def fn(a):
        a = a.copy()
        a[index] = value
        return a
    return fn


def _drop_positive_of_row0(idx):
    """Row 0's candidates are 3 of pool 0's rows {0..3}: swap its positive for the one left out."""
    idx = idx.copy()
    left_out = ({0, 1, 2, 3} - set(idx[0].tolist())).pop()
    idx[0][idx[0] == 0] = left_out
    return idx


BAD_INPUTS = {  # case: (column, how to break it, expected message)
    "embedding width": (schema.IMG_EMB, lambda a: a[:, :5], "img_emb has shape"),
    "fewer rows": (schema.ITM_POS, lambda a: a[:-1], "itm_pos has shape"),
    "rows out of order": (schema.ROW, lambda a: a[::-1], "row must be 0..9"),
    "pool not row//P": (schema.POOL, _set(5, 0), "pool must equal row // 4"),
    "candidate in another pool": (schema.col("i2t", schema.IDX), _set((0, 2), 7), "row 0 has candidates outside"),
    "positive missing": (schema.col("t2i", schema.IDX), _drop_positive_of_row0, "positive"),
    "padding where the pool is full": (schema.col("i2t", schema.IDX), _set((1, 2), schema.PAD_IDX), "min\\(K, pool size\\)"),
    "-inf logit on a real candidate": (schema.col("i2t", schema.DUAL), _set((0, 0), -np.inf), "i2t_dual must be finite"),
    "finite logit on padding": (schema.col("t2i", schema.ITM), _set((9, 2), 0.5), "t2i_itm must be finite"),
    "nan embedding": (schema.TXT_EMB, _set((3, 3), np.nan), "txt_emb holds non-finite"),
    "float candidate ids": (schema.col("i2t", schema.IDX), lambda a: a.astype(np.float32), "must be integers"),
    "other shard name": (schema.SHARD, lambda a: ["s9"] * 10, "other shard names"),
    "non-string key": (schema.KEY, lambda a: list(range(10)), "keys must be strings"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_write_shard_refuses_inconsistent_columns(tmp_path, make_columns, case):
    name, fn, message = BAD_INPUTS[case]
    cols = make_columns("s0", 10)
    cols.setdefault(schema.SHARD, ["s0"] * 10)
    cols = _break(cols, name, fn)
    with pytest.raises(ValueError, match=f"^shard s0: .*{message}"):
        write_shard(tmp_path, "s0", cols, [], **DIMS)
    assert _files(tmp_path) == []


def test_write_shard_refuses_missing_or_unknown_columns_and_bad_rejects(tmp_path, make_columns):
    cols = make_columns("s0", 6)
    del cols[schema.FUSED]
    with pytest.raises(ValueError, match="missing columns \\['fused'\\]"):
        write_shard(tmp_path, "s0", cols, [], **DIMS)
    with pytest.raises(ValueError, match="unknown columns \\['extra'\\]"):
        write_shard(tmp_path, "s0", {**make_columns("s0", 6), "extra": np.zeros(6)}, [], **DIMS)
    with pytest.raises(ValueError, match="triples"):
        write_shard(tmp_path, "s0", make_columns("s0", 6), [("k", "reason")], **DIMS)
    assert _files(tmp_path) == []


def test_failed_rename_leaves_no_signals_and_no_temporary(tmp_path, make_columns, monkeypatch):
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(f"{os.sep}signals{os.sep}s0.parquet"):
            raise OSError("disk full (injected)")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        write_shard(tmp_path, "s0", make_columns("s0", 10), [], **DIMS)
    assert not signals_path(tmp_path, "s0").exists()
    assert not list((tmp_path / "signals").glob(TMP_PREFIX + "*"))


CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    import numpy as np
    from conftest import random_columns
    from mcad.storage.writer import write_shard
    keys = [f"big-{i:06d}" for i in range(3000)]
    cols = random_columns("big", keys, pool=64, d=256, f=384, k=8, rng=np.random.default_rng(0))
    rejects = [(f"bad-{i}", "decode_error", "x" * 100) for i in range(2000)]
    while True:
        write_shard(sys.argv[1], "big", cols, rejects, d=256, f=384, k=8, pool_size=64)
        print("wrote", flush=True)
""")


def test_killed_writer_leaves_complete_files_or_none(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR.parent)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(TESTS_DIR)],
                            stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"wrote"  # one whole write done
        time.sleep(0.15)  # now somewhere inside the next write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    for path, rows in ((signals_path(tmp_path, "big"), 3000), (rejects_path(tmp_path, "big"), 2000)):
        if path.exists():  # whatever is under a final name is complete and valid
            table = pq.read_table(path)
            assert table.num_rows == rows
    schema.validate(pq.read_table(signals_path(tmp_path, "big")))
    for folder in ("signals", "rejects"):
        leftovers = sweep_temporaries(tmp_path / folder)
        assert all(p.name.startswith(TMP_PREFIX) for p in leftovers)
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == ["big.parquet"]


REWRITE_CHILD = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, sys.argv[2])
    import numpy as np
    from conftest import random_columns
    from mcad.storage.writer import write_shard
    cols = random_columns("s0", [f"s0-{i:05d}" for i in range(4000)], pool=4, d=8, f=12, k=3,
                          rng=np.random.default_rng(1))
    # No file of this process may grow past the limit (Python ignores SIGXFSZ: the write fails, EFBIG).
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        write_shard(sys.argv[1], "s0", cols, [], d=8, f=12, k=3, pool_size=4)
    except OSError as exc:
        print("failed:", exc)
    else:
        print("written")
""")


def test_a_rewrite_that_fails_mid_file_leaves_the_previous_signals_file_whole(tmp_path, make_columns):
    """A shard written again (a resumed pass redoing it) whose write breaks off part way, here at
    the process's file size limit, leaves the file already under the final name as it was."""
    write_shard(tmp_path, "s0", make_columns("s0", 10), [], **DIMS)
    path = signals_path(tmp_path, "s0")
    before, limit = path.read_bytes(), 64 * 1024
    assert len(before) < limit  # the old file fits under the limit; 4000 rows of noise do not
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR.parent)}
    child = subprocess.run([sys.executable, "-c", REWRITE_CHILD, str(tmp_path), str(TESTS_DIR), str(limit)],
                           capture_output=True, text=True, env=env, timeout=120)
    assert child.returncode == 0 and child.stdout.startswith("failed:"), child.stdout + child.stderr
    assert "File too large" in child.stdout, child.stdout
    assert path.read_bytes() == before  # not truncated, not half rewritten: the old whole file
    assert pq.read_table(path).num_rows == 10
    assert not list(tmp_path.rglob(TMP_PREFIX + "*"))


def test_failed_signals_write_leaves_no_file_of_the_shard(tmp_path, make_columns):
    """A write that fails (read-only folder, full disk) leaves neither file nor temporary."""
    (tmp_path / "signals").write_text("a file where the signals folder should be")
    with pytest.raises(OSError):
        write_shard(tmp_path, "s0", make_columns("s0", 5), [("s0-x", "no_caption", "")], **DIMS)
    assert not rejects_path(tmp_path, "s0").exists()
    assert _files(tmp_path) == ["signals"]


# --- manifest ---------------------------------------------------------------

def test_manifest_round_trip_and_atomic_save(tmp_path):
    m = Manifest(teachers={"dual": {"path": "/t", "config_sha256": "a", "weights_sha256": "b"}},
                 params={"pool_size": 4, "k": 3, "d": 8, "f": 12})
    entry = {"source": "/d/0.tar", "size": 10, "mtime": 1.5, "rows": 3, "rejected": 0,
             "pools": 1, "seconds": 0.1, "status": STATUS_DONE}
    m.record_shard("00001", entry)
    m.record_shard("00000", {**entry, "status": "failed"})
    m.save(tmp_path)
    back = Manifest.load(tmp_path)
    assert back == m and back.done_shards() == ["00001"]
    assert isinstance(back.mcad_version, str) and back.mcad_version
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_NAME]
    with pytest.raises(ValueError, match="lacks \\['status'\\]"):
        m.record_shard("x", {k: v for k, v in entry.items() if k != "status"})


def test_manifest_load_refuses_bad_files(tmp_path):
    with pytest.raises(InputError, match="not a signal store"):
        Manifest.load(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**Manifest().to_dict(), "schema_version": 7}))
    with pytest.raises(InputError, match="version 7"):
        Manifest.load(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**Manifest().to_dict(), "colour": 1}))
    with pytest.raises(InputError, match="unknown manifest fields \\['colour'\\]"):
        Manifest.load(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        Manifest.load(tmp_path)


def test_source_identity_and_file_digest(tmp_path):
    src = tmp_path / "0.tar"
    src.write_bytes(b"abc")
    os.utime(src, (1000.0, 1000.0))
    ident = source_identity(src)
    assert ident == {"source": str(src.resolve()), "size": 3, "mtime": 1000.0}
    os.utime(src, (2000.0, 2000.0))
    assert source_identity(src)["mtime"] == 2000.0
    assert file_digest(src) == hashlib.sha256(b"abc").hexdigest()
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    before = file_digest(model)
    (model / "config.json").write_text('{"a": 1}')
    assert file_digest(model) != before
    with pytest.raises(InputError):
        source_identity(tmp_path / "missing.tar")
    with pytest.raises(InputError):
        file_digest(tmp_path / "missing.bin")


def test_same_source_needs_the_same_size_and_mtime(tmp_path):
    src = tmp_path / "0.tar"
    src.write_bytes(b"abc")
    os.utime(src, (1000.0, 1000.0))
    pinned = source_identity(src)
    assert same_source(pinned, source_identity(src))
    assert same_source(pinned, {**pinned, "mtime": 1000.0004})  # an object listing's precision
    os.utime(src, (1001.0, 1001.0))  # rewritten in place: same size, new mtime
    assert not same_source(pinned, source_identity(src))
    os.utime(src, (1000.0, 1000.0))
    src.write_bytes(b"abcd")
    os.utime(src, (1000.0, 1000.0))  # same mtime, other size
    assert not same_source(pinned, source_identity(src))


def test_the_store_layout_and_manifest_names_are_pinned(tmp_path, make_store):
    # Stores on disk are read by later versions and by other tools: the file names and the
    # manifest's keys and status words are the format, spelled out here.
    from mcad.storage import manifest as mf

    store = make_store(tmp_path / "store", shards=1)
    assert sorted(p.name for p in store.iterdir()) == ["manifest.json", "rejects", "signals"]
    assert [p.name for p in (store / "signals").iterdir()] == ["00000.parquet"]
    raw = json.loads((store / "manifest.json").read_text())
    body = {k: v for k, v in raw.items() if k != "manifest_sha256"}
    assert raw["manifest_sha256"] == hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert raw["params"]["logit_scale"] > 0
    entry = raw["shards"]["00000"]
    assert entry["status"] == "done"
    assert {"source", "size", "mtime", "rows", "rejected", "pools", "seconds",
            "signals_sha256", "signals_bytes", "rejects_sha256", "rejects_bytes"} <= set(entry)
    assert entry["rejects_sha256"] == file_digest(store / "rejects" / "00000.parquet")
    assert entry["rejects_bytes"] == (store / "rejects" / "00000.parquet").stat().st_size
    names = (mf.FUSION_PROJ_NAME, mf.PASS_CONFIG_NAME, mf.LOCK_NAME, mf.PARAM_LOGIT_SCALE,
             mf.PARAM_FUSION_PROJ_SHA256, mf.STATUS_PENDING, mf.SOURCE_SHA256)
    assert names == ("fusion_proj.safetensors", "teacher_pass_config.json", "pass.lock", "logit_scale",
                     "fusion_proj_sha256", "pending", "source_sha256")


def test_a_new_manifest_is_empty_unsealed_and_names_this_mcad(monkeypatch):
    import mcad
    from mcad.storage import manifest as mf

    fresh = Manifest()
    assert (fresh.teachers, fresh.params, fresh.shards) == ({}, {}, {})
    assert fresh.sealed is False  # only a manifest loaded with its own digest is sealed
    assert fresh.schema_version == schema.SCHEMA_VERSION and fresh.mcad_version == mcad.__version__

    def not_installed(name):
        raise mf.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(mf.importlib.metadata, "version", not_installed)
    assert Manifest().mcad_version == "0+unknown"


def test_same_source_refuses_a_whole_millisecond_and_folder_digests_are_pinned(tmp_path):
    at = {"source": "/d/0.tar", "size": 3, "mtime": 0.0}
    assert not same_source(at, {**at, "mtime": 0.001})  # "to the millisecond": 1 ms is a change
    # A folder's digest (a teacher directory's, pinned in manifests): sha256 over "NAME\0SHA256\n"
    # of each file, in sorted relative-path order.
    (tmp_path / "t" / "sub").mkdir(parents=True)
    (tmp_path / "t" / "b.json").write_bytes(b"{}")
    (tmp_path / "t" / "sub" / "a.bin").write_bytes(b"abc")
    lines = "".join(f"{name}\0{hashlib.sha256(data).hexdigest()}\n"
                    for name, data in (("b.json", b"{}"), ("sub/a.bin", b"abc")))
    assert file_digest(tmp_path / "t") == hashlib.sha256(lines.encode()).hexdigest()
