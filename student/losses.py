"""Student losses of MCAD (docs/design.md, section 3): pure functions returning (loss, metrics).

    L = w_con·L_con + w_dist·L_dist + w_feat·L_feat + w_rank·L_rank

    loss, metrics = mcad_loss(weights=LossWeights(con=1, dist=1, feat=1),
                              image=u, text=w, logit_scale=model.logit_scale.exp(),
                              targets=mcad_targets(...), image_proj=h_v(u), text_proj=h_t(w))

- L_con  (`info_nce`): symmetric InfoNCE on ground truth, row i matches column i.
- L_dist (`distribution_kl`): KL(p_i ‖ q_i) in both directions, p the softmax of
  the teacher logits (student.targets), q the student's softmax over the same
  candidates.
- L_feat (`feature_loss`): 1 − cos between the student's head outputs h(u_i),
  h(w_i) and the modified teacher features v'_i, t'_i.
- L_rank (`rank_distillation`, issue #18; weight 0 by default): ListMLE, the
  student's scores over each query's stored top-K' candidates must follow the
  order the teacher gives them (the single teacher's ITM logits, or the combined
  score), both directions.

Replay vs remix. The losses do not know the mode; only the block structure
of the teacher logits differs, and the student follows it (its logits are
masked to -inf wherever the teacher's are):
- replay: the batch is one or several whole teacher pools; each pool is a
  block, teacher logits are -inf across blocks, so every row's softmax (teacher
  and student) runs over its own pool, as in the teacher pass.
- remix: any batch; the whole batch is one block, the softmax runs over the
  batch, and single-teacher terms exist only where both ends are in the batch
  (that is handled in the targets, not here).
L_con always uses the whole batch: ground truth needs no teacher.

Scores are computed in at least float32 (float64 stays float64, for gradcheck).
Metrics are detached scalar tensors keyed by term name, left on the loss's
device: reading one is a device synchronisation, so the training loop turns
them into python floats only at its logging steps (`metrics_to_floats`).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from mcad.storage.errors import InputError
from mcad.student.config import LossWeights
from mcad.storage.schema import PAD_IDX
from mcad.student.targets import I2T_LOGITS, I2T_RANK, IMG_FEAT, T2I_LOGITS, T2I_RANK, TXT_FEAT


def _scores(a: torch.Tensor, b: torch.Tensor, logit_scale) -> torch.Tensor:
    """(B, B) logit_scale · a_i·b_j in at least float32."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    return logit_scale * (a.to(dtype) @ b.to(dtype).T)


def symmetric_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean of the row-wise and column-wise cross-entropies of (B, B) logits, row i matching column i.

    The symmetric InfoNCE of docs/design.md (section 3, L_con); the teacher
    bootstrap (pipeline/shapes/bootstrap.py) trains its CLIP and BLIP ITC with it too.
    """
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss_i2t = F.cross_entropy(logits, labels)
    loss_t2i = F.cross_entropy(logits.T, labels)
    return (loss_i2t + loss_t2i) / 2


def info_nce(*, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric InfoNCE over the batch, ground truth on the diagonal.

    image, text: (B, D) normalised student embeddings u_i, w_i.
    logit_scale: scalar tensor, the student's scale (already exp'd).
    Returns the mean of the image→text and text→image cross-entropies (scalar).
    """
    logits = _scores(image, text, logit_scale)
    loss = symmetric_cross_entropy(logits)
    with torch.no_grad():
        labels = torch.arange(logits.shape[0], device=logits.device)
        metrics = {
            "con": loss.detach(),
            "con_acc_i2t": (logits.argmax(dim=1) == labels).float().mean(),
            "con_acc_t2i": (logits.argmax(dim=0) == labels).float().mean(),
            # a copy: the caller's scale may be a parameter the optimiser changes in place
            "logit_scale": torch.as_tensor(logit_scale).detach().clone(),
        }
    return loss, metrics


