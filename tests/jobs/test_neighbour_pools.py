"""Neighbour pools end to end on a real local Ray cluster (issue #18): the pass with --pools neighbours,
its store checked against the input, the same tables from two workers and a resume, a resume in the
other mode refused, and students (stored and online, with the ranking term) reading it.

Two of the toy train split's three shards keep it short.
"""
from __future__ import annotations

import json
import shlex
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from helpers import assert_one_line_error, invoke
from mcad.jobs.teacher_pass import run_teacher_pass
from mcad.pipeline.pools import mean_pool_cosine, neighbour_order
from mcad.pipeline.shards import Sample, iter_shard
from mcad.pipeline.store_data import kept_samples
from mcad.storage import schema
from mcad.storage.data_join import iter_joined_pools
from mcad.storage.errors import InputError
from mcad.storage.manifest import PASS_CONFIG_NAME, Manifest, signals_path
from mcad.storage.reader import open_store
from mcad.student.config import TrainConfig
from mcad.student.data import student_batches
from mcad.student.train import batch_loss

pytestmark = pytest.mark.ray

SHARDS = ("000000", "000001")


@pytest.fixture(scope="module")
def make_job(pass_job):
    return lambda out, **kw: pass_job(out, **{"pools": "neighbours", **kw})


@pytest.fixture(scope="module")
def neighbour_store(ray_local, make_job, tmp_path_factory):
    out = tmp_path_factory.mktemp("neighbour_store")
    assert run_teacher_pass(make_job(out), progress=False)["rows"] == 40
    return out


def _tables(store):
    return {p.name: pq.read_table(p) for p in sorted((store / "signals").glob("*.parquet"))}


def test_rows_follow_the_neighbour_pools_of_the_dual_embeddings(neighbour_store, tiny_store, two_shards, tiny_teachers,
                                                                tiny_pass):
    from mcad.pipeline.teachers import load_teachers

    store = open_store(neighbour_store)
    assert store.pool_mode == "neighbours" and store.fingerprint()["pools"] == "neighbours"
    assert "pools" not in open_store(tiny_store).fingerprint()  # a consecutive store's fingerprint as before
    assert json.loads((neighbour_store / PASS_CONFIG_NAME).read_text())["pools"] == "neighbours"
    dual, _ = load_teachers(*tiny_teachers)
    p = tiny_pass["pool_size"]
    for name in SHARDS:
        table, plain = pq.read_table(signals_path(neighbour_store, name)), pq.read_table(signals_path(tiny_store, name))
        samples = [s for s in iter_shard(two_shards / f"{name}.tar") if isinstance(s, Sample)]
        # the dual embeddings as the pass takes them: P samples at a time, in shard order
        emb = torch.cat([dual.encode_images([s.image for s in samples[lo:lo + p]]) for lo in range(0, 20, p)])
        order = neighbour_order(emb.numpy(), p)
        keys = table.column(schema.KEY).to_pylist()
        assert keys == [samples[i].key for i in order] != plain.column(schema.KEY).to_pylist()
        assert table.column(schema.ROW).to_pylist() == list(range(20))
        assert table.column(schema.POOL).to_pylist() == [r // p for r in range(20)]
        emb = np.asarray(table.column(schema.IMG_EMB).combine_chunks().flatten(), np.float32).reshape(20, -1)
        plain_emb = np.asarray(plain.column(schema.IMG_EMB).combine_chunks().flatten(), np.float32).reshape(20, -1)
        # the same samples with the consecutive store's embeddings, alike within a pool
        by_key = dict(zip(plain.column(schema.KEY).to_pylist(), plain_emb))
        np.testing.assert_array_equal(emb, [by_key[k] for k in keys])
        assert mean_pool_cosine(emb, np.arange(20), p) > mean_pool_cosine(plain_emb, np.arange(20), p)
    # the store against its input, key by key, and every row rule
    result = invoke("signals", "validate", str(neighbour_store), "--data", str(two_shards))
    assert result.exit_code == 0, result.output


def test_two_workers_and_a_resume_write_the_same_tables_and_a_resume_keeps_the_mode(neighbour_store, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(neighbour_store, resumed)
    manifest = Manifest.load(resumed)
    for name in SHARDS:
        manifest.shards[name]["status"] = "pending"
        signals_path(resumed, name).unlink()
    manifest.save(resumed)
    with pytest.raises(InputError, match="incomplete: 0 of 2 shards done") as refused:
        open_store(resumed)
    command = shlex.split(str(refused.value).split("finish it with ", 1)[1])
    assert command[-3:] == ["--pools", "neighbours", "--resume"]
    other = [*command[1:-3], "--pools", "consecutive", "--resume"]
    assert_one_line_error(invoke(*other), "cannot resume", "pool mode (consecutive) differs", "--pools neighbours")
    result = invoke(*command[1:], "--workers", "2")
    assert result.exit_code == 0, result.output
    want, got = _tables(neighbour_store), _tables(resumed)
    assert got.keys() == want.keys() and all(got[n].equals(want[n]) for n in want)


def test_the_join_holds_samples_read_ahead_and_still_refuses_foreign_keys(neighbour_store):
    store = open_store(neighbour_store)
    pools = list(iter_joined_pools(store, kept_samples))
    assert sum(len(p[schema.KEY]) for p in pools) == 40
    for pool in pools:
        assert [s.key for s in pool[schema.DATA]] == pool[schema.KEY]

    def foreign(source):
        items = list(kept_samples(source))
        return iter(items[:3] + [("000000-999999", items[3][1])] + items[3:])

    with pytest.raises(InputError, match="the data has key '000000-999999'"):
        list(iter_joined_pools(store, foreign))

    def short(source):
        return iter(list(kept_samples(source))[:-1])

    with pytest.raises(InputError, match="the data ended where the store has key"):
        list(iter_joined_pools(store, short))


def test_students_read_the_store_stored_and_online_with_the_ranking_term(neighbour_store, two_shards, tiny_teachers,
                                                                         tmp_path):
    from mcad.pipeline.online import online_signals
    from mcad.student.models import build_student

    store = open_store(neighbour_store)
    dual_dir = store.manifest.teachers["dual"]["path"]
    online = online_signals(store, *tiny_teachers)
    cfg = TrainConfig(w_rank=1.0, rank_by="combined", itm_norm="pool", k_prime=2)
    losses = {}
    for name, signals in (("stored", None), ("online", online)):
        student, processor = build_student("smoke", tokenizer_from=dual_dir, teacher_dim=store.dims["d"], seed=3)
        batches = list(student_batches(store, cfg, processor, samples=kept_samples, epoch=0, signals=signals))[:2]
        losses[name] = [{k: v.item() for k, v in batch_loss(cfg, student, b, store.manifest.params["logit_scale"])[1]
                         .items()} for b in batches]
    for stored, fresh in zip(losses["stored"], losses["online"]):
        assert stored["rank"] > 0 and stored["rank"] == pytest.approx(fresh["rank"], rel=1e-3)
        assert stored["loss"] == pytest.approx(fresh["loss"], rel=2e-3)
    run = tmp_path / "run"
    result = invoke("pipeline", "train-student", "--store", str(neighbour_store), "--data", str(two_shards),
                    "--out", str(run), "--preset", "smoke", "--epochs", "1", "--verify-data", "--w-rank", "0.5",
                    "--itm-norm", "pool")
    assert result.exit_code == 0, result.output
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("rank" in r for r in steps if r["kind"] == "step")
    assert torch.isfinite(torch.tensor([r["loss"] for r in steps if r["kind"] == "step"])).all()
