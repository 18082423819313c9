"""Reader: checked opening, replay/remix splits, the join with the data, refusals, fingerprint."""
from __future__ import annotations

import json
import re
import shutil
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from mcad.storage import schema
from mcad.storage.data_join import iter_joined_pools, iter_joined_rows
from mcad.storage.errors import InputError
from mcad.storage.manifest import MANIFEST_NAME, Manifest, file_digest, rejects_path, signals_path
from mcad.storage.reader import fingerprint_digest, open_store

from helpers import flip_in_footer, record_digests, write_manifest

SPLIT = {"world_size": 2, "num_workers": 2}
SLOTS = [{"rank": r, "worker": w, **SPLIT} for r in range(2) for w in range(2)]


@pytest.fixture
def store_dir(tmp_path, make_store):
    # 3 shards of 10, 7, 5 rows in pools of 4: pools of 4,4,2 | 4,3 | 4,1.
    return make_store(tmp_path / "store", shards=3, rows_per_shard=(10, 7, 5), rejects_per_shard=2)


def _ids(batch):
    return list(zip(batch[schema.SHARD], batch[schema.ROW].tolist()))


def _all_ids(store):
    return [(name, r) for name in store.shards for r in range(store.shard_rows[name])]


def _edit_manifest(root, fn):
    raw = json.loads((root / MANIFEST_NAME).read_text())
    fn(raw)
    write_manifest(root, raw)


def test_open_store_describes_the_store(store_dir):
    store = open_store(store_dir)
    assert store.shards == ("00000", "00001", "00002")
    assert store.dims == {"d": 8, "f": 12, "k": 3} and store.pool_size == 4
    assert store.num_rows == 22 and store.num_pools == 7
    assert store.rejected_keys("00001") == set(pq.read_table(rejects_path(store_dir, "00001"))
                                              .column(schema.REJECT_KEY).to_pylist())


def test_pools_round_trip_every_column_in_shard_order(store_dir):
    store = open_store(store_dir)
    pools = list(store.iter_pools())
    assert [len(p[schema.KEY]) for p in pools] == [4, 4, 2, 4, 3, 4, 1]
    assert [i for p in pools for i in _ids(p)] == _all_ids(store)
    for p in pools:  # one pool per dict, never crossing shards
        assert len(set(p[schema.SHARD])) == 1 and len(set(p[schema.POOL].tolist())) == 1
    first = pools[0]
    table = pq.read_table(signals_path(store_dir, "00000")).slice(0, 4)
    assert first[schema.IMG_EMB].dtype == np.float16 and first[schema.IMG_EMB].shape == (4, 8)
    assert first[schema.FUSED].shape == (4, 12)
    assert first[schema.col("i2t", schema.IDX)].dtype == np.int32 and first[schema.col("i2t", schema.IDX)].shape == (4, 3)
    assert first[schema.col("t2i", schema.DUAL)].dtype == np.float32 and first[schema.ITM_POS].dtype == np.float32
    for name in schema.SIGNAL_COLUMNS:
        expected = table.column(name).to_pylist()
        got = first[name] if isinstance(first[name], list) else first[name].tolist()
        assert got == expected, name
    last = pools[2]  # rows 8, 9: a pool smaller than K
    assert (last[schema.col("i2t", schema.IDX)][:, 2] == schema.PAD_IDX).all()
    assert np.isneginf(last[schema.col("t2i", schema.ITM)][:, 2]).all()


def test_pools_read_a_column_subset(store_dir):
    pools = list(open_store(store_dir).iter_pools(columns=[schema.ROW, schema.TXT_EMB]))
    assert set(pools[0]) == {schema.ROW, schema.TXT_EMB}
    with pytest.raises(ValueError, match="unknown signal columns"):
        next(open_store(store_dir).iter_pools(columns=["nope"]))


