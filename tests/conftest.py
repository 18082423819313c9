"""Shared fixtures: tiny, random but valid signal stores written through storage's own writer.

    def test_x(tmp_path, make_store):
        store = make_store(tmp_path / "store", shards=2, rows_per_shard=(10, 7), pool=4)

`make_columns` gives the raw column dict of one shard, for tests that call
`storage.writer.write_shard` themselves.
"""
from __future__ import annotations

import os

# Before anything imports torch: OpenMP threads that sleep instead of spinning
# keep the suite fast when it shares the cores (see jobs/cli/__init__.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402
from typing import Any, Callable

import numpy as np
import pytest

from mcad.storage import fs
from mcad.storage import schema
from mcad.storage.manifest import DIGEST_FIELDS, STATUS_DONE, Manifest
from mcad.storage.writer import write_shard

LOGIT_SCALE = 10.0


def shard_name(i: int) -> str:
    return f"{i:05d}"


def sample_key(shard: str, j: int) -> str:
    """Key of the j-th sample of a shard's tar (kept or rejected)."""
    return f"{shard}-{j:06d}"


def _unit(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    x = rng.standard_normal((n, width)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _candidates(logits: np.ndarray, k: int, offset: int) -> np.ndarray:
    """Top-k columns per row by logit, positive (the diagonal) forced in, best first, PAD-padded."""
    n = logits.shape[0]
    out = np.full((n, k), schema.PAD_IDX, np.int64)
    for i in range(n):
        top = list(np.argsort(-logits[i], kind="stable")[: min(k, n)])
        if i not in top:
            top[-1] = i
        top.sort(key=lambda j: -logits[i, j])
        out[i, : len(top)] = np.asarray(top) + offset
    return out


def random_columns(
    shard: str, keys: list[str], *, pool: int, d: int, f: int, k: int, rng: np.random.Generator
) -> dict[str, Any]:
    """A valid column dict (every signal column but SHARD) for the given keys."""
    n = len(keys)
    v, t, g = _unit(rng, n, d), _unit(rng, n, d), _unit(rng, n, d)
    fused = rng.standard_normal((n, f)).astype(np.float32)
    cols: dict[str, Any] = {
        schema.KEY: list(keys), schema.ROW: np.arange(n), schema.POOL: np.arange(n) // pool,
        schema.IMG_EMB: v.astype(np.float16), schema.TXT_EMB: t.astype(np.float16),
        schema.FUSED: fused.astype(np.float16), schema.FUSED_PROJ: g.astype(np.float16),
        schema.ITM_POS: rng.standard_normal(n).astype(np.float32),
    }
    for dr in schema.DIRECTIONS:
        cols[schema.col(dr, schema.IDX)] = np.zeros((n, k), np.int32)
        for fld in (schema.DUAL, schema.ITM):
            cols[schema.col(dr, fld)] = np.zeros((n, k), np.float32)
        cols[schema.col(dr, schema.DUAL_LSE)] = np.zeros(n, np.float32)
    itm_all = rng.standard_normal((n, n)).astype(np.float32)
    for start in range(0, n, pool):
        sl = slice(start, min(start + pool, n))
        dual = LOGIT_SCALE * v[sl] @ t[sl].T
        for dr, logits, itm in (("i2t", dual, itm_all[sl, sl]), ("t2i", dual.T, itm_all[sl, sl].T)):
            idx = _candidates(logits, k, start)
            real = idx != schema.PAD_IDX
            local = np.where(real, idx - start, 0)
            rows = np.arange(logits.shape[0])[:, None]
            cols[schema.col(dr, schema.IDX)][sl] = idx
            cols[schema.col(dr, schema.DUAL)][sl] = np.where(real, logits[rows, local], -np.inf)
            cols[schema.col(dr, schema.ITM)][sl] = np.where(real, itm[rows, local], -np.inf)
            mx = logits.max(axis=1)
            cols[schema.col(dr, schema.DUAL_LSE)][sl] = mx + np.log(np.exp(logits - mx[:, None]).sum(axis=1))
    return cols


def build_store(
    root: str | Path,
    *,
    shards: int = 2,
    rows_per_shard: tuple[int, ...] = (10, 7),
    pool: int = 4,
    d: int = 8,
    f: int = 12,
    k: int = 3,
    rejects_per_shard: int = 1,
    seed: int = 0,
) -> Path:
    """Write a complete store under `root` (a folder or a URI); shard i holds rows_per_shard[i % len] rows."""
    root = root if fs.is_uri(root) else Path(root)
    rng = np.random.default_rng(seed)
    manifest = Manifest(
        teachers={
            role: {"path": f"/fake/teachers/{role}", "config_sha256": f"{i + 1:064x}",
                   "weights_sha256": f"{i + 11:064x}"}
            for i, role in enumerate(("dual", "single"))
        },
        params={"pool_size": pool, "k": k, "d": d, "f": f, "dtype": "float16",
                "logit_scale": LOGIT_SCALE, "image_size": 32},
    )
    for i in range(shards):
        name = shard_name(i)
        n = rows_per_shard[i % len(rows_per_shard)]
        total = n + rejects_per_shard
        # Rejected samples sit at random places in tar order, between kept ones.
        rejected_at = set(rng.choice(total, size=rejects_per_shard, replace=False).tolist())
        kept = [sample_key(name, j) for j in range(total) if j not in rejected_at]
        rejects = [(sample_key(name, j), "decode_error", "fake: cannot identify image file")
                   for j in sorted(rejected_at)]
        cols = random_columns(name, kept, pool=pool, d=d, f=f, k=k, rng=rng)
        info = write_shard(root, name, cols, rejects, d=d, f=f, k=k, pool_size=pool)
        manifest.record_shard(name, {
            "source": f"/fake/data/{name}.tar", "size": 1000 * (i + 1) + total,
            "mtime": 1_700_000_000.0 + i, "rows": info["rows"], "rejected": info["rejected"],
            "pools": info["pools"], "seconds": 0.01, "status": STATUS_DONE,
            **{field: info[field] for field in DIGEST_FIELDS},
        })
    manifest.save(root)
    return root


@pytest.fixture
def make_store() -> Callable[..., Path]:
    """Factory: make_store(root, *, shards=2, rows_per_shard=(10, 7), pool=4, d=8, f=12, k=3,
    rejects_per_shard=1, seed=0) -> Path of a complete, valid signal store."""
    return build_store


@pytest.fixture
def make_columns() -> Callable[..., dict[str, Any]]:
    """Factory: make_columns(shard, n, *, pool=4, d=8, f=12, k=3, seed=0) -> valid column dict."""

    def make(shard: str, n: int, *, pool: int = 4, d: int = 8, f: int = 12, k: int = 3,
             seed: int = 0) -> dict[str, Any]:
        keys = [sample_key(shard, j) for j in range(n)]
        return random_columns(shard, keys, pool=pool, d=d, f=f, k=k, rng=np.random.default_rng(seed))

    return make
