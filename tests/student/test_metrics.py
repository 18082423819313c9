"""Retrieval metrics against brute-force Python loops and hand-made cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mcad.student.metrics import recall_at_k, rerank, rerank_by, rerank_recalls, top_k

KS = (1, 5, 10)


# ------------------------------------------------------------- brute force

def _ranking(row) -> list[int]:
    """Columns best first; random floats have no ties."""
    return sorted(range(len(row)), key=lambda j: -row[j])


def _brute_recall(i2t, t2i, owner, ks=KS) -> dict:
    n_i, n_t = len(i2t), len(t2i)
    out = {}
    hits_i = {k: 0 for k in ks}
    for i in range(n_i):
        order = _ranking(i2t[i])
        for k in ks:
            hits_i[k] += any(owner[j] == i for j in order[:k])
    hits_t = {k: 0 for k in ks}
    for j in range(n_t):
        order = _ranking(t2i[j])
        for k in ks:
            hits_t[k] += owner[j] in order[:k]
    out["i2t"] = {f"R@{k}": 100 * hits_i[k] / n_i for k in ks}
    out["t2i"] = {f"R@{k}": 100 * hits_t[k] / n_t for k in ks}
    out["rsum"] = sum(out["i2t"].values()) + sum(out["t2i"].values())
    return out


def _brute_rerank_order(row, cand, itm, beta) -> list[int]:
    """Candidates by their second-stage score, then the rest by the first stage."""
    second = {c: (m if beta is None else row[c] + beta * m) for c, m in zip(cand, itm)}
    top = sorted(cand, key=lambda c: -second[c])
    rest = sorted((j for j in range(len(row)) if j not in second), key=lambda j: -row[j])
    return top + rest


def _random_case(rng, n_images, per_image):
    owner = np.repeat(np.arange(n_images), per_image)
    rng.shuffle(owner)
    return rng.standard_normal((n_images, len(owner))), owner


def _close(got: dict, want: dict) -> None:
    for d in ("i2t", "t2i"):
        for name, value in want[d].items():
            assert got[d][name] == pytest.approx(value, abs=0.006), (d, name)
    assert got["rsum"] == pytest.approx(want["rsum"], abs=0.006)


# ------------------------------------------------------------------ recall

@pytest.mark.parametrize("seed,n_images,per_image", [(0, 12, 5), (1, 30, 5), (2, 7, 1), (3, 40, 3)])
def test_recall_matches_brute_force(seed, n_images, per_image):
    rng = np.random.default_rng(seed)
    sim, owner = _random_case(rng, n_images, per_image)
    got = recall_at_k(sim, owner)
    _close(got, _brute_recall(sim, sim.T, owner))
    assert (got["n_images"], got["n_texts"]) == (n_images, n_images * per_image)
    assert set(got) == {"i2t", "t2i", "rsum", "n_images", "n_texts"}
    assert list(got["i2t"]) == ["R@1", "R@5", "R@10"]


def test_uneven_caption_counts_and_separate_t2i_matrix():
    rng = np.random.default_rng(5)
    owner = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 5])
    sim, t2i = rng.standard_normal((6, 12)), rng.standard_normal((12, 6))
    _close(recall_at_k(sim, owner, ks=(1, 2, 3), t2i=t2i), _brute_recall(sim, t2i, owner, ks=(1, 2, 3)))


def test_hand_made_case():
    # 2 images, captions 0,1 of image 0 and 2,3 of image 1
    owner = np.array([0, 0, 1, 1])
    sim = np.array([[0.1, 0.9, 0.8, 0.2],   # image 0: its caption 1 is best -> hit at 1
                    [0.7, 0.6, 0.5, 0.4]])  # image 1: its best own (0.5) is third -> hit at 3
    r = recall_at_k(sim, owner, ks=(1, 2, 3))
    assert r["i2t"] == {"R@1": 50.0, "R@2": 50.0, "R@3": 100.0}
    # texts: 0 -> image 1 (0.7) first: miss@1; 1 -> image 0: hit; 2 -> image 0 (0.8): miss; 3 -> image 1: hit
    assert r["t2i"] == {"R@1": 50.0, "R@2": 100.0, "R@3": 100.0}
    assert r["rsum"] == 450.0


def test_perfect_and_constant_scores():
    owner = np.repeat(np.arange(4), 5)
    perfect = (owner[None, :] == np.arange(4)[:, None]).astype(float)
    r = recall_at_k(perfect, owner)
    assert r["i2t"]["R@1"] == r["t2i"]["R@1"] == 100.0 and r["rsum"] == 600.0
    # ties count against the query: a model that cannot tell anything apart scores 0 at R@1
    flat = recall_at_k(np.zeros((4, 20)), owner, ks=(1, 3))
    assert flat["i2t"]["R@1"] == flat["t2i"]["R@1"] == 0.0
    assert flat["t2i"]["R@3"] == 0.0  # 3 other images tie with the right one


def test_accepts_torch_tensors():
    rng = np.random.default_rng(0)
    sim, owner = _random_case(rng, 6, 5)
    assert recall_at_k(torch.tensor(sim, requires_grad=True), torch.from_numpy(owner)) == recall_at_k(sim, owner)


@pytest.mark.parametrize("owner,sim,message", [
    (np.array([0, 0, 2]), np.zeros((3, 3)), "no text"),
    (np.array([0, 1, 3]), np.zeros((3, 3)), "outside"),
    (np.array([0, 1]), np.zeros((3, 3)), "entries"),
    (np.array([0.0, 1.0, 2.0]), np.zeros((3, 3)), "integer"),
    (np.array([0, 1, 2]), np.array([[np.nan, 0, 0], [0, 0, 0], [0, 0, 0]]), "non-finite"),
])
def test_bad_inputs_are_refused(owner, sim, message):
    with pytest.raises(ValueError, match=message):
        recall_at_k(sim, owner)


# --------------------------------------------------------------- re-ranking

def test_top_k_is_sorted_best_first():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((5, 9))
    idx = top_k(s, 4)
    assert idx.shape == (5, 4)
    for row, cols in zip(s, idx):
        assert list(cols) == _ranking(row)[:4]
    assert top_k(s, 50).shape == (5, 9)  # k beyond the row: all columns


@pytest.mark.parametrize("beta", [None, 0.0, 0.5, 3.0])
def test_rerank_orders_like_brute_force(beta):
    rng = np.random.default_rng(7)
    s = rng.standard_normal((6, 15)) * 10
    k = 4
    idx = top_k(s, k)
    itm = rng.standard_normal((6, k)) * 5
    out = rerank(s, idx, itm, beta=beta)
    for r in range(6):
        assert _ranking(out[r]) == _brute_rerank_order(s[r], list(idx[r]), list(itm[r]), beta)
    assert out.shape == s.shape and np.shares_memory(out, s) is False


def test_rerank_hand_made():
    s = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]])
    idx = np.array([[0, 1, 2]])
    itm = np.array([[-1.0, 0.0, 2.0]])
    assert _ranking(rerank(s, idx, itm)[0]) == [2, 1, 0, 3, 4]                # ITM alone
    assert _ranking(rerank(s, idx, itm, beta=2.0)[0]) == [2, 1, 0, 3, 4]      # 5-2, 4+0, 3+4
    assert _ranking(rerank(s, idx, itm, beta=0.1)[0]) == [0, 1, 2, 3, 4]      # 4.9, 4.0, 3.2: dual dominates
    # outside the candidates, the first-stage order stays, below every candidate
    low = rerank(s, idx, np.array([[-50.0, -60.0, -70.0]]))
    assert low[0, :3].min() > low[0, 3:].max()


def test_rerank_refuses_bad_candidates():
    s = np.zeros((2, 4))
    with pytest.raises(ValueError, match="repeats"):
        rerank(s, np.array([[0, 0], [1, 2]]), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="outside"):
        rerank(s, np.array([[0, 4], [1, 2]]), np.zeros((2, 2)))


def test_rerank_by_scorer_and_rerank_recalls_match_brute_force():
    rng = np.random.default_rng(11)
    n_images, per_image, k, beta = 10, 5, 6, 0.7
    dual, owner = _random_case(rng, n_images, per_image)
    dual *= 10
    itm_full = rng.standard_normal(dual.shape) * 4  # the "single teacher" on every pair
    calls = []

    def scorer(rows, cols):
        calls.append(len(rows))
        return itm_full[rows, cols]

    ranked, idx, itm = rerank_by(dual, scorer, k)
    assert calls == [n_images * k] and np.array_equal(itm, np.take_along_axis(itm_full, idx, 1))
    t_idx = top_k(dual.T, k)
    t_itm = np.take_along_axis(itm_full.T, t_idx, 1)
    got = rerank_recalls(dual, owner, i2t_idx=idx, i2t_itm=itm, t2i_idx=t_idx, t2i_itm=t_itm, beta=beta)
    assert set(got) == {"dual", "single", "combined"}
    _close(got["dual"], _brute_recall(dual, dual.T, owner))
    for name, b in (("single", None), ("combined", beta)):
        i2t = [_brute_rerank_order(dual[i], list(idx[i]), list(itm[i]), b) for i in range(n_images)]
        t2i = [_brute_rerank_order(dual.T[j], list(t_idx[j]), list(t_itm[j]), b) for j in range(len(owner))]
        # a ranking as scores: position p gets score -p
        as_scores = lambda orders, m: np.array([[-o.index(c) for c in range(m)] for o in orders])  # noqa: E731
        want = _brute_recall(as_scores(i2t, len(owner)), as_scores(t2i, n_images), owner)
        _close(got[name], want)
    assert np.array_equal(rerank_by(dual, scorer, k, beta=beta)[0], rerank(dual, idx, itm, beta=beta))


def test_recalls_are_rounded_to_two_decimals_and_bad_owners_named():
    # 3 images, one caption each; only image 0 ranks its own caption first (both directions).
    sim = np.array([[3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = recall_at_k(sim, np.arange(3), ks=(1,))
    assert out["i2t"]["R@1"] == 33.33 and out["t2i"]["R@1"] == 33.33
    assert out["rsum"] == 66.67
    with pytest.raises(ValueError, match="^text_to_image must have 1 dimensions"):
        recall_at_k(sim, np.arange(3)[:, None], ks=(1,))


@pytest.mark.parametrize("ks", [(), (0,), (1, -5)])
def test_ks_must_be_positive(ks):
    with pytest.raises(ValueError, match="ks must be positive"):
        recall_at_k(np.eye(2), np.arange(2), ks=ks)


def test_text_to_image_ranks_cover_more_texts_than_one_chunk():
    # 2 images, 1030 texts (more than one 1024-row chunk): texts 1024.. rank their image second.
    owner = np.arange(1030) % 2
    sim = np.where(np.arange(2)[:, None] == owner[None, :], 1.0, 0.0)
    sim[1 - owner[1024:], np.arange(1024, 1030)] = 2.0
    out = recall_at_k(sim, owner, ks=(1,))
    assert out["t2i"]["R@1"] == round(100 * 1024 / 1030, 2)


def test_top_1_and_non_finite_inputs_named():
    s = np.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]])
    assert top_k(s, 1).tolist() == [[1], [0]]
    bad = np.array([[np.nan, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="^scores has non-finite scores"):
        top_k(bad, 1)
    with pytest.raises(ValueError, match="^sim has non-finite scores"):
        recall_at_k(bad, np.arange(2))
    with pytest.raises(ValueError, match="^t2i has non-finite scores"):
        recall_at_k(np.eye(2), np.arange(2), t2i=bad)


def test_top_k_matches_a_full_sort():
    # rows long enough that numpy's partition leaves the tail unsorted
    s = np.random.default_rng(4).normal(size=(20, 300))
    for k in (1, 2, 10, 116, 119, 299):
        assert top_k(s, k).tolist() == np.argsort(-s, axis=1)[:, :k].tolist()


def test_rerank_puts_candidates_above_the_best_other_column_and_checks_its_inputs():
    scores = np.array([[5.0, 0.0, 0.0, 4.0]])
    out = rerank(scores, np.array([[1, 2]]), np.array([[0.0, 1.0]]))
    assert np.argsort(-out[0]).tolist() == [2, 1, 0, 3]  # candidates by ITM, then the rest by score
    with pytest.raises(ValueError, match="must both be"):
        rerank(scores, np.array([[1, 2]]), np.array([[0.0, 1.0, 2.0]]))
    with pytest.raises(ValueError, match="^idx must have 2 dimensions"):
        rerank(scores, np.array([1, 2]), np.array([[0.0, 1.0]]))
    for kw, name in (({"scores": scores * np.nan}, "scores"), ({"itm": np.array([[np.inf, 1.0]])}, "itm")):
        args = {"scores": scores, "idx": np.array([[1, 2]]), "itm": np.array([[0.0, 1.0]]), **kw}
        with pytest.raises(ValueError, match=f"^{name} has non-finite"):
            rerank(args["scores"], args["idx"], args["itm"])


def test_rerank_recalls_beta_defaults_to_one():
    rng = np.random.default_rng(11)
    dual, owner = _random_case(rng, 10, 5)
    dual *= 10
    itm_full = rng.standard_normal(dual.shape) * 4
    idx, t_idx = top_k(dual, 6), top_k(dual.T, 6)
    itm, t_itm = np.take_along_axis(itm_full, idx, 1), np.take_along_axis(itm_full.T, t_idx, 1)
    # beta defaults to 1 (dual + ITM), and a non-finite dual is named
    kw = dict(i2t_idx=idx, i2t_itm=itm, t2i_idx=t_idx, t2i_itm=t_itm)
    assert rerank_recalls(dual, owner, **kw) == rerank_recalls(dual, owner, **kw, beta=1.0)
    assert rerank_recalls(dual, owner, **kw) != rerank_recalls(dual, owner, **kw, beta=2.0)
    with pytest.raises(ValueError, match="^dual has non-finite"):
        rerank_recalls(dual * np.nan, owner, **kw)


# ---------------------------------------------------------------- paired bootstrap

def _ranked(sim, owner):
    return recall_at_k(sim, owner, keep_ranks=True)


def _two_models(seed=0, n=40, caps=3, gap=0.0):
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(n), caps)
    truth = (owner[None, :] == np.arange(n)[:, None]).astype(float)
    a = truth * (1.0 + gap) + rng.normal(size=(n, n * caps))
    b = truth + rng.normal(size=(n, n * caps))
    return _ranked(a, owner), _ranked(b, owner), owner


def test_paired_bootstrap_matches_an_explicit_resampling_loop():
    from mcad.student.metrics import paired_bootstrap, resample_counts

    ra, rb, owner = _two_models()
    out = paired_bootstrap(ra["ranks"], rb["ranks"], n_boot=50, seed=3)
    # The observed differences are the recall tables' own.
    assert out["i2t"]["diff"] == pytest.approx(ra["i2t"]["R@1"] - rb["i2t"]["R@1"], abs=0.01)
    assert out["t2i"]["diff"] == pytest.approx(ra["t2i"]["R@1"] - rb["t2i"]["R@1"], abs=0.01)
    # Reference: build every resampled split image by image (an image brings all its captions).
    counts = resample_counts(len(ra["ranks"]["i2t"]), 50, 3)
    i2t, t2i = [], []
    for row in counts.astype(int):
        images = np.repeat(np.arange(len(row)), row)
        texts = np.concatenate([np.flatnonzero(owner == i) for i in images])
        hit = lambda r, idx: 100.0 * np.mean(r[idx] < 1)  # noqa: E731
        i2t.append(hit(ra["ranks"]["i2t"], images) - hit(rb["ranks"]["i2t"], images))
        t2i.append(hit(ra["ranks"]["t2i"], texts) - hit(rb["ranks"]["t2i"], texts))
    i2t, t2i = np.array(i2t), np.array(t2i)
    for name, values in (("i2t", i2t), ("t2i", t2i), ("mean", (i2t + t2i) / 2)):
        low, high = np.percentile(values, [2.5, 97.5])
        assert out[name]["low"] == pytest.approx(low) and out[name]["high"] == pytest.approx(high)


def test_resample_counts_draw_n_units_with_replacement():
    """The loop reference above takes its resamples from resample_counts: check them on their own."""
    from mcad.student.metrics import resample_counts

    counts = resample_counts(50, 4000, seed=1)
    assert counts.shape == (4000, 50) and (counts.sum(axis=1) == 50).all() and (counts >= 0).all()
    assert counts.mean() == pytest.approx(1.0)
    # Draws with replacement: about 1 - 1/e of the units appear in a resample, each about equally often.
    assert (counts > 0).mean() == pytest.approx(1 - (1 - 1 / 50) ** 50, abs=0.01)
    assert np.abs(counts.mean(axis=0) - 1.0).max() < 0.1
    np.testing.assert_array_equal(resample_counts(50, 10, seed=1), counts[:10])
    assert not np.array_equal(resample_counts(50, 10, seed=2), counts[:10])


def test_paired_bootstrap_says_when_a_difference_is_significant():
    from mcad.student.metrics import paired_bootstrap

    ra, rb, _ = _two_models(n=200, gap=3.0)
    better = paired_bootstrap(ra["ranks"], rb["ranks"], n_boot=500)
    assert better["mean"]["diff"] > 5 and better["mean"]["low"] > 0 and better["mean"]["significant"]
    same = paired_bootstrap(ra["ranks"], ra["ranks"], n_boot=200)
    assert same["mean"] == {"diff": 0.0, "low": 0.0, "high": 0.0, "significant": False}
    noise, other, _ = _two_models(seed=1, n=200)
    close = paired_bootstrap(noise["ranks"], other["ranks"], n_boot=500)
    assert close["mean"]["low"] < close["mean"]["diff"] < close["mean"]["high"]
    with pytest.raises(ValueError, match="same split"):
        paired_bootstrap(ra["ranks"], _two_models(n=10)[0]["ranks"])