def test_pools_from_files_whose_row_groups_cut_across_pools(store_dir):
    store = open_store(store_dir)
    before = list(store.iter_pools(shuffle=True, seed=3))
    path = signals_path(store_dir, "00000")
    pq.write_table(pq.read_table(path), path, row_group_size=3)  # groups 0-2, 3-5, 6-8, 9
    assert pq.read_metadata(path).num_row_groups == 4
    record_digests(store_dir, "00000")
    after = list(open_store(store_dir).iter_pools(shuffle=True, seed=3))
    assert [_ids(p) for p in after] == [_ids(p) for p in before]
    np.testing.assert_array_equal(after[0][schema.FUSED], before[0][schema.FUSED])


@pytest.mark.parametrize("shuffle", [False, True])
def test_replay_split_reads_every_pool_once(store_dir, shuffle):
    store = open_store(store_dir)
    pools, rows = Counter(), Counter()
    for slot in SLOTS:
        mine = list(store.iter_pools(shuffle=shuffle, seed=5, epoch=1, **slot))
        assert mine  # 7 pools over 4 slots: everyone gets some
        for pool in mine:
            pools[(pool[schema.SHARD][0], int(pool[schema.POOL][0]))] += 1
            rows.update(_ids(pool))
    assert len(pools) == store.num_pools and set(pools.values()) == {1}
    assert sorted(rows) == sorted(_all_ids(store)) and set(rows.values()) == {1}


def test_replay_shuffle_depends_on_seed_and_epoch(store_dir):
    store = open_store(store_dir)

    def order(**kw):
        return [_ids(p)[0] for p in store.iter_pools(shuffle=True, **kw)]

    assert order(seed=0, epoch=0) == order(seed=0, epoch=0)
    assert sorted(order(seed=0, epoch=0)) == sorted(order(seed=1, epoch=0))
    assert len({tuple(order(seed=s, epoch=e)) for s in range(3) for e in range(3)}) > 5
    assert [_ids(p)[0] for p in store.iter_pools()] == sorted(order(seed=0, epoch=0))


def test_remix_split_reads_every_row_once_in_mixed_batches(store_dir):
    store = open_store(store_dir)
    seen, sizes, mixed = Counter(), [], False
    for slot in SLOTS:
        batches = list(store.iter_rows(batch_size=3, buffer_size=6, seed=2, **slot))
        sizes += [len(b[schema.KEY]) for b in batches[:-1]]
        for b in batches:
            seen.update(_ids(b))
            mixed |= len({(s, int(p)) for s, p in zip(b[schema.SHARD], b[schema.POOL])}) > 1
            assert b[schema.IMG_EMB].shape == (len(b[schema.KEY]), 8)
    assert sorted(seen) == sorted(_all_ids(store)) and set(seen.values()) == {1}
    assert set(sizes) == {3} and mixed


def test_remix_order_depends_on_seed_and_epoch_and_is_plain_without_shuffle(store_dir):
    store = open_store(store_dir)

    def rows(**kw):
        return [i for b in store.iter_rows(batch_size=4, buffer_size=8, **kw) for i in _ids(b)]

    assert rows(seed=0) == rows(seed=0)
    assert rows(seed=0) != rows(seed=1) and rows(seed=0) != rows(seed=0, epoch=1)
    assert sorted(rows(seed=1)) == sorted(_all_ids(store))
    plain = list(store.iter_rows(batch_size=5, shuffle=False))
    assert [len(b[schema.KEY]) for b in plain] == [5, 5, 5, 5, 2]
    assert [i for b in plain for i in _ids(b)] == _all_ids(store)
    with pytest.raises(ValueError, match="batch_size"):
        next(store.iter_rows(batch_size=8, buffer_size=4))


def test_bad_split_arguments_are_refused(store_dir):
    with pytest.raises(ValueError, match="rank"):
        next(open_store(store_dir).iter_pools(rank=2, world_size=2))


# --- joined with the data ----------------------------------------------------

