"""mcad_targets against a naive, loop-by-loop reading of docs/design.md, section 3 (the MCAD maths)."""
from __future__ import annotations

import math

import pytest
import torch

from mcad.storage.errors import InputError
from mcad.storage.schema import PAD_IDX
from mcad.student.targets import I2T_LOGITS, I2T_RANK, IMG_FEAT, T2I_LOGITS, T2I_RANK, TXT_FEAT, mcad_targets

SCALE = 7.0


def _unit(gen: torch.Generator, n: int, d: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=gen)
    return x / x.norm(dim=1, keepdim=True)


def make_signals(block_sizes, *, d=4, k=4, seed=0, drop=0.0):
    """Signals as the data layer hands them: batch-local candidate lists per block, PAD-padded.

    Rows of different blocks are interleaved (a permutation), so nothing may rely on
    blocks being contiguous. `drop` turns that share of non-positive candidates into
    PAD_IDX while keeping their finite m, as a remix batch does for candidates it lacks.
    """
    gen = torch.Generator().manual_seed(seed)
    block = torch.cat([torch.full((n,), b) for b, n in enumerate(block_sizes)])
    block = block[torch.randperm(len(block), generator=gen)]
    b = len(block)
    v, t, g = _unit(gen, b, d), _unit(gen, b, d), _unit(gen, b, d)
    itm_all = torch.randn(b, b, generator=gen) * 3
    ev = {"img_emb": v, "txt_emb": t, "fused_proj": g, "block": block}
    for name, q, c, itm in (("i2t", v, t, itm_all), ("t2i", t, v, itm_all.T)):
        idx = torch.full((b, k), PAD_IDX, dtype=torch.long)
        m = torch.full((b, k), -math.inf)
        for i in range(b):
            members = [j for j in range(b) if block[j] == block[i]]
            members.sort(key=lambda j: -float(q[i] @ c[j]))
            top = members[:k]
            if i not in top:
                top[-1] = i
            top.sort(key=lambda j: -float(q[i] @ c[j]))
            for pos, j in enumerate(top):
                idx[i, pos], m[i, pos] = j, itm[i, j]
                if j != i and float(torch.rand(1, generator=gen)) < drop:
                    idx[i, pos] = PAD_IDX  # not in the batch: m stays finite, must be ignored
        ev[f"{name}_idx"], ev[f"{name}_itm"] = idx, m
    return ev


