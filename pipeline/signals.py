"""MCAD teacher signals: the maths of docs/design.md (sections 3 and 4).

Plain functions of tensors and teacher adapters, no Ray: the teacher pass
(jobs/) and the online signal source both call them. Here: a pass's
parameters (`PassConfig`), the candidate maths (`pools`, `dual_logits`,
`candidates`, `gather_padded`, `candidate_columns`), the signals of one pool
(`compute_pool`) and of one shard (`shard_signals`, `shard_signals_and_views`).
The fusion projection W they apply is fitted, applied, saved and loaded by
pipeline/projection.py. A pass has two steps, both deterministic (same
inputs, same outputs):

    from mcad.pipeline.projection import calibrate, save_projection

    cfg = PassConfig(pool_size=256, topk=32)
    W = calibrate(dual, single, chain(*map(iter_shard, shards)), config=cfg)   # once, first rows
    save_projection(W, store / FUSION_PROJ_NAME)
    for path in shards:                                                        # any order, any worker
        columns, rejects, stats = shard_signals(dual, single, iter_shard(path),
                                                shard=shard_name(path), config=cfg, projection=W)
        write_shard(store, shard_name(path), columns, rejects, d=dual.dim,
                    f=single.dim_fused, k=cfg.topk, pool_size=cfg.pool_size)

With views (PassConfig(views=ViewConfig(n=4, m=2)), schema v2), `shard_signals_and_views`
also returns the view columns (pipeline/views.py cuts the crops); view 0's columns are
computed exactly as without views, so the signals do not change.

Teachers only produce features; every product, sort and logsumexp runs here
on the CPU in float32, so the signals depend on the teachers' device and dtype
only through their features (bfloat16 on CUDA: docs/design.md, section 3).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from mcad.pipeline.pools import neighbour_order
from mcad.pipeline.projection import project
from mcad.pipeline.shards import Reject
from mcad.pipeline.views import ViewConfig, empty_view_columns, view_signals
from mcad.storage.errors import InputError
from mcad.storage.iters import batched
from mcad.storage.schema import (
    DIRECTIONS, DUAL, DUAL_LSE, FUSED, FUSED_PROJ, IDX, IMG_EMB, ITM, ITM_POS, KEY, PAD_IDX, POOL,
    POOL_MODES, POOLS_CONSECUTIVE, ROW, SHARD, TXT_EMB, col,
)


@dataclass(frozen=True)
class PassConfig:
    """Parameters of a teacher pass that shape the signals (written to the manifest)."""

    pool_size: int = 256          # P: samples per pool (the paper's batch)
    topk: int = 32                # K: candidates per sample and direction
    pair_batch: int = 0           # single-teacher pairs per forward (memory, not results); 0: sized to the device
    calibration_rows: int = 2048  # first kept samples of the pass that fit W
    ridge: float = 1e-2           # ridge penalty of the fusion projection
    views: ViewConfig = field(default_factory=ViewConfig)  # views per sample (1: the whole image only)
    pools: str = POOLS_CONSECUTIVE  # POOL_MODES: how a shard's kept samples are grouped (pipeline/pools.py)

    def __post_init__(self):
        if self.pool_size < 2:
            raise InputError(f"pool size must be at least 2, got {self.pool_size}")
        if self.topk < 1:
            raise InputError(f"top-k must be at least 1, got {self.topk}")
        if self.topk > self.pool_size:
            raise InputError(f"top-k ({self.topk}) must not exceed the pool size ({self.pool_size})")
        if self.pair_batch < 0:
            raise InputError(f"pair batch must be 0 (sized to the device) or positive, got {self.pair_batch}")
        if self.calibration_rows < 1:
            raise InputError(f"calibration rows must be at least 1, got {self.calibration_rows}")
        if not self.ridge >= 0:
            raise InputError(f"ridge must be >= 0, got {self.ridge}")
        if self.pools not in POOL_MODES:
            raise InputError(f"pools must be one of {POOL_MODES}, got {self.pools!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------ pure maths

def pools(n: int, pool_size: int) -> list[range]:
    """Consecutive pools of `pool_size` rows over n rows; the last may be smaller."""
    if pool_size < 1:
        raise ValueError(f"pool size must be positive, got {pool_size}")
    return [range(lo, min(lo + pool_size, n)) for lo in range(0, n, pool_size)]


def dual_logits(v: torch.Tensor, t: torch.Tensor, scale: float) -> torch.Tensor:
    """(P, P) s·v_i·t_j: rows are images, columns texts."""
    return scale * (v @ t.T)


def candidates(logits: torch.Tensor, k: int, direction: str) -> torch.Tensor:
    """(P, k) local candidate indices per row, highest dual logit first.

    `logits[i, j]` = s·v_i·t_j (image rows). For "i2t" row i ranks texts for
    image i; for "t2i" row i ranks images for text i. The positive (i) is
    always included: when outside the top k it takes the k-th place, which
    keeps the order (its logit is at most the k-th's). Ties keep the lower
    index first (stable sort), so the result is deterministic. A pool with
    fewer than k rows pads with PAD_IDX.
    """
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be square (P, P), got {tuple(logits.shape)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    rows = logits if direction == "i2t" else logits.T
    p = rows.shape[0]
    order = torch.sort(rows, dim=1, descending=True, stable=True).indices[:, :k].clone()
    if p > k:
        positive = torch.arange(p, device=order.device)
        missing = ~(order == positive[:, None]).any(dim=1)
        order[missing, k - 1] = positive[missing]
    elif p < k:
        order = torch.cat([order, order.new_full((p, k - p), PAD_IDX)], dim=1)
    return order


def gather_padded(matrix: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """matrix[i, idx[i, j]], -inf where idx is PAD_IDX."""
    pad = idx == PAD_IDX
    values = matrix.gather(1, idx.masked_fill(pad, 0))
    return values.masked_fill(pad, float("-inf"))


def candidate_columns(logits: torch.Tensor, itm: torch.Tensor, idx: dict[str, torch.Tensor],
                      start: int) -> dict[str, torch.Tensor]:
    """Per direction, the IDX, DUAL, ITM and DUAL_LSE columns of one pool (docs/design.md, section 3).

    logits (P, P) s·v_i·t_j with image rows; itm (P, P) m_ij, read only at
    candidates; idx: each direction's local candidates (`candidates`). Row i of
    a direction is the query i: image i (i2t) or text i (t2i). IDX holds shard
    rows (start + local index); DUAL_LSE runs over the whole pool.
    """
    by_query = {"i2t": (logits, itm), "t2i": (logits.T, itm.T)}
    out: dict[str, torch.Tensor] = {}
    for dr in DIRECTIONS:
        dual_rows, itm_rows = by_query[dr]
        local = idx[dr]
        out[col(dr, IDX)] = torch.where(local == PAD_IDX, local, local + start)
        out[col(dr, DUAL)] = gather_padded(dual_rows, local)
        out[col(dr, ITM)] = gather_padded(itm_rows, local)
        out[col(dr, DUAL_LSE)] = torch.logsumexp(dual_rows, dim=1)
    return out


# ------------------------------------------------------------- one pool

def single_pass(single, images: Sequence, texts: Sequence[str], idx: dict[str, torch.Tensor],
                 batch: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ITM logits of every candidate pair and the fused state of every positive.

    Returns M (P, P) with m_ij at scored pairs (NaN elsewhere), fused (P, F),
    and the number of pairs scored. Pairs named by both directions (at least
    the positives) are scored once; each image goes through the vision tower once,
    and its cross-attention keys and values are projected once per pair batch.
    """
    p = len(images)
    own = torch.arange(p)[:, None]
    i2t, t2i = idx["i2t"], idx["t2i"]
    img = torch.cat([own.expand_as(i2t)[i2t != PAD_IDX], t2i[t2i != PAD_IDX], own[:, 0]])
    txt = torch.cat([i2t[i2t != PAD_IDX], own.expand_as(t2i)[t2i != PAD_IDX], own[:, 0]])
    pair_ids = torch.unique(img * p + txt)  # sorted: a fixed, image-major order

    batch = single.pair_batch(batch)  # 0: the device's size (256 on the CPU)
    states = single.encode_images(images)
    tokens = single.tokenize(texts)
    itm = torch.full((p, p), float("nan"))
    fused = torch.zeros(p, single.dim_fused)
    for lo in range(0, len(pair_ids), batch):
        ids = pair_ids[lo:lo + batch]
        bi, bt = ids // p, ids % p
        f, m = single.match_tokens(
            states, {name: tok[bt.to(tok.device)] for name, tok in tokens.items()},
            image_index=bi, batch_size=len(ids))
        itm[bi, bt] = m.cpu()
        diag = bi == bt
        fused[bi[diag]] = f.cpu()[diag]
    return itm, fused, len(pair_ids)


def _pool_signals(dual, single, samples: Sequence, *, k: int, projection: torch.Tensor | None,
                  pair_batch: int, start: int, embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                  ) -> tuple[dict[str, Any], int]:
    p = len(samples)
    if p == 0:
        raise ValueError("empty pool")
    images = [s.image for s in samples]
    texts = [s.caption for s in samples]
    if embeddings is None:
        v = dual.encode_images(images).cpu().float()
        t = dual.encode_texts(texts).cpu().float()
    else:  # neighbour pools: the dual teacher embedded the whole shard to group it
        v, t = embeddings
    logits = dual_logits(v, t, dual.logit_scale)
    if not torch.isfinite(logits).all():
        raise RuntimeError("the dual teacher produced non-finite logits (half-precision overflow?)")
    idx = {dr: candidates(logits, k, dr) for dr in DIRECTIONS}
    itm, fused, n_pairs = single_pass(single, images, texts, idx, pair_batch)
    out: dict[str, Any] = {
        KEY: [s.key for s in samples],
        ROW: torch.arange(start, start + p),
        IMG_EMB: v,
        TXT_EMB: t,
        FUSED: fused,
        ITM_POS: itm.diagonal(),
    }
    if projection is not None:
        out[FUSED_PROJ] = project(fused, projection.cpu())
    out.update(candidate_columns(logits, itm, idx, start))
    return {name: _to_numpy(name, x) for name, x in out.items()}, n_pairs


def compute_pool(dual, single, samples: Sequence, *, k: int, projection: torch.Tensor | None = None,
                 pair_batch: int = 0, start: int = 0) -> dict[str, Any]:
    """Signal columns (schema names) of one pool whose first sample has shard row `start`.

    KEY (list), ROW, IMG_EMB, TXT_EMB, FUSED, ITM_POS and per direction
    IDX/DUAL/ITM/DUAL_LSE as numpy (float32, int32 for indices); FUSED_PROJ
    only when a projection W (F, D) is given. Candidate indices are shard
    rows (start + local index), PAD_IDX where the pool has fewer than k rows.
    """
    columns, _ = _pool_signals(dual, single, samples, k=k, projection=projection,
                               pair_batch=pair_batch, start=start)
    return columns


def _to_numpy(name: str, value: Any):
    if isinstance(value, list):
        return value
    arr = value.detach().cpu().numpy()
    integer = name == ROW or name in {col(dr, IDX) for dr in DIRECTIONS}
    return arr.astype(np.int32 if integer else np.float32)


# ------------------------------------------------------------ one shard

def shard_signals(dual, single, items: Iterable, *, shard: str, config: PassConfig,
                  projection: torch.Tensor,
                  progress: Callable[[int], None] | None = None) -> tuple[dict[str, Any], list, dict]:
    """Signals of one shard without views: (columns, rejects, stats) of `shard_signals_and_views`."""
    if config.views.n > 1:
        raise ValueError("a pass with views: call shard_signals_and_views, which returns them")
    columns, _, rejects, stats = shard_signals_and_views(dual, single, items, shard=shard, config=config,
                                                         projection=projection, progress=progress)
    return columns, rejects, stats


def shard_signals_and_views(dual, single, items: Iterable, *, shard: str, config: PassConfig,
                            projection: torch.Tensor, progress: Callable[[int], None] | None = None,
                            ) -> tuple[dict[str, Any], dict[str, Any] | None, list, dict]:
    """Signals of one shard: (columns, view columns or None without views, rejects, stats).

    `items` are the shard's Samples and Rejects in order. Samples are kept in
    order (row = index among kept samples) and grouped into pools of
    `config.pool_size`; with `config.pools` "neighbours" they are grouped by
    look-alike (pipeline/pools.py) and rows follow the pools instead (row =
    index in pool order, pool = row // P as always, keys unchanged). Rejects
    become (key, reason, detail) tuples. Columns
    are every signal column of storage.schema, keyed by its names, ready for
    `storage.writer.write_shard`; stats has rows, rejected, pools, pairs
    (single-teacher pair passes, views' included) and seconds. Only one pool
    of images (and its views) is held in memory at a time (neighbours: the
    shard's decoded samples, to group them). With
    `config.views.n` > 1 the view columns come from `view_signals`, pool by pool.
    """
    want = (single.dim_fused, dual.dim)
    if projection is None or tuple(projection.shape) != want:
        got = None if projection is None else tuple(projection.shape)
        raise InputError(f"fusion projection has shape {got}, these teachers need {want}")
    started = time.perf_counter()
    parts: list[dict[str, Any]] = []
    view_parts: list[dict[str, Any]] = []
    rejects: list[tuple[str, str, str]] = []
    rows = pairs = 0

    def kept() -> Iterator:
        for item in items:
            if isinstance(item, Reject):
                rejects.append((str(item.key), str(item.reason), "" if item.detail is None else str(item.detail)))
            else:
                yield item

    for pool, embeddings in _grouped(dual, kept(), config):
        part, n_pairs = _pool_signals(dual, single, pool, k=config.topk, projection=projection,
                                      pair_batch=config.pair_batch, start=rows, embeddings=embeddings)
        part[POOL] = np.full(len(pool), len(parts), dtype=np.int32)
        parts.append(part)
        if config.views.n > 1:
            view_part, view_pairs = view_signals(dual, single, pool, part, views=config.views, shard=shard,
                                               projection=projection, pair_batch=config.pair_batch)
            view_parts.append(view_part)
            n_pairs += view_pairs
        rows, pairs = rows + len(pool), pairs + n_pairs
        if progress is not None:
            progress(len(pool))
    columns = _concat(parts, d=dual.dim, f=single.dim_fused, k=config.topk)
    columns[SHARD] = [shard] * rows
    views = None
    if config.views.n > 1:
        views = _concat(view_parts, d=dual.dim, f=0, k=config.topk, empty=empty_view_columns)
        views[SHARD] = [shard] * len(views[KEY])
    stats = {"rows": rows, "rejected": len(rejects), "pools": len(parts), "pairs": pairs,
             "seconds": time.perf_counter() - started}
    return columns, views, rejects, stats


def _grouped(dual, samples: Iterable, config: PassConfig) -> Iterator[tuple[list, tuple | None]]:
    """The shard's pools in row order, each with the dual embeddings of its samples when known.

    consecutive: P samples at a time as they stream in (one pool in memory), embeddings left to
    `_pool_signals`. neighbours: every kept sample of the shard is held, the dual teacher embeds
    them as they stream in, P at a time (the consecutive pools' batches, so a sample's v and t
    are those a consecutive pass stores), `neighbour_order` groups them, and each pool gets its
    members' embeddings (the stored v, t are those the grouping used); rows then follow the
    pools, not the input.
    """
    if config.pools == POOLS_CONSECUTIVE:
        yield from ((pool, None) for pool in batched(samples, config.pool_size))
        return
    held, v_parts, t_parts = [], [], []  # POOLS_NEIGHBOURS
    for chunk in batched(samples, config.pool_size):
        held += chunk
        v_parts.append(dual.encode_images([s.image for s in chunk]).cpu().float())
        t_parts.append(dual.encode_texts([s.caption for s in chunk]).cpu().float())
    if not held:
        return
    v, t = torch.cat(v_parts), torch.cat(t_parts)
    order = torch.from_numpy(neighbour_order(v.numpy(), config.pool_size))
    for lo in range(0, len(held), config.pool_size):
        members = order[lo:lo + config.pool_size]
        yield [held[int(i)] for i in members], (v[members], t[members])


def _concat(parts: list[dict[str, Any]], *, d: int, f: int, k: int, empty=None) -> dict[str, Any]:
    if not parts:  # a shard with no kept sample still gets a (0-row) table
        return (empty or _empty_columns)(d=d, f=f, k=k)
    out: dict[str, Any] = {}
    for name, first in parts[0].items():
        if isinstance(first, list):
            out[name] = [x for part in parts for x in part[name]]
        else:
            out[name] = np.concatenate([part[name] for part in parts])
    return out


def _empty_columns(*, d: int, f: int, k: int) -> dict[str, Any]:
    f32, i32 = np.float32, np.int32
    out: dict[str, Any] = {
        KEY: [], ROW: np.zeros(0, i32), POOL: np.zeros(0, i32),
        IMG_EMB: np.zeros((0, d), f32), TXT_EMB: np.zeros((0, d), f32),
        FUSED: np.zeros((0, f), f32), FUSED_PROJ: np.zeros((0, d), f32), ITM_POS: np.zeros(0, f32),
    }
    for dr in DIRECTIONS:
        out[col(dr, IDX)] = np.zeros((0, k), i32)
        out[col(dr, DUAL)] = np.zeros((0, k), f32)
        out[col(dr, ITM)] = np.zeros((0, k), f32)
        out[col(dr, DUAL_LSE)] = np.zeros(0, f32)
    return out

