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

# Keys of the dict `mcad_targets` returns (targets, not store columns).
IMG_FEAT = "img_feat"      # v'_i (B, D)
TXT_FEAT = "txt_feat"      # t'_i (B, D)
I2T_LOGITS = "i2t_logits"  # z (B, B): row i = image i over texts j
T2I_LOGITS = "t2i_logits"  # (B, B): row i = text i over images j


def _check_params(alpha: float, beta: float, logit_scale: float, k_prime: int | None, k: int) -> None:
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise InputError(f"alpha must be a finite number >= 0, got {alpha}")
    if not (beta >= 0 and math.isfinite(beta)):
        raise InputError(f"beta must be a finite number >= 0, got {beta}")
    if not (logit_scale > 0 and math.isfinite(logit_scale)):
        raise InputError(f"the teacher logit scale must be finite and > 0, got {logit_scale}")
    if k_prime is not None and not 1 <= k_prime <= k:
        raise InputError(f"K' must be between 1 and the store's K ({k}), got {k_prime}")


def _itm_dense(idx: torch.Tensor, itm: torch.Tensor, *, block: torch.Tensor, k_prime: int,
               name: str) -> torch.Tensor:
    """m̃ (B, B): m_ij for j in C_i, else min over C_i of m (block masking is the caller's).

    idx (B, K) batch-local candidates, highest dual logit first; itm (B, K) their m.
    C_i = the first k_prime entries, positive (i) forced into the last of them when
    absent, PAD_IDX entries dropped; an entry's itm is read only where it is a candidate,
    so padding's -inf (or a finite m of a candidate missing from the batch) never counts.
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
    q_rows = rows[:, None].expand_as(head_idx)[cand]
    q_cols = head_idx[cand]
    if not bool(torch.isfinite(head_m[cand]).all()):
        raise InputError(f"{name}: a candidate's ITM logit is not finite (corrupt signals)")
    if not bool((block[q_rows] == block[q_cols]).all()):
        raise ValueError(f"{name}: a candidate lies outside its row's pool block")

    # Non-candidates take +inf so amin sees only C_i (never empty: the positive is in it).
    m_min = head_m.masked_fill(~cand, float("inf")).amin(dim=1)
    dense = m_min[:, None].expand(b, b).clone()
    dense[q_rows, q_cols] = head_m[cand]
    return dense


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
) -> dict[str, torch.Tensor]:
    """MCAD feature and distribution targets of one student batch (no grad, float32).

    Shapes: B rows, D dual width, K stored candidates per row and direction.
      img_emb, txt_emb, fused_proj  (B, D)  v_i, t_i, g_i (unit; float16 is fine)
      i2t_idx, t2i_idx              (B, K)  int, batch-local candidate positions or PAD_IDX
      i2t_itm, t2i_itm              (B, K)  m of those candidates (-inf at padding)
      block                         (B,)    int, pool block id (one id for the whole batch in remix)
      logit_scale                   s, the dual teacher's logit scale (already exp'd)
      alpha, beta >= 0; k_prime     K' in 1..K (None: K)

    Returns, on img_emb's device, all float32:
      IMG_FEAT (B, D)  v'_i = normalise(v_i + α g_i)
      TXT_FEAT (B, D)  t'_i = normalise(t_i + α g_i)
      I2T_LOGITS (B, B)  z_ij = s·v'_i·t'_j + β·m̃_ij, image i over texts j
      T2I_LOGITS (B, B)  s·t'_i·v'_j + β·m̃_ij from the t2i lists, text i over images j
    with -inf wherever block[i] != block[j], so a row's softmax stays in its block.
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

    v_mod = F.normalize(v + alpha * g, dim=-1)
    t_mod = F.normalize(t + alpha * g, dim=-1)
    dual = logit_scale * (v_mod @ t_mod.T)  # rows images, columns texts
    logits = {"i2t": dual, "t2i": dual.T.clone()}
    if beta > 0:
        for name, (idx, itm) in signals.items():
            logits[name] = logits[name] + beta * _itm_dense(
                idx, itm, block=block, k_prime=k_prime or k, name=name)
    outside = block[:, None] != block[None, :]
    return {
        IMG_FEAT: v_mod,
        TXT_FEAT: t_mod,
        I2T_LOGITS: logits["i2t"].masked_fill(outside, float("-inf")),
        T2I_LOGITS: logits["t2i"].masked_fill(outside, float("-inf")),
    }
