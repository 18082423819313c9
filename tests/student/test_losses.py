"""Student losses against naive loop references, gradcheck, and the weighting of mcad_loss."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mcad.storage.errors import InputError
from mcad.student.config import LossWeights
from mcad.storage.schema import PAD_IDX
from mcad.student.losses import (
    distribution_kl, feature_loss, info_nce, mcad_loss, metrics_to_floats, rank_distillation,
)
from mcad.student.targets import I2T_LOGITS, I2T_RANK, IMG_FEAT, T2I_LOGITS, T2I_RANK, TXT_FEAT, mcad_targets


def _unit(gen, n, d, dtype=torch.float32):
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    return x / x.norm(dim=1, keepdim=True)


def _student(seed, b=6, d=4, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return _unit(gen, b, d, dtype), _unit(gen, b, d, dtype), torch.tensor(5.0, dtype=dtype)


def _teacher(seed, block, dtype=torch.float32):
    """(B, B) random teacher logits, -inf across blocks, both directions."""
    gen = torch.Generator().manual_seed(seed)
    b = len(block)
    outside = block[:, None] != block[None, :]
    return [(torch.randn(b, b, generator=gen, dtype=dtype) * 3).masked_fill(outside, -math.inf)
            for _ in range(2)]


BLOCK = torch.tensor([0, 1, 0, 2, 1, 0])


# ---------------------------------------------------------------- naive references

def naive_info_nce(u, w, s):
    u, w, s, b = u.tolist(), w.tolist(), float(s), len(u)
    logit = [[s * sum(x * y for x, y in zip(u[i], w[j])) for j in range(b)] for i in range(b)]
    i2t = sum(-logit[i][i] + math.log(sum(math.exp(logit[i][j]) for j in range(b))) for i in range(b)) / b
    t2i = sum(-logit[i][i] + math.log(sum(math.exp(logit[j][i]) for j in range(b))) for i in range(b)) / b
    return (i2t + t2i) / 2


def naive_kl(u, w, s, i2t, t2i, temperature=1.0):
    """Loops over rows; within a row only the teacher's finite columns; T²·sum p·log(p/q) at T."""
    u, w, s, b = u.tolist(), w.tolist(), float(s), len(u)
    total = []
    for query, cand, teacher in ((u, w, i2t.tolist()), (w, u, t2i.tolist())):
        row_kls = []
        for i in range(b):
            cols = [j for j in range(b) if teacher[i][j] != -math.inf]
            zt = {j: teacher[i][j] / temperature for j in cols}
            zs = {j: s * sum(x * y for x, y in zip(query[i], cand[j])) / temperature for j in cols}
            nt = sum(math.exp(z) for z in zt.values())
            ns = sum(math.exp(z) for z in zs.values())
            kl = 0.0
            for j in cols:
                p, q = math.exp(zt[j]) / nt, math.exp(zs[j]) / ns
                if p > 0:
                    kl += p * math.log(p / q)
            row_kls.append(kl * temperature ** 2)
        total.append(sum(row_kls) / b)
    return sum(total) / 2


