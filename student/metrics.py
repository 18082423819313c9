"""Retrieval metrics: recall@K both ways, and re-ranking a dual encoder's top-k.

The 5-caption protocol (COCO/Flickr): every image has several captions; an
image->text query hits at K when ANY of its captions is among the K best
texts, a text->image query when its own image is among the K best images.
Recall values are percentages (the eval JSON of docs/design.md, section 6):

    r = recall_at_k(sim, text_to_image)      # sim (n_images, n_texts), owner of each text
    r["i2t"]["R@1"], r["t2i"]["R@5"], r["rsum"], r["n_images"], r["n_texts"]

A single-stream (cross-attention) teacher is evaluated as BLIP/ALBEF do: it
re-scores only the dual teacher's top-k candidates of every query, which move
above everything else in the query's ranking:

    idx = top_k(logits, 16)                             # (n, 16) best first
    single = rerank(logits, idx, itm)                   # ordered by ITM alone
    combined = rerank(logits, idx, itm, beta=1.0)       # dual logit + beta * ITM
    rerank_recalls(logits, owner, i2t_idx=..., i2t_itm=..., t2i_idx=..., t2i_itm=..., beta=1.0)

Ties count against the query (a model that scores everything alike finds
nothing), so results never depend on sort order. Inputs are numpy arrays or
CPU torch tensors; everything is computed in numpy, float64.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

KS = (1, 5, 10)
_ROWS = 1024  # rows per chunk: bounds the (rows, n) temporaries of a large benchmark
_DIGITS = 2


def _as_array(x, name: str, ndim: int) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; student/ must not need torch here
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    return a


def _scores(x, name: str) -> np.ndarray:
    a = _as_array(x, name, 2).astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        # NaN compares false everywhere and would count as a hit
        raise ValueError(f"{name} has non-finite scores")
    return a


def _owner(text_to_image, n_images: int, n_texts: int) -> np.ndarray:
    owner = _as_array(text_to_image, "text_to_image", 1)
    if owner.shape[0] != n_texts:
        raise ValueError(f"text_to_image has {owner.shape[0]} entries for {n_texts} texts")
    if not np.issubdtype(owner.dtype, np.integer):
        raise ValueError(f"text_to_image must hold integer image indices, got {owner.dtype}")
    if n_texts and (owner.min() < 0 or owner.max() >= n_images):
        raise ValueError(f"text_to_image holds indices outside 0..{n_images - 1}")
    lonely = np.flatnonzero(np.bincount(owner, minlength=n_images) == 0)
    if lonely.size:
        raise ValueError(f"{lonely.size} images have no text (first: {lonely[0]}); i2t recall is undefined")
    return owner.astype(np.int64)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    return tuple(sorted(set(ks)))


def i2t_ranks(sim: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """0-based rank of each image's best own caption: other texts scoring >= it."""
    n_images = sim.shape[0]
    ranks = np.empty(n_images, np.int64)
    for lo in range(0, n_images, _ROWS):
        rows = sim[lo:lo + _ROWS]
        own = owner[None, :] == np.arange(lo, lo + len(rows))[:, None]
        best = np.where(own, rows, -np.inf).max(axis=1)
        ranks[lo:lo + len(rows)] = ((rows >= best[:, None]) & ~own).sum(axis=1)
    return ranks