def _kl_rows(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """(B,) KL(softmax(teacher_i) ‖ softmax(student_i)), student masked where teacher is -inf.

    Masked entries are zeroed before the product, not after, so neither the
    forward (0·log 0) nor the backward (0·inf) meets a NaN.
    """
    teacher = teacher.to(student.dtype)
    keep = ~torch.isneginf(teacher)
    log_q = torch.log_softmax(student.masked_fill(~keep, float("-inf")), dim=1)
    log_p = torch.log_softmax(teacher, dim=1)
    p = log_p.exp()  # exactly 0 where masked
    diff = (log_p - log_q).masked_fill(~keep, 0.0)
    return (p * diff).sum(dim=1)


def distribution_kl(*, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                    i2t_logits: torch.Tensor, t2i_logits: torch.Tensor, temperature: float = 1.0
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL(p_i ‖ q_i) both directions, mean over rows, directions averaged.

    image, text: (B, D) normalised student embeddings u_i, w_i.
    logit_scale: scalar tensor, the student's scale (already exp'd).
    i2t_logits: (B, B) teacher logits, row i = image i over texts j; -inf outside
      the row's block. t2i_logits: (B, B), row i = text i over images j.
    Each teacher row needs at least one finite entry (its own column always is).
    Teacher logits are targets: no gradient flows into them.
    Student: q_i = softmax_j(s·u_i·w_j) (image→text) and softmax_j(s·w_i·u_j)
    (text→image), restricted to the teacher's finite entries.
    temperature T (Hinton et al.): both sides' logits are divided by T and the
    KL multiplied by T², so T > 1 lets the student see the teacher's ranking of
    the negatives, not only its (near one-hot) top choice. T = 1 is the plain KL.
    """
    if not temperature > 0:
        raise InputError(f"distillation temperature must be > 0, got {temperature}")
    scores = _scores(image, text, logit_scale) / temperature
    kl_i2t = _kl_rows(i2t_logits.detach() / temperature, scores).mean()
    kl_t2i = _kl_rows(t2i_logits.detach() / temperature, scores.T).mean()
    kl_i2t, kl_t2i = kl_i2t * temperature ** 2, kl_t2i * temperature ** 2
    loss = (kl_i2t + kl_t2i) / 2
    metrics = {"dist": loss.detach(), "dist_i2t": kl_i2t.detach(), "dist_t2i": kl_t2i.detach()}
    return loss, metrics


def _listmle_rows(scores: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) Plackett–Luce negative log-likelihood of each row's teacher order, per ranked step, and
    the (B,) mask of rows that have an order at all (at least two candidates).

    rank (B, L): batch-local columns, the teacher's best first, PAD_IDX after them. Step k
    of row i costs logsumexp_{j >= k} S_{i, rank_j} - S_{i, rank_k}; a row of n candidates
    has n - 1 steps (the last one costs 0) and returns their mean. Padding never enters a
    logsumexp: each step's set is a boolean mask over the row, never -inf arithmetic.
    """
    valid = rank != PAD_IDX
    n = valid.sum(dim=1)
    g = scores.gather(1, rank.clamp(min=0)).masked_fill(~valid, 0.0)  # (B, L)
    length = rank.shape[1]
    pos = torch.arange(length, device=rank.device)
    # later[i, k, j]: candidate j is still unplaced at step k (j >= k), or is step k itself
    later = (valid[:, None, :] & (pos[None, None, :] >= pos[None, :, None])) | torch.eye(
        length, dtype=torch.bool, device=rank.device)
    lse = torch.logsumexp(g[:, None, :].expand(-1, length, -1).masked_fill(~later, float("-inf")), dim=2)
    steps = valid & (pos[None, :] < (n - 1)[:, None])
    per_row = (lse - g).masked_fill(~steps, 0.0).sum(dim=1) / (n - 1).clamp(min=1)
    return per_row, n >= 2


def rank_distillation(*, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                      i2t_rank: torch.Tensor, t2i_rank: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ListMLE (Plackett–Luce) ranking distillation over each query's stored candidates, both directions.

    image, text: (B, D) normalised student embeddings u_i, w_i; logit_scale: scalar (exp'd).
    i2t_rank: (B, L) for image i, its candidate texts (batch-local columns) in the teacher's
      order, best first, PAD_IDX after them (student.targets, rank_by); t2i_rank: (B, L), text
      i's candidate images.
    Per row: the negative log-likelihood of the teacher's order under the Plackett–Luce model
    of the student's scores S_ij = s·u_i·w_j over the same candidates, averaged over the
    row's ranked steps (n - 1 of them); rows with fewer than two candidates are left out of
    the mean; directions averaged. Only the order of the candidates is distilled, not the
    teacher's margins: the partial-ranking form CPRD (CVPR 2024) proposes for
    cross-encoder teachers, whose calibrated scores a dual encoder cannot match.
    """
    scores = _scores(image, text, logit_scale)
    terms = {}
    for name, rows, rank in (("i2t", scores, i2t_rank), ("t2i", scores.T, t2i_rank)):
        per_row, ranked = _listmle_rows(rows, torch.as_tensor(rank, device=scores.device).long())
        # no row with an order (K' = 1): 0, still attached to the graph
        terms[name] = (per_row[ranked].mean() if bool(ranked.any()) else scores.sum() * 0.0)
    loss = (terms["i2t"] + terms["t2i"]) / 2
    metrics = {"rank": loss.detach(), "rank_i2t": terms["i2t"].detach(), "rank_t2i": terms["t2i"].detach()}
    return loss, metrics


def feature_loss(*, image_proj: torch.Tensor, text_proj: torch.Tensor, img_feat: torch.Tensor,
                 txt_feat: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean of 1 − cos(h_v(u_i), v'_i) and 1 − cos(h_t(w_i), t'_i) over rows and both sides.

    image_proj, text_proj: (B, D) the student heads' outputs h_v(u_i), h_t(w_i)
      (any norm: cosine normalises them).
    img_feat, txt_feat: (B, D) modified teacher features v'_i, t'_i (targets, no grad).
    """
    dtype = torch.promote_types(image_proj.dtype, torch.float32)
    feat_v = (1 - F.cosine_similarity(image_proj.to(dtype), img_feat.detach().to(dtype), dim=-1)).mean()
    feat_t = (1 - F.cosine_similarity(text_proj.to(dtype), txt_feat.detach().to(dtype), dim=-1)).mean()
    loss = (feat_v + feat_t) / 2
    metrics = {"feat": loss.detach(), "feat_img": feat_v.detach(), "feat_txt": feat_t.detach()}
    return loss, metrics


def mcad_loss(*, weights: LossWeights, image: torch.Tensor, text: torch.Tensor,
              logit_scale: torch.Tensor, targets: Mapping[str, torch.Tensor] | None = None,
              image_proj: torch.Tensor | None = None, text_proj: torch.Tensor | None = None,
              temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = w_con·L_con + w_dist·L_dist + w_feat·L_feat + w_rank·L_rank; terms of weight 0 are not computed.

    image, text: (B, D) normalised student embeddings; logit_scale: scalar (exp'd).
    targets: the dict of `student.targets.mcad_targets` (needed when dist, feat or rank > 0;
      with rank > 0, made with rank_by so it holds the rank lists).
    image_proj, text_proj: (B, D) feature-head outputs (needed when feat > 0).
    Metrics: each computed term's metrics, plus "loss" (the weighted total).
    """
    if (weights.dist > 0 or weights.feat > 0 or weights.rank > 0) and targets is None:
        raise ValueError("mcad_loss: targets are needed when the dist, feat or rank weight is > 0")
    if weights.feat > 0 and (image_proj is None or text_proj is None):
        raise ValueError("mcad_loss: image_proj and text_proj are needed when the feat weight is > 0")
    terms = []
    if weights.con > 0:
        terms.append((weights.con, info_nce(image=image, text=text, logit_scale=logit_scale)))
    if weights.dist > 0:
        terms.append((weights.dist, distribution_kl(
            image=image, text=text, logit_scale=logit_scale,
            i2t_logits=targets[I2T_LOGITS], t2i_logits=targets[T2I_LOGITS], temperature=temperature)))
    if weights.feat > 0:
        terms.append((weights.feat, feature_loss(
            image_proj=image_proj, text_proj=text_proj,
            img_feat=targets[IMG_FEAT], txt_feat=targets[TXT_FEAT])))
    if weights.rank > 0:
        if I2T_RANK not in targets:
            raise ValueError("mcad_loss: the rank weight is > 0 but the targets hold no rank lists "
                             "(mcad_targets(..., rank_by=...))")
        terms.append((weights.rank, rank_distillation(
            image=image, text=text, logit_scale=logit_scale,
            i2t_rank=targets[I2T_RANK], t2i_rank=targets[T2I_RANK])))
    total = sum(w * loss for w, (loss, _) in terms)
    metrics: dict[str, torch.Tensor] = {}
    for _, (_, term_metrics) in terms:
        metrics.update(term_metrics)
    metrics["loss"] = total.detach()
    return total, metrics


def metrics_to_floats(metrics: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The loss metrics as python floats, for a log line: one device synchronisation per value."""
    return {name: float(value) for name, value in metrics.items()}