def naive_feature(hv, ht, vf, tf):
    def one_minus_cos(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return 1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
    rows = list(zip(hv.tolist(), ht.tolist(), vf.tolist(), tf.tolist()))
    img = sum(one_minus_cos(a, c) for a, _, c, _ in rows) / len(rows)
    txt = sum(one_minus_cos(b, d) for _, b, _, d in rows) / len(rows)
    return (img + txt) / 2


def naive_listmle(u, w, s, i2t_rank, t2i_rank):
    """Plackett–Luce by the book: per row, the mean over steps k < n-1 of
    -log(exp(S_k) / sum_{j >= k} exp(S_j)); rows with under two candidates left out."""
    u, w, s = u.tolist(), w.tolist(), float(s)
    out = []
    for query, cand, ranks in ((u, w, i2t_rank.tolist()), (w, u, t2i_rank.tolist())):
        rows = []
        for i, order in enumerate(ranks):
            order = [j for j in order if j != PAD_IDX]
            if len(order) < 2:
                continue
            sc = [s * sum(x * y for x, y in zip(query[i], cand[j])) for j in order]
            steps = [-sc[k] + math.log(sum(math.exp(x) for x in sc[k:])) for k in range(len(sc) - 1)]
            rows.append(sum(steps) / len(steps))
        out.append(sum(rows) / len(rows) if rows else 0.0)
    return sum(out) / 2


def _ranks(seed, b=6, width=4, pad_rows=(1,)):
    """Random rank lists: each row i its positive plus other columns, best first; padded rows."""
    gen = torch.Generator().manual_seed(seed)
    lists = []
    for i in range(b):
        others = [j for j in torch.randperm(b, generator=gen).tolist() if j != i]
        n = 2 if i in pad_rows else width
        row = ([i] + others)[:n]
        row = [row[p] for p in torch.randperm(n, generator=gen).tolist()]
        lists.append(row + [PAD_IDX] * (width - n))
    return torch.tensor(lists)


# ---------------------------------------------------------------- values

def test_info_nce_matches_naive():
    u, w, s = _student(0)
    loss, metrics = info_nce(image=u, text=w, logit_scale=s)
    assert loss.item() == pytest.approx(naive_info_nce(u, w, s), rel=1e-5)
    assert metrics["con"].item() == pytest.approx(loss.item())
    assert 0 <= metrics["con_acc_i2t"].item() <= 1 and metrics["logit_scale"].item() == 5.0


@pytest.mark.parametrize("temperature", [1.0, 4.0, 0.5])
def test_distribution_kl_matches_naive_per_block(temperature):
    u, w, s = _student(1)
    i2t, t2i = _teacher(2, BLOCK)
    loss, metrics = distribution_kl(image=u, text=w, logit_scale=s, i2t_logits=i2t, t2i_logits=t2i,
                                    temperature=temperature)
    assert loss.item() == pytest.approx(naive_kl(u, w, s, i2t, t2i, temperature), rel=1e-5)
    assert metrics["dist"].item() == pytest.approx(((metrics["dist_i2t"] + metrics["dist_t2i"]) / 2).item())


def test_distribution_kl_is_finite_when_teacher_mass_underflows():
    # A finite teacher logit so low its probability is exactly 0: 0·log 0 counts as 0.
    u, w, s = _student(3, dtype=torch.float64)
    i2t, t2i = _teacher(4, BLOCK, dtype=torch.float64)
    i2t[0, 2] = -1e4
    u.requires_grad_()
    loss, _ = distribution_kl(image=u, text=w, logit_scale=s, i2t_logits=i2t, t2i_logits=t2i)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(u.grad).all()
    assert loss.item() == pytest.approx(naive_kl(u, w, s, i2t, t2i), rel=1e-9)


def test_distribution_kl_refuses_a_non_positive_temperature():
    u, w, s = _student(1)
    i2t, t2i = _teacher(2, BLOCK)
    with pytest.raises(InputError, match="temperature"):
        distribution_kl(image=u, text=w, logit_scale=s, i2t_logits=i2t, t2i_logits=t2i, temperature=0.0)


def test_distribution_kl_is_zero_when_student_equals_teacher():
    u, w, s = _student(5)
    outside = BLOCK[:, None] != BLOCK[None, :]
    same = (s * u @ w.T).masked_fill(outside, -math.inf)
    loss, _ = distribution_kl(image=u, text=w, logit_scale=s, i2t_logits=same,
                              t2i_logits=(s * w @ u.T).masked_fill(outside.T, -math.inf))
    assert abs(loss.item()) < 1e-6
    # A shift per row leaves the distribution unchanged.
    loss, _ = distribution_kl(image=u, text=w, logit_scale=s, i2t_logits=same + 3.0,
                              t2i_logits=same.T - 2.0)
    assert abs(loss.item()) < 1e-6


def test_feature_loss_matches_naive():
    gen = torch.Generator().manual_seed(6)
    hv, ht = torch.randn(5, 4, generator=gen) * 2, torch.randn(5, 4, generator=gen)
    vf, tf = _unit(gen, 5, 4), _unit(gen, 5, 4)
    loss, metrics = feature_loss(image_proj=hv, text_proj=ht, img_feat=vf, txt_feat=tf)
    assert loss.item() == pytest.approx(naive_feature(hv, ht, vf, tf), rel=1e-5)
    same, _ = feature_loss(image_proj=3 * vf, text_proj=tf, img_feat=vf, txt_feat=tf)
    assert abs(same.item()) < 1e-6


# ---------------------------------------------------------------- gradients

def test_gradcheck_info_nce():
    u, w, s = _student(7, b=4, d=3, dtype=torch.float64)
    args = tuple(x.clone().requires_grad_() for x in (u, w, s))
    assert torch.autograd.gradcheck(
        lambda a, b, c: info_nce(image=a, text=b, logit_scale=c)[0], args)


def test_gradcheck_distribution_kl_with_blocks():
    block = torch.tensor([0, 1, 0, 1, 1])
    u, w, s = _student(8, b=5, d=3, dtype=torch.float64)
    i2t, t2i = _teacher(9, block, dtype=torch.float64)
    args = tuple(x.clone().requires_grad_() for x in (u, w, s))
    assert torch.autograd.gradcheck(
        lambda a, b, c: distribution_kl(image=a, text=b, logit_scale=c,
                                        i2t_logits=i2t, t2i_logits=t2i, temperature=3.0)[0], args)


def test_gradcheck_feature_loss():
    gen = torch.Generator().manual_seed(10)
    hv, ht = (torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    vf, tf = _unit(gen, 4, 3, torch.float64), _unit(gen, 4, 3, torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: feature_loss(image_proj=a, text_proj=b, img_feat=vf, txt_feat=tf)[0], (hv, ht))


# ---------------------------------------------------------------- mcad_loss

def _batch(seed):
    gen = torch.Generator().manual_seed(seed)
    u, w, s = _student(seed)
    hv, ht = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    i2t, t2i = _teacher(seed + 1, BLOCK)
    targets = {I2T_LOGITS: i2t, T2I_LOGITS: t2i, IMG_FEAT: _unit(gen, 6, 4), TXT_FEAT: _unit(gen, 6, 4)}
    return dict(image=u, text=w, logit_scale=s, targets=targets, image_proj=hv, text_proj=ht)


def test_mcad_loss_is_the_weighted_sum():
    batch = _batch(11)
    loss, metrics = mcad_loss(weights=LossWeights(con=0.5, dist=2.0, feat=0.25), **batch)
    con = naive_info_nce(batch["image"], batch["text"], batch["logit_scale"])
    dist = naive_kl(batch["image"], batch["text"], batch["logit_scale"],
                    batch["targets"][I2T_LOGITS], batch["targets"][T2I_LOGITS])
    feat = naive_feature(batch["image_proj"], batch["text_proj"],
                         batch["targets"][IMG_FEAT], batch["targets"][TXT_FEAT])
    assert loss.item() == pytest.approx(0.5 * con + 2.0 * dist + 0.25 * feat, rel=1e-5)
    assert metrics["loss"].item() == pytest.approx(loss.item())
    assert {"con", "dist", "feat"} <= metrics.keys()


def test_metrics_are_detached_tensors_until_logged():
    # Reading a metric waits for the device: the loss leaves that to the loop's logging steps.
    batch = _batch(11)
    scale = batch["logit_scale"].clone().requires_grad_()
    loss, metrics = mcad_loss(weights=LossWeights(), **{**batch, "logit_scale": scale})
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in metrics.values())
    with torch.no_grad():
        scale += 1.0  # an optimiser step on the scale must not change what was measured
    values = metrics_to_floats(metrics)
    assert values["logit_scale"] == 5.0 and values["loss"] == loss.item()
    assert all(type(v) is float for v in values.values())


def test_mcad_loss_skips_zero_weight_terms():
    batch = _batch(12)
    # No targets and no heads at all: only InfoNCE may be computed.
    loss, metrics = mcad_loss(weights=LossWeights(con=1.0, dist=0.0, feat=0.0),
                              image=batch["image"], text=batch["text"], logit_scale=batch["logit_scale"])
    assert "dist" not in metrics and "feat" not in metrics
    assert loss.item() == pytest.approx(metrics["con"].item())
    loss, metrics = mcad_loss(weights=LossWeights(con=0.0, dist=1.0, feat=0.0),
                              **{**batch, "image_proj": None, "text_proj": None})
    assert set(metrics) == {"dist", "dist_i2t", "dist_t2i", "loss"}
    with pytest.raises(ValueError, match="targets"):
        mcad_loss(weights=LossWeights(), image=batch["image"], text=batch["text"],
                  logit_scale=batch["logit_scale"])


@pytest.mark.parametrize("kw", [{"con": -1.0}, {"dist": math.nan}, {"feat": math.inf},
                                {"con": 0.0, "dist": 0.0, "feat": 0.0}, {"dist": "1"}])
def test_loss_weights_refuse_bad_values(kw):
    with pytest.raises(InputError):
        LossWeights(**kw)


def test_loss_weights_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LossWeights().con = 2.0


def test_targets_to_loss_end_to_end_gradients_are_finite():
    # Stored-signal shape of a replay batch of two pools, through both functions.
    gen = torch.Generator().manual_seed(13)
    block = torch.tensor([0, 0, 0, 1, 1])
    v, t, g = (_unit(gen, 5, 4) for _ in range(3))
    idx = torch.tensor([[0, 1, -1], [1, 2, 0], [2, 0, 1], [3, 4, -1], [4, 3, -1]])
    itm = torch.randn(5, 3, generator=gen).masked_fill(idx == -1, -math.inf)
    targets = mcad_targets(img_emb=v.half(), txt_emb=t.half(), fused_proj=g.half(), i2t_idx=idx,
                           i2t_itm=itm, t2i_idx=idx, t2i_itm=itm, block=block, logit_scale=10.0,
                           alpha=0.5, beta=0.5, k_prime=2)
    u, w = (_unit(gen, 5, 4).requires_grad_() for _ in range(2))
    scale = torch.tensor(3.0, requires_grad=True)
    loss, metrics = mcad_loss(weights=LossWeights(), image=u, text=w, logit_scale=scale,
                              targets=targets, image_proj=u * 2, text_proj=w * 2)
    loss.backward()
    assert all(math.isfinite(x) for x in metrics_to_floats(metrics).values())
    assert all(torch.isfinite(x.grad).all() for x in (u, w, scale))


def test_contrastive_accuracies_count_each_direction():
    # logits = image @ text.T with image = I: rows 0, 1 pick their own text, row 2 picks text 0;
    # every column (text) picks its own image.
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [4.0, 0.0, 1.0]])
    _, metrics = info_nce(image=torch.eye(3), text=logits.T.contiguous(), logit_scale=torch.tensor(1.0))
    assert set(metrics) == {"con", "con_acc_i2t", "con_acc_t2i", "logit_scale"}
    assert metrics["con_acc_i2t"].item() == pytest.approx(2 / 3)
    assert metrics["con_acc_t2i"].item() == 1.0