def t2i_ranks(t2i: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """0-based rank of each text's image among all images: other images scoring >= it."""
    ranks = np.empty(t2i.shape[0], np.int64)
    for lo in range(0, t2i.shape[0], _ROWS):
        rows = t2i[lo:lo + _ROWS]
        positive = rows[np.arange(len(rows)), owner[lo:lo + len(rows)]]
        ranks[lo:lo + len(rows)] = (rows >= positive[:, None]).sum(axis=1) - 1  # minus the image itself
    return ranks


def recall_from_ranks(rank_i2t: np.ndarray, rank_t2i: np.ndarray, ks: Sequence[int] = KS) -> dict:
    """The eval dict from 0-based ranks of the first hit per query."""
    ks = _check_ks(ks)
    out: dict = {}
    for name, rank in (("i2t", rank_i2t), ("t2i", rank_t2i)):
        out[name] = {f"R@{k}": round(100.0 * float(np.mean(rank < k)), _DIGITS) for k in ks}
    exact = sum(100.0 * float(np.mean(r < k)) for r in (rank_i2t, rank_t2i) for k in ks)
    out["rsum"] = round(exact, _DIGITS)
    out["n_images"], out["n_texts"] = int(len(rank_i2t)), int(len(rank_t2i))
    return out


def recall_at_k(sim, text_to_image, ks: Sequence[int] = KS, *, t2i=None, keep_ranks: bool = False) -> dict:
    """Recall@K in percent, both directions, and rsum (the sum of all recalls).

    sim: (n_images, n_texts) scores, higher is better. text_to_image: (n_texts,)
    the image index of each text; every image needs at least one text.
    t2i: optional (n_texts, n_images) scores for the text->image direction when
    it differs from sim.T (a re-ranked matrix); default sim.T.
    Returns {"i2t": {"R@1": %, ...}, "t2i": {...}, "rsum": x, "n_images": n, "n_texts": n};
    keep_ranks adds "ranks": {"i2t", "t2i", "owner"} numpy arrays (for paired_bootstrap; not JSON).
    """
    sim = _scores(sim, "sim")
    n_images, n_texts = sim.shape
    owner = _owner(text_to_image, n_images, n_texts)
    t2i = sim.T if t2i is None else _scores(t2i, "t2i")
    if t2i.shape != (n_texts, n_images):
        raise ValueError(f"t2i must be (n_texts, n_images) = {(n_texts, n_images)}, got {t2i.shape}")
    rank_i2t, rank_t2i = i2t_ranks(sim, owner), t2i_ranks(t2i, owner)
    out = recall_from_ranks(rank_i2t, rank_t2i, ks)
    if keep_ranks:
        out["ranks"] = {"i2t": rank_i2t, "t2i": rank_t2i, "owner": owner}
    return out


# ---------------------------------------------------------------- paired bootstrap

def resample_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) float64: how often each of n units is drawn in each resample of n draws with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def paired_bootstrap(a: dict, b: dict, *, k: int = 1, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """A paired bootstrap over test queries of R@k(a) - R@k(b), in points, both directions and their mean.

    a, b: the "ranks" of recall_at_k(keep_ranks=True) for two models on the SAME
    split (same images, captions and owners). The unit resampled is the image
    with all its captions (the 5-caption protocol: an image's captions are not
    independent queries): each of n_boot resamples draws n images with
    replacement; i2t recall is over the drawn images, t2i over their captions.
    Both models see the same resamples (paired). Returns per metric
    (i2t, t2i, mean = their average) the observed difference, the percentile
    interval at `level`, and `significant` (the interval excludes 0).
    """
    if not np.array_equal(a["owner"], b["owner"]):
        raise ValueError("paired bootstrap needs the same split for both models (owners differ)")
    owner = np.asarray(a["owner"], np.int64)
    n = len(a["i2t"])
    if len(b["i2t"]) != n or len(a["t2i"]) != len(owner) or len(b["t2i"]) != len(owner):
        raise ValueError("paired bootstrap needs rank arrays of the same split for both models")
    captions = np.bincount(owner, minlength=n).astype(np.float64)
    d_i2t = (np.asarray(a["i2t"]) < k).astype(np.float64) - (np.asarray(b["i2t"]) < k)
    hits = (np.asarray(a["t2i"]) < k).astype(np.float64) - (np.asarray(b["t2i"]) < k)
    d_t2i = np.bincount(owner, weights=hits, minlength=n)  # per image: caption hits of a minus b
    counts = resample_counts(n, n_boot, seed)
    boot_i2t = 100.0 * counts @ d_i2t / n
    boot_t2i = 100.0 * counts @ d_t2i / (counts @ captions)
    observed = {"i2t": 100.0 * d_i2t.mean(), "t2i": 100.0 * d_t2i.sum() / captions.sum()}
    observed["mean"] = (observed["i2t"] + observed["t2i"]) / 2
    boots = {"i2t": boot_i2t, "t2i": boot_t2i, "mean": (boot_i2t + boot_t2i) / 2}
    tail = 100.0 * (1.0 - level) / 2
    out = {}
    for name, values in boots.items():
        low, high = np.percentile(values, [tail, 100.0 - tail])
        out[name] = {"diff": float(observed[name]), "low": float(low), "high": float(high),
                     "significant": not (low <= 0.0 <= high)}
    return {"k": k, "n_boot": n_boot, "seed": seed, "level": level, "unit": "image with its captions", **out}


# ---------------------------------------------------------------- re-ranking

def top_k(scores, k: int) -> np.ndarray:
    """(n, min(k, m)) column indices of each row's k best scores, best first."""
    scores = _scores(scores, "scores")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def rerank(scores, idx, itm, *, beta: float | None = None) -> np.ndarray:
    """Scores with each row's candidates `idx` re-scored and moved above the rest.

    scores (n, m): first-stage (dual) logits; idx (n, k): each row's candidate
    columns (distinct per row); itm (n, k): the second-stage (ITM) logit of
    each candidate pair. Candidates are ordered by ITM alone (beta None: the
    single teacher) or by dual + beta * ITM (the combined score); all other
    columns keep their first-stage order below every candidate.
    Returns a new (n, m) float64 matrix to hand to recall_at_k.
    """
    scores = _scores(scores, "scores")
    idx = _as_array(idx, "idx", 2).astype(np.int64)
    itm = _scores(itm, "itm")
    if idx.shape != itm.shape or idx.shape[0] != scores.shape[0]:
        raise ValueError(f"idx {idx.shape} and itm {itm.shape} must both be (n, k) with n = {scores.shape[0]}")
    if idx.size and (idx.min() < 0 or idx.max() >= scores.shape[1]):
        raise ValueError(f"idx holds columns outside 0..{scores.shape[1] - 1}")
    if idx.shape[1] > 1 and (np.diff(np.sort(idx, axis=1), axis=1) == 0).any():
        raise ValueError("idx repeats a candidate within a row")
    top = itm if beta is None else np.take_along_axis(scores, idx, axis=1) + beta * itm
    # Shift each row's candidate scores above that row's best first-stage score.
    lift = scores.max(axis=1, keepdims=True) + 1.0 - top.min(axis=1, keepdims=True)
    out = scores.copy()
    np.put_along_axis(out, idx, top + lift, axis=1)
    return out


def rerank_by(scores, scorer: Callable[[np.ndarray, np.ndarray], np.ndarray], k: int, *,
              beta: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-rank each row's top-k with `scorer(rows, cols) -> (pairs,)` second-stage logits.

    Returns (reranked (n, m), idx (n, k), itm (n, k)); the scorer sees each
    candidate pair once, rows and cols as flat int64 arrays.
    """
    idx = top_k(scores, k)
    rows = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
    itm = np.asarray(scorer(rows, idx.reshape(-1)), dtype=np.float64).reshape(idx.shape)
    return rerank(scores, idx, itm, beta=beta), idx, itm


def rerank_recalls(dual, text_to_image, *, i2t_idx, i2t_itm, t2i_idx, t2i_itm, beta: float = 1.0,
                   ks: Sequence[int] = KS, keep_ranks: bool = False) -> dict:
    """{"dual", "single", "combined"} recall of a dual teacher and a re-ranker of its top-k.

    dual (n_images, n_texts) logits; i2t_* (n_images, k) candidate texts per
    image and their ITM logits; t2i_* (n_texts, k) candidate images per text.
    single = ITM alone over the candidates; combined = dual + beta * ITM.
    """
    dual = _scores(dual, "dual")
    out = {"dual": recall_at_k(dual, text_to_image, ks, keep_ranks=keep_ranks)}
    for name, b in (("single", None), ("combined", beta)):
        out[name] = recall_at_k(rerank(dual, i2t_idx, i2t_itm, beta=b), text_to_image, ks,
                                t2i=rerank(dual.T, t2i_idx, t2i_itm, beta=b), keep_ranks=keep_ranks)
    return out
