"""`mcad bench store`: how big the signal store is on disk and how fast the reader feeds a student.

Writes a synthetic store of realistic width (random unit embeddings, real
top-K candidates per pool) through storage.writer into a temporary folder,
then times the reader delivering pools as torch tensors. Run:

    mcad bench store --json bench-store.json        # 20k rows, D=F=256, K=32, P=256

Figures: bytes_per_sample (signals Parquet bytes / rows), raw_payload_bytes
(see `raw_payload_bytes`), reader_rows_per_s (replay: `iter_pools`, each pool
turned into torch tensors; page checksums verified and each file hashed
against the manifest on its first open, as a student reads), the same
without either (reader_unverified_rows_per_s), verify_files_s (hashing
every signals and rejects file once), remix_rows_per_s (`iter_rows`,
batches of one pool's size, shuffled), writer_rows_per_s. Ratios:
bytes_over_raw_payload, verified_over_unverified (reader rows/s).
Random float16 does not compress, so the ratio says how much the layout
(keys, footer, row groups) costs over the numbers themselves.
"""
from __future__ import annotations

import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mcad.jobs.bench.machine import machine_info

if TYPE_CHECKING:
    import numpy as np

# numpy and the store's schema (pyarrow) are imported inside the functions:
# `mcad bench store --help` reads StoreBenchConfig's defaults from this module.
LOGIT_SCALE = 100.0  # CLIP's trained logit scale


@dataclass(frozen=True)
class StoreBenchConfig:
    rows: int = 20_000
    shards: int = 4
    d: int = 256
    f: int = 256
    k: int = 32
    pool_size: int = 256
    passes: int = 2  # reader passes timed; the best one counts (the first may warm caches)
    seed: int = 0

    def __post_init__(self):
        from mcad.storage.errors import InputError

        if self.shards > self.rows:
            raise InputError(f"shards ({self.shards}) is more than rows ({self.rows})")


def raw_payload_bytes(*, d: int, f: int, k: int) -> int:
    """Bytes of float/int data in one row, as the numbers themselves (no keys, no layout):

    img_emb, txt_emb, fused_proj (D float16 each) = 3*2*D, fused (F float16)
    = 2*F, per direction (i2t, t2i) idx, dual, itm (K entries of 4 bytes
    each) = 2*3*4*K, and itm_pos, i2t_dual_lse, t2i_dual_lse (float32) = 3*4.
    The key, shard, row and pool columns are not payload: they count as
    overhead in bytes_over_raw_payload.
    """
    return 3 * 2 * d + 2 * f + 2 * 3 * 4 * k + 3 * 4


def synth_columns(keys: list[str], *, cfg: StoreBenchConfig, rng: np.random.Generator) -> dict[str, Any]:
    """A valid column dict for storage.writer.write_shard: random unit embeddings and ITM logits;
    candidates and their columns from the teacher pass's own maths (pipeline.signals)."""
    import numpy as np

    from mcad.storage import schema

    n, p, k = len(keys), cfg.pool_size, cfg.k
    v, t, g = (_unit(rng, n, cfg.d) for _ in range(3))
    cols: dict[str, Any] = {
        schema.KEY: keys, schema.ROW: np.arange(n), schema.POOL: np.arange(n) // p,
        schema.IMG_EMB: v.astype(np.float16), schema.TXT_EMB: t.astype(np.float16),
        schema.FUSED: rng.standard_normal((n, cfg.f)).astype(np.float16),
        schema.FUSED_PROJ: g.astype(np.float16),
        schema.ITM_POS: rng.standard_normal(n).astype(np.float32),
    }
    for dr in schema.DIRECTIONS:
        cols[schema.col(dr, schema.IDX)] = np.full((n, k), schema.PAD_IDX, np.int32)
        cols[schema.col(dr, schema.DUAL)] = np.full((n, k), -np.inf, np.float32)
        cols[schema.col(dr, schema.ITM)] = np.full((n, k), -np.inf, np.float32)
        cols[schema.col(dr, schema.DUAL_LSE)] = np.zeros(n, np.float32)
    for start in range(0, n, p):
        sl = slice(start, min(start + p, n))
        dual = LOGIT_SCALE * v[sl] @ t[sl].T
        itm = rng.standard_normal(dual.shape).astype(np.float32)
        for name, values in _pool_columns(dual, itm, k=k, start=start).items():
            cols[name][sl] = values
    return cols


def _pool_columns(dual: np.ndarray, itm: np.ndarray, *, k: int, start: int) -> dict[str, np.ndarray]:
    """One pool's candidate columns, as the teacher pass computes them (positive forced in, padding)."""
    import torch

    from mcad.pipeline.signals import candidate_columns, candidates
    from mcad.storage import schema

    logits, m = torch.from_numpy(dual), torch.from_numpy(itm)
    idx = {dr: candidates(logits, k, dr) for dr in schema.DIRECTIONS}
    return {name: x.numpy() for name, x in candidate_columns(logits, m, idx, start).items()}