def test_half_precision_inputs_are_scored_in_float32():
    u, w, s = _student(5, dtype=torch.float16)
    loss, _ = info_nce(image=u, text=w, logit_scale=s)
    assert loss.dtype == torch.float32
    loss, metrics = feature_loss(image_proj=u, text_proj=w, img_feat=w, txt_feat=u)
    assert loss.dtype == torch.float32
    assert set(metrics) == {"feat", "feat_img", "feat_txt"}
    assert metrics["feat_img"].item() == metrics["feat_txt"].item() > 0  # the same pairs, swapped


def test_mcad_loss_asks_for_what_each_weighted_term_needs():
    batch = _batch(13)
    bare = dict(image=batch["image"], text=batch["text"], logit_scale=batch["logit_scale"])
    with pytest.raises(ValueError, match="targets"):
        mcad_loss(weights=LossWeights(con=1.0, dist=0.5, feat=0.0), **bare)
    with pytest.raises(ValueError, match="targets"):
        mcad_loss(weights=LossWeights(con=1.0, dist=0.0, feat=0.5), **bare)
    for proj in ({"image_proj": None}, {"text_proj": None}):
        with pytest.raises(ValueError, match="image_proj and text_proj"):
            mcad_loss(weights=LossWeights(con=0.0, dist=0.0, feat=0.5), **{**batch, **proj})


