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
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from mcad.storage import schema
from mcad.storage.errors import InputError
from mcad.storage.iters import batched
from mcad.storage.manifest import PARAM_LOGIT_SCALE
from mcad.storage.batches import rebatch

PIXELS, INPUT_IDS, ATTENTION = "pixel_values", "input_ids", "attention_mask"
BLOCK = "block"
EMBEDDINGS = (schema.IMG_EMB, schema.TXT_EMB, schema.FUSED_PROJ)
CANDIDATES = tuple(schema.col(d, f) for d in schema.DIRECTIONS for f in (schema.IDX, schema.ITM))
SIGNALS = EMBEDDINGS + CANDIDATES
# What the reader must hand over: the signals plus the row identities it is keyed by.
READ_COLUMNS = (schema.KEY, schema.SHARD, schema.ROW, schema.POOL) + SIGNALS


def student_batches(store, cfg, processor, *, samples: Callable, epoch: int, signals: Callable | None = None,
                    rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    """Collated batches of one epoch: whole pools (replay) or mixed rows (remix).

    cfg: the student's TrainConfig; samples(source) -> (key, sample) of one
    data shard in order (pipeline.store_data.kept_samples); signals, if given,
    maps each pool before collation (the online teachers replace its signals).
    """
    pools = store.iter_joined_pools(samples, shuffle=True, seed=cfg.seed, epoch=epoch, rank=rank,
                                    world_size=world_size, columns=READ_COLUMNS)
    if signals is not None:
        pools = map(signals, pools)
    if cfg.mode == "replay":
        for group in replay_batches(pools, cfg.pools_per_batch):
            yield collate(group, processor=processor)
    else:
        rng = np.random.default_rng([cfg.seed, epoch, rank, 1])
        for rows in rebatch(pools, batch_size=cfg.batch_size, buffer_size=4 * cfg.batch_size, rng=rng):
            yield collate([rows], processor=processor, remix=True)


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
    tokens = processor.tokenizer([s.caption for s in samples], padding=True, truncation=True,
                                 max_length=max_length or processor.tokenizer.model_max_length,
                                 return_tensors="pt")
    return {PIXELS: pixels, INPUT_IDS: tokens[INPUT_IDS], ATTENTION: tokens[ATTENTION]}


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