def _unit(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    import numpy as np

    x = rng.standard_normal((n, width)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_bench_store(root: Path, cfg: StoreBenchConfig, *, progress: bool = True) -> float:
    """Write the synthetic store (manifest included); return the seconds spent in write_shard."""
    import numpy as np
    from tqdm import tqdm

    from mcad.storage.manifest import DIGEST_FIELDS, STATUS_DONE, Manifest
    from mcad.storage.writer import write_shard

    rng = np.random.default_rng(cfg.seed)
    manifest = Manifest(
        teachers={role: {"path": f"bench/{role}", "config_sha256": "0" * 64, "weights_sha256": "0" * 64}
                  for role in ("dual", "single")},
        params={"pool_size": cfg.pool_size, "k": cfg.k, "d": cfg.d, "f": cfg.f, "dtype": "float16",
                "logit_scale": LOGIT_SCALE})
    sizes = np.diff(np.linspace(0, cfg.rows, cfg.shards + 1).round().astype(int))
    seconds = 0.0
    for i, n in enumerate(tqdm(sizes, desc="write store", unit="shard", file=sys.stderr, disable=not progress)):
        name = f"{i:05d}"
        cols = synth_columns([f"{name}-{j:08d}" for j in range(n)], cfg=cfg, rng=rng)
        t0 = time.perf_counter()
        info = write_shard(root, name, cols, [], d=cfg.d, f=cfg.f, k=cfg.k, pool_size=cfg.pool_size)
        seconds += time.perf_counter() - t0
        manifest.record_shard(name, {"source": f"bench/{name}.tar", "size": 0, "mtime": 0.0,
                                     "rows": info["rows"], "rejected": info["rejected"],
                                     "pools": info["pools"], "seconds": 0.0, "status": STATUS_DONE,
                                     **{field: info[field] for field in DIGEST_FIELDS}})
    manifest.save(root)
    return seconds


def time_reader(root: Path, cfg: StoreBenchConfig) -> dict[str, float]:
    """Best-of-`passes` rows/s: replay (iter_pools) and remix (iter_rows), every array as a torch tensor."""
    import numpy as np
    import torch

    from mcad.storage import schema

    from mcad.storage.reader import open_store

    store = open_store(root)

    def fresh(verify: bool = True):
        # A new Store per pass: each pass pays for hashing every file on its first open.
        opened = open_store(root)
        opened.verify = verify
        return opened

    def consume(batches) -> int:
        rows = 0
        with warnings.catch_warnings():
            # The reader's arrays are read-only views of Arrow memory; the student only reads them.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for batch in batches:
                tensors = {c: torch.from_numpy(v) for c, v in batch.items() if isinstance(v, np.ndarray)}
                rows += len(tensors[schema.ROW])
        return rows

    def best(make) -> float:
        rates = []
        for epoch in range(cfg.passes):
            t0 = time.perf_counter()
            rows = consume(make(epoch))
            rates.append(rows / (time.perf_counter() - t0))
            if rows != store.num_rows:
                raise RuntimeError(f"reader delivered {rows} rows of {store.num_rows}")
        return max(rates)

    digest_s = []
    for _ in range(cfg.passes):
        t0 = time.perf_counter()
        fresh().verify_files()
        digest_s.append(time.perf_counter() - t0)
    verified = best(lambda e: fresh().iter_pools(epoch=e))
    unverified = best(lambda e: fresh(verify=False).iter_pools(epoch=e))
    return {
        "reader_rows_per_s": verified,
        "reader_unverified_rows_per_s": unverified,
        "verify_files_s": min(digest_s),
        "remix_rows_per_s": best(lambda e: fresh().iter_rows(batch_size=cfg.pool_size, epoch=e)),
    }


def run_store_bench(cfg: StoreBenchConfig, *, workdir: str | None = None, progress: bool = True) -> dict:
    """Write, measure and delete a synthetic store; return the bench JSON dict."""
    if cfg.rows < 1 or cfg.shards < 1 or cfg.shards > cfg.rows:
        raise ValueError(f"need 1 <= shards <= rows, got rows={cfg.rows} shards={cfg.shards}")
    with tempfile.TemporaryDirectory(prefix="mcad-bench-store-", dir=workdir) as tmp:
        root = Path(tmp) / "store"
        write_s = write_bench_store(root, cfg, progress=progress)
        signal_bytes = sum(p.stat().st_size for p in (root / "signals").glob("*.parquet"))
        total_bytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        speeds = time_reader(root, cfg)
    raw = raw_payload_bytes(d=cfg.d, f=cfg.f, k=cfg.k)
    bytes_per_sample = signal_bytes / cfg.rows
    return {
        "bench": "store",
        "ratios": {"bytes_over_raw_payload": bytes_per_sample / raw,
                   "verified_over_unverified": speeds["reader_rows_per_s"] / speeds["reader_unverified_rows_per_s"]},
        "figures": {
            **speeds,
            "bytes_per_sample": bytes_per_sample,
            "raw_payload_bytes": raw,
            "store_bytes_total": total_bytes,
            "writer_rows_per_s": cfg.rows / write_s,
            "rows": cfg.rows,
        },
        "machine": machine_info(),
        "config": asdict(cfg),
    }