def naive_targets(ev, *, alpha, beta, k_prime=None, itm_temperature=1.0, itm_norm="none", rank_by=None):
    """Python loops over rows and pairs, floats only."""
    v, t, g, block = ev["img_emb"].tolist(), ev["txt_emb"].tolist(), ev["fused_proj"].tolist(), ev["block"].tolist()
    b = len(v)

    def modify(x, y):
        z = [a + alpha * c for a, c in zip(x, y)]
        n = math.sqrt(sum(a * a for a in z))
        return [a / n for a in z]

    vm = [modify(v[i], g[i]) for i in range(b)]
    tm = [modify(t[i], g[i]) for i in range(b)]
    out = {IMG_FEAT: torch.tensor(vm), TXT_FEAT: torch.tensor(tm)}
    for name, q, c, key in (("i2t", vm, tm, I2T_LOGITS), ("t2i", tm, vm, T2I_LOGITS)):
        idx, itm = ev[f"{name}_idx"].tolist(), ev[f"{name}_itm"].tolist()
        heads = []  # per row: [(j, m)] of C'_i in stored order
        for i in range(b):
            kp = k_prime or len(idx[i])
            head = list(zip(idx[i], itm[i]))[:kp]
            if i not in [j for j, _ in head]:
                head[kp - 1] = (i, next(m for j, m in zip(idx[i], itm[i]) if j == i))
            heads.append([(j, m) for j, m in head if j != PAD_IDX])

        def dual(i, j):
            return SCALE * sum(a * e for a, e in zip(q[i], c[j]))

        ratio = [1.0] * b
        if itm_norm == "pool":
            for blk in set(block):
                rows = [i for i in range(b) if block[i] == blk]
                sq = {"dual": 0.0, "itm": 0.0}
                count = 0
                for i in rows:
                    for part, vals in (("dual", [dual(i, j) for j, _ in heads[i]]), ("itm", [m for _, m in heads[i]])):
                        mean = sum(vals) / len(vals)
                        sq[part] += sum((x - mean) ** 2 for x in vals)
                    count += len(heads[i])
                var_dual, var_itm = sq["dual"] / count, sq["itm"] / count
                for i in rows:
                    ratio[i] = math.sqrt(var_dual / var_itm) if var_itm > 1e-12 else 0.0
        z = [[-math.inf] * b for _ in range(b)]
        for i in range(b):
            cands = dict(heads[i])
            m_min = min(cands.values())
            for j in range(b):
                if block[j] == block[i]:
                    z[i][j] = dual(i, j) + beta * ratio[i] * cands.get(j, m_min) / itm_temperature
        out[key] = torch.tensor(z)
        if rank_by is not None:
            rank = []
            for i in range(b):
                score = {j: (m if rank_by == "itm" else z[i][j]) for j, m in heads[i]}
                ordered = sorted(range(len(heads[i])), key=lambda p: (-score[heads[i][p][0]], p))
                rank.append([heads[i][p][0] for p in ordered] + [PAD_IDX] * (k_prime or len(idx[i])))
            width = k_prime or len(idx[0])
            out[f"{name}_rank"] = torch.tensor([r[:width] for r in rank])
    return out


def assert_targets_equal(got, want):
    for key in (IMG_FEAT, TXT_FEAT, I2T_LOGITS, T2I_LOGITS):
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)


def run(ev, **kw):
    return mcad_targets(**ev, logit_scale=SCALE, **kw)


@pytest.mark.parametrize("alpha,beta,k_prime", [
    (0.5, 0.3, None), (0.5, 0.3, 2), (1.0, 2.0, 1), (0.0, 0.7, 3), (0.4, 0.0, None)])
def test_several_blocks_match_naive(alpha, beta, k_prime):
    # Block of 3 rows < K=4: those lists end in padding with -inf m.
    ev = make_signals((5, 4, 3), k=4, seed=1)
    got = run(ev, alpha=alpha, beta=beta, k_prime=k_prime)
    assert_targets_equal(got, naive_targets(ev, alpha=alpha, beta=beta, k_prime=k_prime))
    same = ev["block"][:, None] == ev["block"][None, :]
    for key in (I2T_LOGITS, T2I_LOGITS):
        assert torch.isfinite(got[key][same]).all()
        assert torch.isneginf(got[key][~same]).all()


def test_small_k_prime_forces_positives_in():
    ev = make_signals((6, 6), k=5, seed=2)
    forced = sum(i not in ev["i2t_idx"][i, :2].tolist() for i in range(12))
    assert forced > 0, "fixture should have rows whose positive lies beyond K'"
    got = run(ev, alpha=0.3, beta=1.5, k_prime=2)
    assert_targets_equal(got, naive_targets(ev, alpha=0.3, beta=1.5, k_prime=2))


def test_remix_one_block_ignores_candidates_missing_from_batch():
    ev = make_signals((10,), k=6, seed=3, drop=0.5)
    assert (ev["i2t_idx"] == PAD_IDX).any() and torch.isfinite(ev["i2t_itm"]).all()
    for k_prime in (None, 3):
        got = run(ev, alpha=0.2, beta=0.8, k_prime=k_prime)
        assert_targets_equal(got, naive_targets(ev, alpha=0.2, beta=0.8, k_prime=k_prime))


