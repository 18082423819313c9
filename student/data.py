"""Student batches: pools joined with their samples -> tensors for the student and its targets.

The storage reader yields pools (dicts of arrays keyed by schema names, with
the decoded samples under `schema.DATA`); the online path yields the same
dicts with signals computed by the teachers in the loop. `collate` turns one
or several of them into one batch:

- `pixel_values`, `input_ids`, `attention_mask` for the student;
- the signals (`img_emb`, `txt_emb`, `fused_proj`, per direction `idx` and
  `itm`) as float32 / int64 tensors, candidate indices rewritten from shard
  rows to positions in the batch (-1 where a candidate is padding or, in
  remix mode, not in the batch);
- `block`: each row's pool block (replay: one block per pool; remix: one
  block for the whole batch), so the distribution loss never mixes pools.

A store with views (schema v2) replays them: per sample and epoch one view
(`choose_views`, a pure function of seed, epoch, shard and row, so a resume
sees the same), its image cut from the stored box by the `crop` the caller
hands in (pipeline.views.crop_sample: storage and student never decode), and
its signals swapped in (`replay_views`).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from mcad.storage import schema
from mcad.storage.data_join import iter_joined_pools
from mcad.storage.errors import InputError
from mcad.storage.iters import batched
from mcad.storage.manifest import PARAM_LOGIT_SCALE
from mcad.storage.batches import rebatch
from mcad.storage.views import stable_id

PIXELS, INPUT_IDS, ATTENTION = "pixel_values", "input_ids", "attention_mask"
BLOCK = "block"
EMBEDDINGS = (schema.IMG_EMB, schema.TXT_EMB, schema.FUSED_PROJ)
CANDIDATES = tuple(schema.col(d, f) for d in schema.DIRECTIONS for f in (schema.IDX, schema.ITM))
SIGNALS = EMBEDDINGS + CANDIDATES
# What the reader must hand over: the signals plus the row identities it is keyed by.
READ_COLUMNS = (schema.KEY, schema.SHARD, schema.ROW, schema.POOL) + SIGNALS


def student_batches(store, cfg, processor, *, samples: Callable, epoch: int, signals: Callable | None = None,
                    crop: Callable | None = None, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    """Collated batches of one epoch: whole pools (replay) or mixed rows (remix).

    cfg: the student's TrainConfig; samples(source) -> (key, sample) of one
    data shard in order (pipeline.store_data.kept_samples); signals, if given,
    maps each pool before collation (the online teachers replace its signals);
    crop(sample, box) -> the sample showing that view (pipeline.views.crop_sample),
    needed when the store has views and cfg.views is not "canonical".
    """
    for parts, remix in student_parts(store, cfg, samples=samples, epoch=epoch, signals=signals, crop=crop,
                                      rank=rank, world_size=world_size):
        yield collate(parts, processor=processor, remix=remix)


def student_parts(store, cfg, *, samples: Callable, epoch: int, signals: Callable | None = None,
                  crop: Callable | None = None, rank: int = 0,
                  world_size: int = 1) -> Iterator[tuple[list[dict], bool]]:
    """What student_batches collates, batch by batch: (parts, remix) for collate(parts, remix=remix).

    Nothing is encoded here: the samples are whatever `samples` and `crop`
    give (student/loader.py hands in ones that decode later, and collates only
    the batches a loader worker owns). The order depends on the store, cfg,
    epoch, rank and world_size only.
    """
    replay = store.num_views > 1 and cfg.views != "canonical"
    if replay and crop is None:
        raise ValueError(f"the store has {store.num_views} views per sample: pass crop= to replay them "
                         f"(or TrainConfig(views='canonical'))")
    pools = iter_joined_pools(store, samples, shuffle=True, seed=cfg.seed, epoch=epoch, rank=rank,
                              world_size=world_size, columns=READ_COLUMNS, views=replay)
    if replay:
        pools = (replay_views(p, choose_views(cfg.views, seed=cfg.seed, epoch=epoch, shard=p[schema.SHARD][0],
                                              rows=p[schema.ROW], n=store.num_views),
                              m=store.single_views, crop=crop) for p in pools)
    if signals is not None:
        pools = map(signals, pools)
    if cfg.mode == "replay":
        for group in replay_batches(pools, cfg.pools_per_batch):
            yield group, False
    else:
        rng = np.random.default_rng([cfg.seed, epoch, rank, 1])
        for rows in rebatch(pools, batch_size=cfg.batch_size, buffer_size=4 * cfg.batch_size, rng=rng):
            yield [rows], True


def steps_per_epoch(store, cfg, world_size: int = 1) -> int:
    """Batches per epoch on each of `world_size` ranks (the learning-rate schedule's unit)."""
    if cfg.mode == "replay":
        return math.ceil(store.num_pools / world_size / cfg.pools_per_batch)
    return math.ceil(store.num_rows / world_size / cfg.batch_size)


def teacher_logit_scale(store) -> float:
    """The dual teacher's logit scale s, as the pass recorded it (the targets' temperature)."""
    scale = store.manifest.params.get(PARAM_LOGIT_SCALE)
    if scale is None:
        raise InputError(f"{store.path}: the manifest has no teacher logit scale; rerun the teacher pass")
    return float(scale)


def choose_views(policy: str, *, seed: int, epoch: int, shard: str, rows, n: int) -> np.ndarray:
    """The view (0..n-1) each of a shard's `rows` shows in `epoch`: a pure function of its arguments.

    cycle: (epoch + row) mod n, so every sample shows each view once per n epochs;
    random: uniform, from a generator keyed by (seed, epoch, shard, row); canonical: 0.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if n == 1 or policy == "canonical":
        return np.zeros(len(rows), np.int64)
    if policy == "cycle":
        return (epoch + rows) % n
    if policy == "random":
        sid = stable_id(shard)
        return np.array([np.random.default_rng([seed, epoch, sid, int(r)]).integers(n) for r in rows], np.int64)
    raise ValueError(f"unknown view policy {policy!r}")


def replay_views(pool: dict, chosen: np.ndarray, *, m: int, crop: Callable) -> dict:
    """A pool read with its views (storage/views.py) showing view chosen[i] in row i.

    The image is cut from that view's box; img_emb is the dual teacher's on it.
    The single teacher's terms come from the view where it scored the pair,
    else from view 0 (the approximation of docs/design.md, section 3, "Views"):
    fused_proj and the i2t ITM list of row i from view chosen[i] when < m; the
    t2i list of row i (text i over images j) takes each m(image j, text i) from
    view chosen[j] when < m. The view columns are dropped; VIEW holds chosen.
    """
    chosen = np.asarray(chosen, dtype=np.int64)
    out = {k: v for k, v in pool.items() if not k.startswith(schema.VIEW_PREFIX)}
    at = np.flatnonzero(chosen > 0)
    shown = chosen[at] - 1
    scored = chosen[at] < m
    for name in (schema.IMG_EMB, schema.FUSED_PROJ, schema.ITM_POS, schema.col("i2t", schema.ITM)):
        if name not in pool:
            continue
        rows, views = (at, shown) if name == schema.IMG_EMB else (at[scored], shown[scored])
        value = np.array(pool[name], copy=True)
        value[rows] = pool[schema.view_key(name)][rows, views]
        out[name] = value
    t2i_idx, t2i_itm = schema.col("t2i", schema.IDX), schema.col("t2i", schema.ITM)
    if t2i_itm in pool:
        idx = np.asarray(pool[t2i_idx], dtype=np.int64)
        real = idx != schema.PAD_IDX
        view_of = chosen[np.where(real, idx - int(pool[schema.ROW][0]), 0)]  # candidates lie in the pool
        ii, kk = np.nonzero(real & (view_of >= 1) & (view_of < m))
        value = np.array(pool[t2i_itm], copy=True)
        value[ii, kk] = pool[schema.view_key(t2i_itm)][ii, view_of[ii, kk] - 1, kk]
        out[t2i_itm] = value
    boxes = pool[schema.view_key(schema.BOX)]
    out[schema.DATA] = [crop(s, boxes[i, v - 1]) if v else s for i, (s, v) in enumerate(zip(pool[schema.DATA], chosen))]
    out[schema.VIEW] = chosen
    return out


def replay_batches(pools: Iterable[dict], pools_per_batch: int) -> Iterator[list[dict]]:
    """Group whole pools into batches of `pools_per_batch` (the last may hold fewer)."""
    return batched(pools, pools_per_batch)


def collate(parts: Sequence[dict], *, processor, max_length: int | None = None,
            remix: bool = False) -> dict[str, torch.Tensor]:
    """One student batch from pools (replay) or from row batches (remix), see the module doc."""
    samples = [s for part in parts for s in part[schema.DATA]]
    batch = encode_samples(samples, processor=processor, max_length=max_length)
    batch.update(signal_tensors(parts, remix=remix))
    return batch


def encode_samples(samples: Sequence, *, processor, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Pixels and caption tokens of samples that have `.image` and `.caption`."""
    pixels = processor.image_processor([s.image for s in samples], return_tensors="pt")[PIXELS]
    return {PIXELS: pixels, **encode_texts(samples, processor=processor, max_length=max_length)}


def encode_texts(samples: Sequence, *, processor, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Caption tokens (input_ids, attention_mask) of samples that have `.caption`."""
    tokens = processor.tokenizer([s.caption for s in samples], padding=True, truncation=True,
                                 max_length=max_length or processor.tokenizer.model_max_length,
                                 return_tensors="pt")
    return {INPUT_IDS: tokens[INPUT_IDS], ATTENTION: tokens[ATTENTION]}


def signal_tensors(parts: Sequence[dict], *, remix: bool = False) -> dict[str, torch.Tensor]:
    """Signal tensors of the concatenated parts, candidates indexed by batch position."""
    out = {name: torch.from_numpy(np.concatenate([np.asarray(p[name], dtype=np.float32) for p in parts]))
           for name in EMBEDDINGS + tuple(schema.col(d, schema.ITM) for d in schema.DIRECTIONS)}
    if remix:
        position = {(s, int(r)): i for i, (s, r) in enumerate(
            (s, r) for p in parts for s, r in zip(p[schema.SHARD], p[schema.ROW]))}
        for d in schema.DIRECTIONS:
            idx = [_remix_local(p, d, position) for p in parts]
            out[schema.col(d, schema.IDX)] = torch.from_numpy(np.concatenate(idx))
        out[BLOCK] = torch.zeros(len(position), dtype=torch.long)
        return out
    offset, blocks = 0, []
    idx_parts: dict[str, list[np.ndarray]] = {d: [] for d in schema.DIRECTIONS}
    for block, pool in enumerate(parts):
        rows = np.asarray(pool[schema.ROW], dtype=np.int64)
        first = int(rows[0])
        for d in schema.DIRECTIONS:
            idx = np.asarray(pool[schema.col(d, schema.IDX)], dtype=np.int64)
            idx_parts[d].append(np.where(idx == schema.PAD_IDX, -1, idx - first + offset))
        blocks.append(np.full(len(rows), block, dtype=np.int64))
        offset += len(rows)
    for d in schema.DIRECTIONS:
        out[schema.col(d, schema.IDX)] = torch.from_numpy(np.concatenate(idx_parts[d]))
    out[BLOCK] = torch.from_numpy(np.concatenate(blocks))
    return out


def _remix_local(part: dict, direction: str, position: dict) -> np.ndarray:
    """Candidate shard rows -> batch positions; -1 where the candidate is not in this batch."""
    idx = np.asarray(part[schema.col(direction, schema.IDX)], dtype=np.int64)
    out = np.full(idx.shape, -1, dtype=np.int64)
    for i, shard in enumerate(part[schema.SHARD]):
        for j, row in enumerate(idx[i]):
            if row != schema.PAD_IDX:
                out[i, j] = position.get((shard, int(row)), -1)
    return out
