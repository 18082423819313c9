"""Stores and shards at a URI: the same bytes and the same reads as on a local disk.

pyarrow's in-memory `mock://` filesystem stands in for object storage (s3://,
gs://) inside one process; `file://` URIs take the URI code path on real files.
"""
from __future__ import annotations

import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import image_bytes, tar_bytes
from mcad.pipeline.shard_list import list_shards
from mcad.pipeline.shards import Sample, iter_shard
from mcad.storage import fs
from mcad.storage.errors import InputError
from mcad.storage.manifest import Manifest, signals_path, source_identity
from mcad.storage.reader import open_store


def _mock(tmp: str = "") -> str:
    return f"mock:///{uuid.uuid4().hex}{tmp}"


def test_paths_and_files_at_a_uri():
    root = _mock()
    fs.write_bytes(fs.join(root, "a", "x.txt"), b"hello")
    assert fs.is_dir(fs.join(root, "a")) and fs.is_file(fs.join(root, "a", "x.txt"))
    assert fs.read_bytes(fs.join(root, "a", "x.txt")) == b"hello"
    assert fs.listdir(fs.join(root, "a")) == [fs.join(root, "a", "x.txt")]
    assert fs.glob(fs.join(root, "a", "*.txt")) == [fs.join(root, "a", "x.txt")]
    assert fs.size_and_mtime(fs.join(root, "a", "x.txt"))[0] == 5
    fs.remove(fs.join(root, "a", "x.txt"))
    assert not fs.exists(fs.join(root, "a", "x.txt")) and fs.listdir(fs.join(root, "nothing")) == []
    assert fs.join("s3://bucket/store/", "signals", "0.parquet") == "s3://bucket/store/signals/0.parquet"
    assert fs.resolve("file:///tmp/a/b")[1] == "/tmp/a/b"
    with pytest.raises(InputError, match="only the file name"):
        fs.glob(fs.join(root, "*", "x.txt"))
    with pytest.raises(InputError, match="cannot open"):
        fs.resolve("nosuchscheme://x/y")


def test_a_store_at_a_uri_reads_exactly_like_the_same_store_on_disk(tmp_path, make_store):
    local = make_store(tmp_path / "store", shards=3, rows_per_shard=(10, 7, 4), seed=3)
    remote = make_store(_mock("/store"), shards=3, rows_per_shard=(10, 7, 4), seed=3)
    a, b = open_store(local), open_store(remote)
    assert a.fingerprint() == b.fingerprint() and a.num_pools == b.num_pools
    for pa_, pb in zip(a.iter_pools(shuffle=True, seed=1), b.iter_pools(shuffle=True, seed=1)):
        assert pa_.keys() == pb.keys()
        for name in pa_:
            assert np.array_equal(np.asarray(pa_[name]), np.asarray(pb[name]))
    assert a.rejected_keys("00001") == b.rejected_keys("00001")
    # Byte-identical Parquet files: the writer does not care where they go.
    assert pq.read_table(signals_path(local, "00000")).equals(
        pq.read_table(fs.resolve(signals_path(remote, "00000"))[1], filesystem=fs.resolve(remote)[0]))


def test_a_uri_store_missing_a_file_is_refused_like_a_local_one(make_store):
    remote = make_store(_mock("/store"))
    fs.remove(signals_path(remote, "00001"))
    with pytest.raises(InputError, match="signals/00001.parquet is missing"):
        open_store(remote)
    with pytest.raises(InputError, match="not a signal store"):
        Manifest.load(_mock("/empty"))


def _tar(samples: dict[str, str]) -> bytes:
    png = image_bytes("PNG", color=(200, 10, 10))
    return tar_bytes([member for key, caption in samples.items()
                      for member in ((key + ".png", png), (key + ".txt", caption.encode()))])


def test_shards_at_a_uri_are_listed_and_streamed(tmp_path):
    root = _mock("/data")
    for i in range(3):
        fs.write_bytes(fs.join(root, f"{i:06d}.tar"), _tar({f"k{i}-{j}": f"caption {j}" for j in range(2)}))
    fs.write_bytes(fs.join(root, "sidecar.json"), b"not a shard")
    shards = list_shards(root)
    assert shards == [fs.join(root, f"{i:06d}.tar") for i in range(3)]
    assert list_shards(fs.join(root, "00000{0..1}.tar")) == shards[:2]
    assert list_shards(fs.join(root, "*.tar")) == shards
    samples = [s for s in iter_shard(shards[1]) if isinstance(s, Sample)]
    assert [s.key for s in samples] == ["k1-0", "k1-1"] and samples[0].image.size == (8, 8)
    assert source_identity(shards[0])["size"] == fs.size_and_mtime(shards[0])[0]
    # file:// URIs take the same path on real files.
    (tmp_path / "000000.tar").write_bytes(_tar({"a": "b"}))
    assert list_shards(f"file://{tmp_path}") == [f"file://{tmp_path}/000000.tar"]
    assert [s.key for s in iter_shard(f"file://{tmp_path}/000000.tar")] == ["a"]
    with pytest.raises(InputError, match="shard not found"):
        list_shards(fs.join(root, "missing.tar"))


def test_signals_queries_refuse_a_store_at_a_uri_in_one_line(make_store):
    from mcad.storage.query import connect

    with pytest.raises(InputError, match="local or mounted disk"):
        connect(make_store(_mock("/store")))


def test_require_empty_refuses_a_folder_that_holds_anything(tmp_path):
    from mcad.storage.fs import require_empty

    require_empty(tmp_path / "new", "choose another")  # a folder that does not exist yet
    require_empty(tmp_path, "choose another")           # an empty one
    (tmp_path / ".hidden").write_text("x")
    with pytest.raises(InputError, match=r"is not empty; choose another$"):
        require_empty(tmp_path, "choose another")