def test_hand_worked_row():
    # Row 0 (image 0): stored list texts [2, 1, 0] with m [5, 1, 3]; K'=2 keeps [2, 1],
    # the positive 0 replaces text 1, so C_0 = {2: 5, 0: 3}, and text 1 gets min = 3.
    eye = torch.eye(3)
    ev = {"img_emb": eye, "txt_emb": eye, "fused_proj": eye, "block": torch.zeros(3, dtype=torch.long),
          "i2t_idx": torch.tensor([[2, 1, 0], [1, 0, 2], [2, 0, 1]]),
          "i2t_itm": torch.tensor([[5.0, 1.0, 3.0], [0.0, 1.0, 2.0], [0.0, 0.0, 0.0]]),
          "t2i_idx": torch.tensor([[0, 1, 2], [1, 0, 2], [2, 0, 1]]),
          "t2i_itm": torch.zeros(3, 3)}
    got = run(ev, alpha=0.0, beta=0.5, k_prime=2)
    torch.testing.assert_close(got[I2T_LOGITS][0], torch.tensor([SCALE + 1.5, 1.5, 2.5]))
    # Row 1 keeps [1, 0] with m [0, 1] (positive first): m̃ = [1, 0, min(0, 1) = 0].
    torch.testing.assert_close(got[I2T_LOGITS][1], torch.tensor([0.5, SCALE, 0.0]))


def test_alpha_beta_zero_is_plain_dual_distillation():
    ev = make_signals((4, 5), seed=4)
    got = run(ev, alpha=0.0, beta=0.0)
    dual = SCALE * ev["img_emb"] @ ev["txt_emb"].T
    same = ev["block"][:, None] == ev["block"][None, :]
    torch.testing.assert_close(got[I2T_LOGITS][same], dual[same])
    torch.testing.assert_close(got[T2I_LOGITS][same], dual.T[same])
    torch.testing.assert_close(got[IMG_FEAT], ev["img_emb"])
    torch.testing.assert_close(got[TXT_FEAT], ev["txt_emb"])


def test_half_inputs_give_float32_targets_without_grad():
    ev = make_signals((4, 4), seed=5)
    ev = {**ev, **{key: ev[key].half().requires_grad_() for key in ("img_emb", "txt_emb", "fused_proj")}}
    got = run(ev, alpha=0.5, beta=0.5)
    for value in got.values():
        assert value.dtype == torch.float32 and not value.requires_grad


@pytest.mark.parametrize("kw", [
    {"alpha": -0.1, "beta": 0.0}, {"alpha": 0.0, "beta": -1.0}, {"alpha": math.nan, "beta": 0.0},
    {"alpha": 0.0, "beta": 0.0, "k_prime": 0}, {"alpha": 0.0, "beta": 0.0, "k_prime": 5}])
def test_bad_parameters_raise_input_error(kw):
    ev = make_signals((4,), k=4, seed=6)
    with pytest.raises(InputError):
        run(ev, **kw)


def test_missing_positive_is_refused():
    ev = make_signals((4,), k=2, seed=7)
    ev["t2i_idx"][2] = torch.tensor([PAD_IDX, PAD_IDX])
    with pytest.raises(InputError, match="t2i: row 2 lacks its positive"):
        run(ev, alpha=0.0, beta=1.0)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan])
def test_a_teacher_logit_scale_that_is_not_finite_and_positive_is_refused(scale):
    ev = make_signals((4,), k=4, seed=6)
    with pytest.raises(InputError, match="logit scale"):
        mcad_targets(**ev, logit_scale=scale, alpha=0.0, beta=0.0)


def test_the_edges_of_the_accepted_range_and_the_returned_keys():
    ev = make_signals((4,), k=4, seed=6)
    # K' = K (the default's value) and a scale below 1 are valid; the keys are what callers read.
    got = mcad_targets(**ev, logit_scale=0.5, alpha=0.5, beta=0.3, k_prime=4)
    assert set(got) == {"img_feat", "txt_feat", "i2t_logits", "t2i_logits"}
    assert_targets_equal(got, mcad_targets(**ev, logit_scale=0.5, alpha=0.5, beta=0.3))
    plain = mcad_targets(**ev, logit_scale=0.5, alpha=0.5, beta=0.0)[I2T_LOGITS]
    torch.testing.assert_close(plain, run(ev, alpha=0.5, beta=0.0)[I2T_LOGITS] * (0.5 / SCALE))