# ---------------------------------------------------------------- ranking distillation (issue #18)

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_distillation_matches_naive(seed):
    u, w, s = _student(seed + 20)
    i2t, t2i = _ranks(seed, pad_rows=(1, 4)), _ranks(seed + 100, pad_rows=())
    i2t[3] = torch.tensor([3, PAD_IDX, PAD_IDX, PAD_IDX])  # one candidate: no order, left out
    loss, metrics = rank_distillation(image=u, text=w, logit_scale=s, i2t_rank=i2t, t2i_rank=t2i)
    assert loss.item() == pytest.approx(naive_listmle(u, w, s, i2t, t2i), rel=1e-5)
    assert metrics["rank"].item() == pytest.approx(((metrics["rank_i2t"] + metrics["rank_t2i"]) / 2).item())


def test_rank_distillation_falls_as_the_student_follows_the_order():
    # Every image scores text j as s·c_j, c falling with j: in the teacher's order the loss falls
    # towards 0 as the scale grows; against it the loss is larger. Only the order is a target.
    c = torch.tensor([1.0, 0.6, 0.3, 0.0])
    text = torch.stack([c, (1 - c ** 2).sqrt(), torch.zeros(4), torch.zeros(4)], dim=1)
    image = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(4, 4)
    order = torch.tensor([[0, 1, 2, 3]] * 4)

    def rank_i2t(scale, rank):
        return rank_distillation(image=image, text=text, logit_scale=torch.tensor(scale), i2t_rank=rank,
                                 t2i_rank=order)[1]["rank_i2t"].item()

    losses = [rank_i2t(sc, order) for sc in (1.0, 10.0, 100.0)]
    assert losses[0] > losses[1] > losses[2] >= 0 and losses[2] < 1e-3
    assert rank_i2t(10.0, order.flip(1)) > losses[0]