def _tar_samples(store, *, with_rejected=True):
    """What a caller's tar walker yields per source: (key, payload) in tar order."""
    out = {}
    for name in store.shards:
        keys = [k for p in store.iter_pools(columns=[schema.KEY]) if p[schema.KEY][0].startswith(name)
                for k in p[schema.KEY]]
        if with_rejected:
            keys = sorted(keys + sorted(store.rejected_keys(name)))  # keys sort in tar order
        out[store.manifest.shards[name]["source"]] = [(k, {"payload": k}) for k in keys]
    return out


def _opener(samples):
    def open_samples(source):  # a plain generator, like the caller's tar walker
        yield from samples[source]
    return open_samples


@pytest.mark.parametrize("with_rejected", [False, True])
def test_joined_pools_align_data_with_rows(store_dir, with_rejected):
    store = open_store(store_dir)
    open_samples = _opener(_tar_samples(store, with_rejected=with_rejected))
    pools = list(iter_joined_pools(store, open_samples))
    assert [i for p in pools for i in _ids(p)] == _all_ids(store)
    for p in pools:
        assert [d["payload"] for d in p[schema.DATA]] == p[schema.KEY]


def test_joined_split_by_shards_reads_every_row_once(store_dir):
    store = open_store(store_dir)
    open_samples = _opener(_tar_samples(store))
    seen, shard_sets = Counter(), []
    for slot in SLOTS:
        pools = list(iter_joined_pools(store, open_samples, shuffle=True, seed=1, buffer_pools=2, **slot))
        shard_sets.append({p[schema.SHARD][0] for p in pools})
        for p in pools:
            assert [d["payload"] for d in p[schema.DATA]] == p[schema.KEY]
            seen.update(_ids(p))
    assert sorted(seen) == sorted(_all_ids(store)) and set(seen.values()) == {1}
    assert sum(len(s) for s in shard_sets) == 3  # whole shards, each to one slot

    def order(**kw):
        return [_ids(p)[0] for p in iter_joined_pools(store, open_samples, shuffle=True, **kw)]

    assert len({tuple(order(seed=s, epoch=e)) for s in range(3) for e in range(3)}) > 3


def test_joined_rows_remix_keeps_data_aligned(store_dir):
    store = open_store(store_dir)
    open_samples = _opener(_tar_samples(store))
    seen = Counter()
    for slot in SLOTS:
        for b in iter_joined_rows(store, open_samples, batch_size=3, buffer_size=6, seed=4, **slot):
            assert [d["payload"] for d in b[schema.DATA]] == b[schema.KEY]
            seen.update(_ids(b))
    assert sorted(seen) == sorted(_all_ids(store)) and set(seen.values()) == {1}


def test_joined_refuses_misaligned_data(store_dir):
    store = open_store(store_dir)
    samples = _tar_samples(store, with_rejected=False)
    src = store.manifest.shards["00001"]["source"]
    good = list(samples[src])

    samples[src] = good[:5] + [("00001-999999", {})] + good[6:]
    with pytest.raises(InputError, match=r"shard 00001, row 5: the data has key '00001-999999' "
                                         rf"where the store has key '{good[5][0]}'"):
        list(iter_joined_pools(store, _opener(samples)))
    samples[src] = good[:6]
    with pytest.raises(InputError, match="shard 00001, row 6: the data ended where the store has key"):
        list(iter_joined_pools(store, _opener(samples)))
    samples[src] = good + [("00001-999999", {})]
    with pytest.raises(InputError, match="shard 00001, row 7: the data has key '00001-999999' after"):
        list(iter_joined_pools(store, _opener(samples)))


# --- refusals ----------------------------------------------------------------

def test_refuses_unknown_manifest_version(store_dir):
    _edit_manifest(store_dir, lambda m: m.update(schema_version=99))
    with pytest.raises(InputError, match="version 99"):
        open_store(store_dir)


def test_refuses_unknown_parquet_version(store_dir):
    path = signals_path(store_dir, "00001")
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({schema.METADATA_VERSION_KEY: b"99"}), path)
    with pytest.raises(InputError, match="shard 00001 .*version 99"):
        open_store(store_dir)


