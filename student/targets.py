"""MCAD targets from teacher signals (docs/design.md, section 3).

One pure function, `mcad_targets`, turns the teachers' signals for a student
batch into what the student distils: the modified teacher features v'_i, t'_i
(feature targets) and the modified teacher logits z (distribution targets),
both directions. The stored path (rows of the signal store) and the online
path (teachers run in the loop) hand in the same signals, so both call this;
α, β and K' are chosen here, at student time, never baked into the store.

    targets = mcad_targets(img_emb=v, txt_emb=t, fused_proj=g, i2t_idx=..., i2t_itm=...,
                           t2i_idx=..., t2i_itm=..., block=block, logit_scale=s,
                           alpha=0.5, beta=0.1, k_prime=16)
    targets[I2T_LOGITS]   # (B, B) float32, -inf outside each row's block

Issue #18 adds two optional parts: the scale of the ITM part of z
(`itm_temperature`, and `itm_norm="pool"`: m rescaled per pool block to the spread
of the dual logits, so β weighs the two teachers the same whatever their logit
ranges), and, with `rank_by`, each row's candidates in the teacher's order, the
targets of the ranking term (student/losses.rank_distillation).

Candidate indices arrive batch-local: 0..B-1, or PAD_IDX (-1) for list padding
and, in remix mode, for stored candidates that are not in this batch. Row i's
positive is column i (image i and text i share a row).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mcad.storage.errors import InputError
from mcad.storage.schema import PAD_IDX
from mcad.student.config import ITM_NORMS, RANK_TARGETS

# Keys of the dict `mcad_targets` returns (targets, not store columns).
IMG_FEAT = "img_feat"      # v'_i (B, D)
TXT_FEAT = "txt_feat"      # t'_i (B, D)
I2T_LOGITS = "i2t_logits"  # z (B, B): row i = image i over texts j
T2I_LOGITS = "t2i_logits"  # (B, B): row i = text i over images j
I2T_RANK = "i2t_rank"      # (B, K') image i's candidate texts in the teacher's order (with rank_by)
T2I_RANK = "t2i_rank"      # (B, K') text i's candidate images in the teacher's order (with rank_by)


def _check_params(alpha: float, beta: float, logit_scale: float, k_prime: int | None, k: int) -> None:
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise InputError(f"alpha must be a finite number >= 0, got {alpha}")
    if not (beta >= 0 and math.isfinite(beta)):
        raise InputError(f"beta must be a finite number >= 0, got {beta}")
    if not (logit_scale > 0 and math.isfinite(logit_scale)):
        raise InputError(f"the teacher logit scale must be finite and > 0, got {logit_scale}")
    if k_prime is not None and not 1 <= k_prime <= k:
        raise InputError(f"K' must be between 1 and the store's K ({k}), got {k_prime}")


def _check_itm_params(itm_temperature: float, itm_norm: str, rank_by: str | None) -> None:
    if not (itm_temperature > 0 and math.isfinite(itm_temperature)):
        raise InputError(f"the ITM temperature must be a finite number > 0, got {itm_temperature}")
    if itm_norm not in ITM_NORMS:
        raise InputError(f"itm_norm must be one of {ITM_NORMS}, got {itm_norm!r}")
    if rank_by is not None and rank_by not in RANK_TARGETS:
        raise InputError(f"rank_by must be None or one of {RANK_TARGETS}, got {rank_by!r}")


def _head(idx: torch.Tensor, itm: torch.Tensor, *, block: torch.Tensor, k_prime: int,
          name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """C'_i of every row: (head_idx, head_m, cand), each (B, K').

    idx (B, K) batch-local candidates, highest dual logit first; itm (B, K) their m.
    C_i = the first k_prime entries, positive (i) forced into the last of them when
    absent, PAD_IDX entries dropped (cand False there); an entry's itm is read only where
    it is a candidate, so padding's -inf (or a finite m of a candidate missing from the
    batch) never counts.
    """
    b = idx.shape[0]
    rows = torch.arange(b, device=idx.device)
    is_pos = idx == rows[:, None]
    if not bool(is_pos.any(dim=1).all()):
        bad = int((~is_pos.any(dim=1)).nonzero()[0])
        raise InputError(f"{name}: row {bad} lacks its positive among its candidates "
                         "(the store or signal source breaks schema v1)")
    # The first occurrence of the positive gives its m, known wherever it sits in the list.
    pos_m = itm.gather(1, is_pos.int().argmax(dim=1, keepdim=True)).squeeze(1)
    head_idx, head_m = idx[:, :k_prime].clone(), itm[:, :k_prime].clone()
    missing = ~is_pos[:, :k_prime].any(dim=1)
    head_idx[missing, k_prime - 1] = rows[missing]
    head_m[missing, k_prime - 1] = pos_m[missing]

    cand = head_idx != PAD_IDX
    if bool((head_idx[cand] < 0).any() or (head_idx[cand] >= b).any()):
        raise ValueError(f"{name}: candidate indices must be batch-local (0..{b - 1}) or {PAD_IDX}")
    if not bool(torch.isfinite(head_m[cand]).all()):
        raise InputError(f"{name}: a candidate's ITM logit is not finite (corrupt signals)")
    q_rows = rows[:, None].expand_as(head_idx)[cand]
    if not bool((block[q_rows] == block[head_idx[cand]]).all()):
        raise ValueError(f"{name}: a candidate lies outside its row's pool block")
    return head_idx, head_m, cand


def _itm_dense(head_idx: torch.Tensor, head_m: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """m̃ (B, B): m_ij for j in C'_i, else min over C'_i of m (block masking is the caller's)."""
    b = head_idx.shape[0]
    rows = torch.arange(b, device=head_idx.device)
    # Non-candidates take +inf so amin sees only C'_i (never empty: the positive is in it).
    m_min = head_m.masked_fill(~cand, float("inf")).amin(dim=1)
    dense = m_min[:, None].expand(b, b).clone()
    dense[rows[:, None].expand_as(head_idx)[cand], head_idx[cand]] = head_m[cand]
    return dense


def _pool_spread_ratio(dual_rows: torch.Tensor, head_idx: torch.Tensor, head_m: torch.Tensor,
                       cand: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """(B,) per row, its block's σ_dual / σ_itm over the candidate entries (0 where σ_itm ≈ 0).

    σ² of a block is the pooled within-row variance: the squared deviations of the
    candidates' values from their row's mean, summed over the block's rows and divided
    by its candidate count. Within-row, because a constant per row does not change a
    row's softmax; over the block, so one pool shares one scale. dual_rows (B, B) holds
    the dual part of the target in the rows' direction, read at the same candidates.
    """
    n = cand.sum(dim=1).clamp(min=1).to(dual_rows.dtype)
    spreads = []
    for values in (dual_rows.gather(1, head_idx.clamp(min=0)), head_m):
        values = values.masked_fill(~cand, 0.0)
        dev = ((values - values.sum(dim=1, keepdim=True) / n[:, None]) ** 2).masked_fill(~cand, 0.0)
        spreads.append(dev.sum(dim=1))
    groups, inverse = torch.unique(block, return_inverse=True)
    count = torch.zeros(len(groups), dtype=n.dtype, device=n.device).index_add_(0, inverse, cand.sum(1).to(n.dtype))
    var_dual, var_itm = (torch.zeros_like(count).index_add_(0, inverse, s) / count for s in spreads)
    ratio = torch.where(var_itm > 1e-12, (var_dual / var_itm.clamp(min=1e-12)).sqrt(), torch.zeros_like(var_itm))
    return ratio[inverse]


def _rank_list(head_idx: torch.Tensor, score: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """(B, K') row i's candidates C'_i, highest `score` first, PAD_IDX after them.

    Ties keep the stored (dual) order: the sort is stable over the stored list.
    """
    order = torch.sort(score.masked_fill(~cand, float("-inf")), dim=1, descending=True, stable=True).indices
    ranked = head_idx.gather(1, order)
    return ranked.masked_fill(~cand.gather(1, order), PAD_IDX)


@torch.no_grad()
def mcad_targets(
    *,
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    fused_proj: torch.Tensor,
    i2t_idx: torch.Tensor,
    i2t_itm: torch.Tensor,
    t2i_idx: torch.Tensor,
    t2i_itm: torch.Tensor,
    block: torch.Tensor,
    logit_scale: float,
    alpha: float,
    beta: float,
    k_prime: int | None = None,
    itm_temperature: float = 1.0,
    itm_norm: str = "none",
    rank_by: str | None = None,
) -> dict[str, torch.Tensor]:
    """MCAD feature and distribution targets of one student batch (no grad, float32).

    Shapes: B rows, D dual width, K stored candidates per row and direction.
      img_emb, txt_emb, fused_proj  (B, D)  v_i, t_i, g_i (unit; float16 is fine)
      i2t_idx, t2i_idx              (B, K)  int, batch-local candidate positions or PAD_IDX
      i2t_itm, t2i_itm              (B, K)  m of those candidates (-inf at padding)
      block                         (B,)    int, pool block id (one id for the whole batch in remix)
      logit_scale                   s, the dual teacher's logit scale (already exp'd)
      alpha, beta >= 0; k_prime     K' in 1..K (None: K)
      itm_temperature > 0, itm_norm the ITM part's scale: β·c_b·m̃/itm_temperature, with
                                    c_b = 1 ("none") or, "pool", block b's σ_dual/σ_itm over
                                    the candidates (`_pool_spread_ratio`)
      rank_by                       None, "itm" or "combined": also return each row's C'_i in
                                    that teacher's order (the ranking term's targets)

    Returns, on img_emb's device, all float32:
      IMG_FEAT (B, D)  v'_i = normalise(v_i + α g_i)
      TXT_FEAT (B, D)  t'_i = normalise(t_i + α g_i)
      I2T_LOGITS (B, B)  z_ij = s·v'_i·t'_j + β·c_b·m̃_ij/τ_m, image i over texts j
      T2I_LOGITS (B, B)  the same from the t2i lists, text i over images j
    with -inf wherever block[i] != block[j], so a row's softmax stays in its block.
    With rank_by, also I2T_RANK, T2I_RANK (B, K') int64: C'_i (the m̃ rule's K' candidates,
    positive included, in the batch) sorted by m ("itm") or by z ("combined"), highest
    first, ties in stored order, PAD_IDX after them.
    α = β = 0 gives plain dual-teacher distillation, z = s·v·t.
    """
    device = img_emb.device
    v, t, g = (torch.as_tensor(x, device=device).float() for x in (img_emb, txt_emb, fused_proj))
    block = torch.as_tensor(block, device=device)
    b = v.shape[0]
    signals = {"i2t": (torch.as_tensor(i2t_idx, device=device).long(),
                        torch.as_tensor(i2t_itm, device=device).float()),
               "t2i": (torch.as_tensor(t2i_idx, device=device).long(),
                        torch.as_tensor(t2i_itm, device=device).float())}
    if v.ndim != 2 or t.shape != v.shape or g.shape != v.shape or block.shape != (b,):
        raise ValueError(f"need img_emb, txt_emb, fused_proj (B, D) and block (B,), got "
                         f"{tuple(v.shape)}, {tuple(t.shape)}, {tuple(g.shape)}, {tuple(block.shape)}")
    k = signals["i2t"][0].shape[-1]
    for name, (idx, itm) in signals.items():
        if idx.ndim != 2 or idx.shape != (b, k) or itm.shape != idx.shape:
            raise ValueError(f"{name}: need idx and itm of shape ({b}, {k}), "
                             f"got {tuple(idx.shape)} and {tuple(itm.shape)}")
    _check_params(alpha, beta, logit_scale, k_prime, k)
    _check_itm_params(itm_temperature, itm_norm, rank_by)

    v_mod = F.normalize(v + alpha * g, dim=-1)
    t_mod = F.normalize(t + alpha * g, dim=-1)
    dual = logit_scale * (v_mod @ t_mod.T)  # rows images, columns texts
    logits = {"i2t": dual, "t2i": dual.T.clone()}
    heads = {}
    if beta > 0 or rank_by is not None:
        heads = {name: _head(idx, itm, block=block, k_prime=k_prime or k, name=name)
                 for name, (idx, itm) in signals.items()}
    if beta > 0:
        for name, head in heads.items():
            scale = beta / itm_temperature
            if itm_norm == "pool":
                scale = scale * _pool_spread_ratio(logits[name], *head, block=block)[:, None]
            logits[name] = logits[name] + scale * _itm_dense(*head)
    outside = block[:, None] != block[None, :]
    out = {
        IMG_FEAT: v_mod,
        TXT_FEAT: t_mod,
        I2T_LOGITS: logits["i2t"].masked_fill(outside, float("-inf")),
        T2I_LOGITS: logits["t2i"].masked_fill(outside, float("-inf")),
    }
    if rank_by is not None:
        for name, key in (("i2t", I2T_RANK), ("t2i", T2I_RANK)):
            head_idx, head_m, cand = heads[name]
            score = head_m if rank_by == "itm" else logits[name].gather(1, head_idx.clamp(min=0))
            out[key] = _rank_list(head_idx, score, cand)
    return out