def test_rank_distillation_of_single_candidate_lists_is_zero_with_a_gradient():
    u, w, s = _student(30)
    u.requires_grad_()
    lone = torch.arange(6)[:, None]
    loss, metrics = rank_distillation(image=u, text=w, logit_scale=s, i2t_rank=lone, t2i_rank=lone)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(u.grad, torch.zeros_like(u))


def test_gradcheck_rank_distillation_with_padding():
    u, w, s = _student(31, b=5, d=3, dtype=torch.float64)
    i2t, t2i = _ranks(3, b=5, width=3, pad_rows=(0, 2)), _ranks(4, b=5, width=3, pad_rows=(4,))
    args = tuple(x.clone().requires_grad_() for x in (u, w, s))
    assert torch.autograd.gradcheck(
        lambda a, b, c: rank_distillation(image=a, text=b, logit_scale=c, i2t_rank=i2t, t2i_rank=t2i)[0], args)


def test_mcad_loss_adds_the_weighted_rank_term_from_the_targets():
    # Targets made with rank_by: the rank lists reach the loss; without them a rank weight is refused.
    gen = torch.Generator().manual_seed(32)
    block = torch.tensor([0, 0, 0, 1, 1])
    v, t, g = (_unit(gen, 5, 4) for _ in range(3))
    idx = torch.tensor([[0, 1, 2], [1, 2, 0], [2, 0, 1], [3, 4, -1], [4, 3, -1]])
    itm = torch.randn(5, 3, generator=gen).masked_fill(idx == -1, -math.inf)
    signals = dict(img_emb=v, txt_emb=t, fused_proj=g, i2t_idx=idx, i2t_itm=itm, t2i_idx=idx, t2i_itm=itm,
                   block=block, logit_scale=10.0, alpha=0.5, beta=0.5)
    targets = mcad_targets(**signals, rank_by="itm")
    u, w = (_unit(gen, 5, 4).requires_grad_() for _ in range(2))
    scale = torch.tensor(3.0, requires_grad=True)
    weights = LossWeights(con=1.0, dist=0.5, feat=0.0, rank=2.0)
    loss, metrics = mcad_loss(weights=weights, image=u, text=w, logit_scale=scale, targets=targets)
    rank = naive_listmle(u.detach(), w.detach(), 3.0, targets[I2T_RANK], targets[T2I_RANK])
    con = naive_info_nce(u.detach(), w.detach(), 3.0)
    dist = naive_kl(u.detach(), w.detach(), 3.0, targets[I2T_LOGITS], targets[T2I_LOGITS])
    assert loss.item() == pytest.approx(con + 0.5 * dist + 2.0 * rank, rel=1e-5)
    assert {"rank", "rank_i2t", "rank_t2i"} <= metrics.keys()
    loss.backward()
    assert all(torch.isfinite(x.grad).all() for x in (u, w, scale))
    with pytest.raises(ValueError, match="rank lists"):
        mcad_loss(weights=weights, image=u, text=w, logit_scale=scale, targets=mcad_targets(**signals))
    with pytest.raises(ValueError, match="targets"):
        mcad_loss(weights=LossWeights(con=0.0, dist=0.0, feat=0.0, rank=1.0), image=u, text=w, logit_scale=scale)
    assert LossWeights().rank == 0.0
    with pytest.raises(InputError):
        LossWeights(rank=-1.0)