@pytest.mark.parametrize("bad", [4, -2])
def test_candidates_outside_the_batch_are_refused(bad):
    ev = make_signals((4,), k=4, seed=6)  # batch of 4: candidates 0..3 or PAD_IDX
    idx = ev["i2t_idx"].clone()
    col = 1 if idx[0, 0] == 0 else 0  # not the positive
    idx[0, col] = bad
    with pytest.raises(ValueError, match="batch-local"):
        run({**ev, "i2t_idx": idx}, alpha=0.0, beta=1.0)


def test_inputs_of_the_wrong_rank_or_width_are_refused():
    ev = make_signals((4,), k=4, seed=6)
    # (B, D, 1) features: the right number of rows, the wrong rank
    deep = {name: ev[name][..., None] for name in ("img_emb", "txt_emb", "fused_proj")}
    with pytest.raises(ValueError, match="need img_emb, txt_emb, fused_proj"):
        run({**ev, **deep}, alpha=0.5, beta=0.3)
    # t2i lists one candidate longer than i2t's K
    wider = {"t2i_idx": torch.cat([ev["t2i_idx"], ev["t2i_idx"][:, :1]], 1),
             "t2i_itm": torch.cat([ev["t2i_itm"], ev["t2i_itm"][:, :1]], 1)}
    with pytest.raises(ValueError, match=r"t2i: need idx and itm of shape \(4, 4\)"):
        run({**ev, **wider}, alpha=0.5, beta=0.3)


def test_beta_zero_never_reads_the_candidate_lists():
    # Dual-only distillation (beta = 0) needs no ITM signals: lists it would refuse are not read.
    ev = make_signals((4,), k=2, seed=7)
    ev["t2i_idx"][2] = torch.tensor([PAD_IDX, PAD_IDX])
    got = run(ev, alpha=0.0, beta=0.0)
    torch.testing.assert_close(got[I2T_LOGITS], SCALE * ev["img_emb"].float() @ ev["txt_emb"].float().T)


# ---------------------------------------------------------------- issue #18: ITM scale, rank lists

@pytest.mark.parametrize("itm_temperature,itm_norm", [(4.0, "none"), (0.5, "none"), (1.0, "pool"), (2.0, "pool")])
@pytest.mark.parametrize("k_prime", [None, 2])
def test_itm_scale_matches_naive(itm_temperature, itm_norm, k_prime):
    ev = make_signals((5, 4, 3), k=4, seed=11)
    kw = dict(alpha=0.5, beta=0.7, k_prime=k_prime, itm_temperature=itm_temperature, itm_norm=itm_norm)
    assert_targets_equal(run(ev, **kw), naive_targets(ev, **kw))


def test_itm_scale_pool_in_remix_and_the_defaults_keep_todays_targets():
    ev = make_signals((10,), k=6, seed=12, drop=0.5)
    kw = dict(alpha=0.2, beta=0.8, k_prime=3, itm_norm="pool")
    assert_targets_equal(run(ev, **kw), naive_targets(ev, **kw))
    # itm_temperature 1 and itm_norm "none" are the targets from before issue #18
    assert_targets_equal(run(ev, alpha=0.2, beta=0.8, itm_temperature=1.0, itm_norm="none"),
                         naive_targets(ev, alpha=0.2, beta=0.8))


def test_pool_norm_makes_beta_free_of_the_itm_logit_range():
    # The same ITM order at 10x the range: with "pool" the targets do not move; with "none" they do.
    ev = make_signals((6, 5), k=4, seed=13)
    wide = {**ev, "i2t_itm": ev["i2t_itm"] * 10, "t2i_itm": ev["t2i_itm"] * 10}
    kw = dict(alpha=0.5, beta=1.0)
    assert_targets_equal(run(wide, **kw, itm_norm="pool"), run(ev, **kw, itm_norm="pool"))
    assert not torch.allclose(run(wide, **kw)[I2T_LOGITS], run(ev, **kw)[I2T_LOGITS])
    # and a temperature of 10 undoes the range
    assert_targets_equal(run(wide, **kw, itm_temperature=10.0), run(ev, **kw))


