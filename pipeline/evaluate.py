"""Retrieval evaluation of a CLIPModel dir (a student or the dual teacher) on WebDataset shards.

    from mcad.pipeline.evaluate import evaluate
    r = evaluate("out/student", "data/shapes/test")                      # one EVAL dict
    r = evaluate("teachers/dual", "data/shapes/test", single="teachers/single")
    r["dual"], r["single"], r["combined"]                                # three EVAL dicts
    r = evaluate_student(student, processor, "data/shapes/val")          # in training, no export

Every image is scored against every caption of the split (all captions of
each image: the 5-caption protocol on the shapes test split). EVAL is the
dict of docs/design.md (section 6), `student.metrics.recall_at_k`'s, plus `n_rejected` and
`rejected` ({reason: count}): samples the shards could not give are counted,
never dropped silently.

With a single-stream teacher (BLIP-ITM), its ITM head re-scores the dual
model's top-k candidates of every query, as BLIP/ALBEF evaluate: `single`
ranks them by ITM alone, `combined` by dual logit + beta * ITM (the MCAD
teacher distribution); all other candidates stay below, in dual order.

Memory stays bounded on large splits: images are embedded batch by batch as
the shards stream, and the single teacher reads the shards a second time,
scoring each image's candidate pairs while its vision states are at hand.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from mcad.pipeline.shard_list import list_shards

from mcad.pipeline.shards import Sample, iter_shard
from mcad.pipeline.teachers import DualTeacher, SingleTeacher, check_model_dir
from mcad.storage.errors import InputError
from mcad.storage.iters import batched
from mcad.student.metrics import recall_at_k, rerank_recalls, top_k

DEFAULT_BETA = 1.0
DEFAULT_RERANK_K = 16
PAIRS_PER_IMAGE_BATCH = 4  # pair passes are cheaper than image passes: score 4 batches' worth at once


TEACHER_RECALL = "teacher_recall.json"  # beside dual/ and single/: `mcad teachers bootstrap` writes it


def combined_beta(single_dir: str | Path, beta: float | None = None) -> float:
    """The β of the combined score: `beta` when given, else the one chosen on val for this single
    teacher ("beta" of teacher_recall.json in its parent folder, as `mcad teachers bootstrap` writes
    it; the shipped demo teachers have one), else DEFAULT_BETA."""
    import json

    if beta is not None:
        return float(beta)
    path = Path(single_dir).parent / TEACHER_RECALL
    tuned = json.loads(path.read_text()).get("beta") if path.is_file() else None
    return DEFAULT_BETA if tuned is None else float(tuned)


@dataclass
class _Split:
    """What pass one keeps: keys, captions with their image, image embeddings, rejects."""

    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)
    image_emb: list[torch.Tensor] = field(default_factory=list)
    rejects: Counter = field(default_factory=Counter)


def evaluate(model_dir: str | Path, data, *, single: str | Path | None = None,
             rerank_k: int = DEFAULT_RERANK_K, beta: float | None = None, batch_size: int = 64,
             device: str | None = None, progress: bool = False, keep_ranks: bool = False) -> dict:
    """Recall@1/5/10 of `model_dir` on the shards `data` names (see the module docstring).

    Returns one EVAL dict, or {"dual", "single", "combined"} EVAL dicts when
    `single` (a BLIP-ITM dir) is given; single and combined also say
    `rerank_k`, combined its `beta` (default: `combined_beta`, the β chosen on val
    beside the teachers, else 1.0). keep_ranks adds each
    query's rank ("ranks", numpy arrays: student.metrics.paired_bootstrap).
    """
    if rerank_k < 1:
        raise InputError(f"rerank k must be positive, got {rerank_k}")
    if batch_size < 1:
        raise InputError(f"batch size must be positive, got {batch_size}")
    if beta is not None and single is None:
        raise InputError("beta weighs the single teacher's ITM logits: it needs a single teacher")
    if beta is not None and not np.isfinite(beta):
        raise InputError(f"beta must be a finite number, got {beta}")
    check_model_dir(model_dir, "clip", "model")  # a student or a dual teacher
    shards = list_shards(data)
    dual = DualTeacher.load(model_dir, device=device)
    reranker = SingleTeacher.load(single, device=device) if single is not None else None

    split = _embed_split(dual, shards, batch_size, progress)
    texts = _encode_texts(dual, split.captions, batch_size, progress)
    owner = np.asarray(split.owner, dtype=np.int64)
    logits = (dual.logit_scale * torch.cat(split.image_emb) @ texts.T).double().numpy()
    report = _report(split)
    if reranker is None:
        return {**recall_at_k(logits, owner, keep_ranks=keep_ranks), **report}

    i2t_idx, t2i_idx = top_k(logits, rerank_k), top_k(logits.T, rerank_k)
    i2t_itm, t2i_itm = _itm_of_candidates(reranker, shards, split, i2t_idx, t2i_idx, batch_size, progress)
    b = combined_beta(single, beta)
    out = rerank_recalls(logits, owner, i2t_idx=i2t_idx, i2t_itm=i2t_itm, t2i_idx=t2i_idx,
                         t2i_itm=t2i_itm, beta=b, keep_ranks=keep_ranks)
    out = {name: {**r, **report} for name, r in out.items()}
    out["single"]["rerank_k"] = out["combined"]["rerank_k"] = int(rerank_k)
    out["combined"]["beta"] = b
    return out


class _StudentEncoder:
    """A training Student seen as the dual teacher's two encode calls (no grad, eval mode)."""

    def __init__(self, student, processor):
        self.student, self.processor = student, processor
        self.device = next(student.parameters()).device
        self.max_length = student.clip.config.text_config.max_position_embeddings

    @torch.no_grad()
    def encode_images(self, images) -> torch.Tensor:
        px = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return self.student.encode_images(px.to(self.device)).float()

    @torch.no_grad()
    def encode_texts(self, texts) -> torch.Tensor:
        tok = self.processor.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                       return_tensors="pt")
        return self.student.encode_texts(tok["input_ids"].to(self.device),
                                         tok["attention_mask"].to(self.device)).float()