def test_refuses_missing_shard_file(store_dir):
    signals_path(store_dir, "00002").unlink()
    with pytest.raises(InputError, match=r"shard 00002: manifest says done but signals/00002.parquet"):
        open_store(store_dir)


def test_refuses_orphan_file(store_dir):
    shutil.copy(signals_path(store_dir, "00000"), signals_path(store_dir, "00007"))
    with pytest.raises(InputError, match="shard 00007 has a signals file but no manifest entry"):
        open_store(store_dir)


def test_refuses_row_count_mismatch(store_dir):
    _edit_manifest(store_dir, lambda m: m["shards"]["00001"].update(rows=8))
    with pytest.raises(InputError, match="shard 00001: files hold 7 rows, the manifest says 8"):
        open_store(store_dir)


def test_refuses_unfinished_shard_unless_asked(store_dir):
    _edit_manifest(store_dir, lambda m: m["shards"]["00001"].update(status="running"))
    with pytest.raises(InputError, match=r"incomplete: 2 of 3 shards done; finish it with "
                                         r"mcad pipeline teacher-pass \.\.\. --out .* --resume$"):
        open_store(store_dir)
    assert open_store(store_dir, allow_incomplete=True).shards == ("00000", "00002")


def test_refuses_non_stores_and_bad_params(tmp_path, store_dir):
    with pytest.raises(InputError, match="not a signal store"):
        open_store(tmp_path / "nowhere")
    _edit_manifest(store_dir, lambda m: m["params"].pop("pool_size"))
    with pytest.raises(InputError, match="'pool_size'"):
        open_store(store_dir)


def test_refuses_files_whose_dims_differ_from_the_manifest(store_dir):
    _edit_manifest(store_dir, lambda m: m["params"].update(d=16))
    with pytest.raises(InputError, match="shard 00000: signals file has dims"):
        open_store(store_dir)


def test_error_messages_are_one_line(store_dir):
    (signals_path(store_dir, "00000")).write_bytes(b"not parquet at all")
    with pytest.raises(InputError) as info:
        open_store(store_dir)
    assert "shard 00000: unreadable Parquet" in str(info.value) and "\n" not in str(info.value)


# --- the files against their manifest digests ---------------------------------------

def test_a_file_changed_after_the_pass_is_refused_on_its_first_read(store_dir):
    """Changes that every footer, count and page check lets through: only the file's size and sha256
    in the manifest can tell, and the reader checks them when it first opens a file."""
    # The same rows written again, uncompressed: another file, of another size.
    path = signals_path(store_dir, "00001")
    pq.write_table(pq.read_table(path), path, compression="none", write_page_checksum=True)
    store = open_store(store_dir)  # footers, dims and counts all agree
    size = path.stat().st_size
    with pytest.raises(InputError, match=rf"{re.escape(str(store_dir))}: shard 00001: signals/00001.parquet: {size} bytes, "
                                         rf"the manifest records \d+ \(signals_bytes\)"):
        list(store.iter_pools())
    with pytest.raises(InputError, match="shard 00001: signals/00001.parquet: .* bytes, the manifest records"):
        open_store(store_dir).verify_files()

    # Same size, same rows, every page decodes: one bit flipped in a footer (signals, then rejects).
    for folder, shard in (("signals", "00000"), ("rejects", "00002")):
        flip_in_footer(store_dir / folder / f"{shard}.parquet")
        store = open_store(store_dir)
        assert pq.read_table(store_dir / folder / f"{shard}.parquet").num_rows == (
            store.shard_rows[shard] if folder == "signals" else 2)
        want = f"shard {shard}: {folder}/{shard}.parquet: the file does not match its manifest {folder}_sha256"
        read = (lambda: next(store.iter_pools())) if folder == "signals" else (lambda: store.rejected_keys(shard))
        with pytest.raises(InputError, match=want):
            read()
        with pytest.raises(InputError, match=want):
            open_store(store_dir).verify_files([shard])