def test_pool_norm_of_a_block_whose_itm_logits_are_all_equal_adds_nothing():
    ev = make_signals((4, 4), k=3, seed=14)
    flat = {**ev, "i2t_itm": torch.ones_like(ev["i2t_itm"]).masked_fill(torch.isneginf(ev["i2t_itm"]), -math.inf)}
    got = run(flat, alpha=0.0, beta=1.0, itm_norm="pool")
    same = ev["block"][:, None] == ev["block"][None, :]
    torch.testing.assert_close(got[I2T_LOGITS][same], (SCALE * ev["img_emb"] @ ev["txt_emb"].T)[same])


@pytest.mark.parametrize("rank_by", ["itm", "combined"])
@pytest.mark.parametrize("k_prime,drop", [(None, 0.0), (2, 0.0), (3, 0.5)])
def test_rank_lists_match_naive(rank_by, k_prime, drop):
    ev = make_signals((5, 4, 3) if not drop else (10,), k=4, seed=15, drop=drop)
    kw = dict(alpha=0.3, beta=0.6, k_prime=k_prime, rank_by=rank_by)
    got, want = run(ev, **kw), naive_targets(ev, **kw)
    assert_targets_equal(got, want)
    for name, key in (("i2t", I2T_RANK), ("t2i", T2I_RANK)):
        assert got[key].dtype == torch.int64
        assert got[key].tolist() == want[f"{name}_rank"].tolist(), name


def test_rank_lists_hand_worked_and_ties_keep_the_stored_order():
    eye = torch.eye(3)
    ev = {"img_emb": eye, "txt_emb": eye, "fused_proj": eye, "block": torch.zeros(3, dtype=torch.long),
          "i2t_idx": torch.tensor([[2, 1, 0], [1, 0, 2], [2, 0, 1]]),
          "i2t_itm": torch.tensor([[5.0, 1.0, 3.0], [0.0, 1.0, 2.0], [4.0, 4.0, 4.0]]),
          "t2i_idx": torch.tensor([[0, 1, 2], [1, 0, 2], [2, 0, 1]]),
          "t2i_itm": torch.zeros(3, 3)}
    got = run(ev, alpha=0.0, beta=0.0, rank_by="itm")
    # row 0 by m: text 2 (5), text 0 (3), text 1 (1); row 1: 2, 0, 1; row 2: all 4, stored order
    assert got[I2T_RANK].tolist() == [[2, 0, 1], [2, 0, 1], [2, 0, 1]]
    # K' = 2 with row 0's positive forced in: C'_0 = [2, 0]
    assert run(ev, alpha=0.0, beta=0.0, k_prime=2, rank_by="itm")[I2T_RANK][0].tolist() == [2, 0]
    # combined at beta 0 is the dual order (s·v·t: the positive first, the rest tied in stored order)
    assert run(ev, alpha=0.0, beta=0.0, rank_by="combined")[I2T_RANK].tolist() == [[0, 2, 1], [1, 0, 2], [2, 0, 1]]
    assert set(run(ev, alpha=0.0, beta=0.0)) == {IMG_FEAT, TXT_FEAT, I2T_LOGITS, T2I_LOGITS}


@pytest.mark.parametrize("kw", [{"itm_temperature": 0.0}, {"itm_temperature": math.inf},
                                {"itm_norm": "batch"}, {"rank_by": "dual"}])
def test_bad_itm_and_rank_parameters_raise_input_error(kw):
    ev = make_signals((4,), k=4, seed=6)
    with pytest.raises(InputError):
        run(ev, alpha=0.0, beta=0.5, **kw)