def evaluate_student(student, processor, data, *, batch_size: int = 64, progress: bool = False) -> dict:
    """EVAL of an in-memory `student.models.Student` (validation during training).

    The same protocol and figures as `evaluate` on its export; the student is
    put in eval mode for the pass and left in the mode it was in.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be positive, got {batch_size}")
    encoder, was_training = _StudentEncoder(student, processor), student.training
    student.eval()
    try:
        split = _embed_split(encoder, list_shards(data), batch_size, progress)
        texts = _encode_texts(encoder, split.captions, batch_size, progress)
    finally:
        student.train(was_training)
    sim = (torch.cat(split.image_emb) @ texts.T).double().numpy()
    return {**recall_at_k(sim, np.asarray(split.owner, dtype=np.int64)), **_report(split)}


def _report(split: _Split) -> dict:
    return {"n_rejected": sum(split.rejects.values()), "rejected": dict(sorted(split.rejects.items()))}


def _samples(shards: list[str], split: _Split | None = None) -> Iterator[Sample]:
    """The usable samples of all shards in order; rejects counted into `split`."""
    for path in shards:
        for item in iter_shard(path):
            if isinstance(item, Sample):
                yield item
            elif split is not None:
                split.rejects[item.reason] += 1


def _embed_split(dual, shards: list[str], batch_size: int, progress: bool) -> _Split:
    """Pass one: image embeddings (CPU float32) batch by batch, captions kept as text.

    `dual` is anything with the DualTeacher's encode_images(list of PIL) and
    encode_texts(list of str), each giving (n, d) normalised embeddings.
    """
    split = _Split()
    with tqdm(desc="images", unit="img", disable=not progress, leave=False) as bar:
        for batch in batched(_samples(shards, split), batch_size):
            split.image_emb.append(dual.encode_images([s.image for s in batch]).cpu())
            for s in batch:
                split.owner += [len(split.keys)] * len(s.captions)
                split.captions += s.captions
                split.keys.append(s.key)
            bar.update(len(batch))
    if not split.keys:
        raise InputError(f"no usable samples in {len(shards)} shard(s) "
                         f"(rejected: {dict(split.rejects) or 'none'})")
    return split


def _encode_texts(dual, captions: list[str], batch_size: int, progress: bool) -> torch.Tensor:
    out = []
    for lo in tqdm(range(0, len(captions), batch_size), desc="captions", disable=not progress, leave=False):
        out.append(dual.encode_texts(captions[lo:lo + batch_size]).cpu())
    return torch.cat(out)


def _itm_of_candidates(single: SingleTeacher, shards: list[str], split: _Split, i2t_idx: np.ndarray,
                       t2i_idx: np.ndarray, batch_size: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pass two: the ITM logit of every candidate pair, each distinct pair scored once."""
    n_images, n_texts = len(split.keys), len(split.captions)
    img = np.concatenate([np.repeat(np.arange(n_images), i2t_idx.shape[1]), t2i_idx.reshape(-1)])
    txt = np.concatenate([i2t_idx.reshape(-1), np.repeat(np.arange(n_texts), t2i_idx.shape[1])])
    # Sorted by image: the pairs of an image batch are one contiguous run.
    codes, inverse = np.unique(img * n_texts + txt, return_inverse=True)
    pair_img, pair_txt = codes // n_texts, codes % n_texts
    tokens = single.tokenize(split.captions)
    itm = np.empty(len(codes), np.float64)
    start = 0
    with tqdm(total=n_images, desc="re-rank", unit="img", disable=not progress, leave=False) as bar:
        for batch in batched(_samples(shards), batch_size):
            lo, keys = start, [s.key for s in batch]
            start += len(batch)
            if keys != split.keys[lo:start]:
                raise InputError("the shards changed during the evaluation (keys differ on the second read)")
            states = single.encode_images([s.image for s in batch])
            a, b = np.searchsorted(pair_img, [lo, start])
            step = PAIRS_PER_IMAGE_BATCH * batch_size
            for c in range(a, b, step):
                sl = slice(c, min(c + step, b))
                local = torch.from_numpy(pair_img[sl] - lo).to(states.device)
                rows = torch.from_numpy(pair_txt[sl])
                _, m = single.match_tokens(states, {k: v[rows.to(v.device)] for k, v in tokens.items()},
                                           image_index=local, batch_size=step)
                itm[sl] = m.double().cpu().numpy()
            bar.update(len(batch))
    if start != n_images:
        raise InputError("the shards changed during the evaluation (fewer samples on the second read)")
    itm = itm[inverse.reshape(-1)]
    cut = n_images * i2t_idx.shape[1]
    return itm[:cut].reshape(i2t_idx.shape), itm[cut:].reshape(t2i_idx.shape)


def recall_table(rows: dict[str, dict]) -> str:
    """A fixed-width text table of EVAL dicts, one row per name: the one recall table
    `mcad eval` and `mcad demo` print (the name column widens to the longest name)."""
    w = max([10, *(len(name) for name in rows)])
    lines = [f"{'model':{w}s} {'i2t R@1':>8s} {'R@5':>6s} {'R@10':>6s} {'t2i R@1':>8s} {'R@5':>6s} "
             f"{'R@10':>6s} {'rsum':>7s} {'images':>7s} {'texts':>7s}"]
    for name, r in rows.items():
        i, t = r["i2t"], r["t2i"]
        lines.append(f"{name:{w}s} {i['R@1']:8.2f} {i['R@5']:6.2f} {i['R@10']:6.2f} {t['R@1']:8.2f} "
                     f"{t['R@5']:6.2f} {t['R@10']:6.2f} {r['rsum']:7.2f} {r['n_images']:7d} {r['n_texts']:7d}")
    return "\n".join(lines)
