"""Student batches: pools joined with their samples -> tensors for the student and its targets.

The storage reader yields pools (dicts of arrays keyed by schema names, with
the decoded samples under `schema.DATA`); the online path yields the same
dicts with evidence computed by the teachers in the loop. `collate` turns one
or several of them into one batch:

- `pixel_values`, `input_ids`, `attention_mask` for the student;
- the evidence (`img_emb`, `txt_emb`, `fused_proj`, per direction `idx` and
  `itm`) as float32 / int64 tensors, candidate indices rewritten from shard
  rows to positions in the batch (-1 where a candidate is padding or, in
  remix mode, not in the batch);
- `block`: each row's pool block (replay: one block per pool; remix: one
  block for the whole batch), so the distribution loss never mixes pools.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from mcad.storage import schema

PIXELS, INPUT_IDS, ATTENTION = "pixel_values", "input_ids", "attention_mask"
BLOCK = "block"
EMBEDDINGS = (schema.IMG_EMB, schema.TXT_EMB, schema.FUSED_PROJ)
CANDIDATES = tuple(schema.col(d, f) for d in schema.DIRECTIONS for f in (schema.IDX, schema.ITM))
EVIDENCE = EMBEDDINGS + CANDIDATES
# What the reader must hand over: the evidence plus the row identities it is keyed by.
READ_COLUMNS = (schema.KEY, schema.SHARD, schema.ROW, schema.POOL) + EVIDENCE


def replay_batches(pools: Iterable[dict], pools_per_batch: int) -> Iterator[list[dict]]:
    """Group whole pools into batches of `pools_per_batch` (the last may hold fewer)."""
    group: list[dict] = []
    for pool in pools:
        group.append(pool)
        if len(group) == pools_per_batch:
            yield group
            group = []
    if group:
        yield group


def collate(parts: Sequence[dict], *, processor, max_length: int | None = None,
            remix: bool = False) -> dict[str, torch.Tensor]:
    """One student batch from pools (replay) or from row batches (remix), see the module doc."""
    samples = [s for part in parts for s in part[schema.DATA]]
    batch = encode_samples(samples, processor=processor, max_length=max_length)
    batch.update(evidence(parts, remix=remix))
    return batch


def encode_samples(samples: Sequence, *, processor, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Pixels and caption tokens of samples that have `.image` and `.caption`."""
    pixels = processor.image_processor([s.image for s in samples], return_tensors="pt")[PIXELS]
    tokens = processor.tokenizer([s.caption for s in samples], padding=True, truncation=True,
                                 max_length=max_length or processor.tokenizer.model_max_length,
                                 return_tensors="pt")
    return {PIXELS: pixels, INPUT_IDS: tokens[INPUT_IDS], ATTENTION: tokens[ATTENTION]}


def evidence(parts: Sequence[dict], *, remix: bool = False) -> dict[str, torch.Tensor]:
    """Evidence tensors of the concatenated parts, candidates indexed by batch position."""
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