# --- fingerprint -----------------------------------------------------------------

def test_fingerprint_pins_sources_teachers_and_params(store_dir):
    fp = open_store(store_dir).fingerprint()
    assert fp["schema_version"] == schema.SCHEMA_VERSION and fp["params"]["pool_size"] == 4
    assert set(fp["teachers"]["dual"]) == {"config_sha256", "weights_sha256"}  # paths may move
    assert set(fp["shards"]["00000"]) == {"source", "size", "mtime"}
    assert open_store(store_dir).fingerprint() == fp
    same_digest = fingerprint_digest(fp)

    edits = [
        lambda m: m["shards"]["00001"].update(size=m["shards"]["00001"]["size"] + 1),
        lambda m: m["shards"]["00001"].update(mtime=m["shards"]["00001"]["mtime"] + 1.0),
        lambda m: m["teachers"]["single"].update(weights_sha256="f" * 64),
    ]
    for edit in edits:
        _edit_manifest(store_dir, edit)
        changed = open_store(store_dir).fingerprint()
        assert changed != fp and fingerprint_digest(changed) != same_digest
        fp, same_digest = changed, fingerprint_digest(changed)
    _edit_manifest(store_dir, lambda m: m["teachers"]["dual"].update(path="/moved/elsewhere"))
    assert open_store(store_dir).fingerprint() == fp
    assert Manifest.load(store_dir).teachers["dual"]["path"] == "/moved/elsewhere"


def test_open_store_accepts_the_smallest_store_and_stray_non_parquet_files(tmp_path, make_store):
    # Every required param may be 1; a file in signals/ that is not a .parquet is no shard.
    root = make_store(tmp_path / "tiny", shards=1, rows_per_shard=(1,), pool=1, d=1, f=1, k=1)
    (root / "signals" / "NOTES.txt").write_text("copied by hand")
    store = open_store(root)
    assert list(store.shards) == ["00000"] and store.num_rows == 1


def test_a_bad_signals_file_is_named_as_such(store_dir):
    path = signals_path(store_dir, "00001")
    pq.write_table(pq.read_table(path).replace_schema_metadata({}), path)
    with pytest.raises(InputError, match=r"shard 00001 \(signals file\): signal schema version None"):
        open_store(store_dir)


def test_fingerprint_digest_ignores_key_order():
    assert fingerprint_digest({"a": 1, "b": {"c": 2, "d": 3}}) == fingerprint_digest({"b": {"d": 3, "c": 2}, "a": 1})


def test_unreadable_column_message():
    from mcad.storage.parquet_files import unreadable_column

    exc = OSError("Corrupt page\n  at offset 12")
    tail = "unreadable (Corrupt page); the file is damaged: restore it or rerun the teacher pass"
    assert str(unreadable_column("S: shard 0", "itm_pos", exc)) == f"S: shard 0: column itm_pos: {tail}"
    assert str(unreadable_column("S: shard 0", None, exc)) == f"S: shard 0: {tail}"


def test_verify_projection_checks_the_pinned_digest(store_dir):
    from mcad.storage.manifest import FUSION_PROJ_NAME

    assert open_store(store_dir).verify_projection() is False  # nothing pinned
    proj = store_dir / FUSION_PROJ_NAME
    proj.write_bytes(b"W of the pass")
    _edit_manifest(store_dir, lambda m: m["params"].update(fusion_proj_sha256=file_digest(proj)))
    assert open_store(store_dir).verify_projection() is True
    proj.write_bytes(b"W of another pass")
    with pytest.raises(InputError, match="fusion_proj.safetensors does not match the manifest's fusion_proj_sha256"):
        open_store(store_dir).verify_projection()
    proj.unlink()
    with pytest.raises(InputError, match="fusion_proj.safetensors is missing"):
        open_store(store_dir).verify_projection()
