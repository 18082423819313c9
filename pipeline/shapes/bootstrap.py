"""Train small teachers from scratch: a CLIP (dual) and a BLIP-ITM (single) on captioned shards.

Good public teachers need downloads; the demo needs none. This module trains
both teacher kinds on a dataset such as the shapes benchmark and saves them as
standard HF dirs (OUT/dual, OUT/single) with their recall next to them:

    mcad teachers bootstrap --data data/shapes/train --val data/shapes/val \
        --test data/shapes/test --out teachers/ --size demo

CLIP: symmetric InfoNCE with its own learnable logit scale. BLIP: ITC (with a
learnable temperature kept in the training code, the HF class has none) plus
ITM on hard negatives sampled from the trained CLIP's similarities (or from
BLIP's own ITC), as in BLIP/ALBEF. AdamW, 5 % warmup then cosine.

Recall follows the 5-caption protocol (an image->text hit when any of the
image's captions is in the top K): dual = CLIP logits; single = ITM re-ranking
of the dual's top-k; combined = dual logit + beta * ITM logit over the dual's
top-k, beta chosen on val (the MCAD teacher distribution of docs/design.md, section 3).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mcad.pipeline.shapes.teacher_models import build_blip, build_clip, build_processors, build_tokenizers, count_parameters, get_size, save_teacher
from mcad.pipeline.shapes.bootstrap_data import Encoded, Split
from mcad.pipeline.itm import itm_forward, itm_logit
from mcad.storage.atomic import atomic_write_json
from mcad.storage.errors import InputError
from mcad.student.losses import symmetric_cross_entropy
from mcad.student.metrics import recall_at_k, rerank_recalls
from mcad.student.models import MAX_LOGIT_SCALE, clip_image_embeddings, clip_text_embeddings
from mcad.student.train import warmup_cosine

NEGATIVES = ("clip", "itc")
BETAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
# Both contrastive scales are learnt as logs, clamped so that exp stays <= CLIP's 100.
MAX_LOG_SCALE = math.log(MAX_LOGIT_SCALE)
DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class BootstrapConfig:
    size: str = "demo"
    epochs: int = 10  # CLIP epochs
    blip_epochs: int | None = None  # default: same as epochs
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of the steps
    seed: int = 0
    top_k: int = 16  # the dual's candidates the ITM head re-ranks
    negatives: str = "clip"  # ITM hard negatives sampled from "clip" similarities or BLIP's own "itc"
    monitor: int = 200  # val images evaluated after every epoch (0: none)
    dtype: str = "float32"  # weights as saved; "float16" for shipping

    def __post_init__(self):
        get_size(self.size)
        if self.negatives not in NEGATIVES:
            raise InputError(f"negatives must be one of {NEGATIVES}, got {self.negatives!r}")
        if self.dtype not in DTYPES:
            raise InputError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("epochs", "batch_size", "top_k"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.blip_epochs is not None and self.blip_epochs < 1:
            raise InputError(f"blip_epochs must be positive, got {self.blip_epochs}")

    @property
    def n_blip_epochs(self) -> int:
        return self.epochs if self.blip_epochs is None else self.blip_epochs


# ------------------------------------------------------------------ training

def _optimizer(params: list[torch.nn.Parameter], cfg: BootstrapConfig, total: int):
    # No decay on norms, biases, embeddings of shape (1, d) and the scale scalars.
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, cfg.warmup))


def _batches(n_images: int, owner: torch.Tensor, batch: int, gen: torch.Generator):
    """Shuffled full batches of images, each with one random caption of its own."""
    first = torch.searchsorted(owner, torch.arange(n_images))
    count = torch.bincount(owner, minlength=n_images)
    order = torch.randperm(n_images, generator=gen)
    for start in range(0, n_images - batch + 1, batch):
        img = order[start:start + batch]
        pick = (torch.rand(len(img), generator=gen) * count[img]).long()
        yield img, first[img] + pick


def _epochs(name: str, n_epochs: int, steps: int, run_step, on_epoch) -> list[dict]:
    """The shared loop: tqdm per epoch, `run_step(epoch) -> iterator of losses`."""
    history = []
    for epoch in range(n_epochs):
        bar = tqdm(run_step(epoch), total=steps, desc=f"{name} {epoch + 1}/{n_epochs}",
                   mininterval=10, leave=False)
        losses = []
        for loss in bar:
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None, **on_epoch()}
        history.append(entry)
        tqdm.write(f"{name} epoch {entry['epoch']}: " + json.dumps({k: v for k, v in entry.items() if k != "epoch"}))
    return history


def train_clip(clip, data: Encoded, cfg: BootstrapConfig, on_epoch=dict) -> list[dict]:
    """Symmetric InfoNCE over in-batch pairs; CLIP's own logit scale learns, clamped at 100."""
    n = len(data.pixels)
    steps = n // cfg.batch_size
    if steps < 1:
        raise InputError(f"{n} training images is fewer than one batch of {cfg.batch_size}")
    opt, sched = _optimizer(list(clip.parameters()), cfg, steps * cfg.epochs)
    gen = torch.Generator().manual_seed(cfg.seed)

    def run(epoch):
        clip.train()
        for img, txt in _batches(n, data.owner, cfg.batch_size, gen):
            out = clip(input_ids=data.ids[txt], attention_mask=data.mask[txt],
                       pixel_values=data.norm(data.pixels[img]))
            loss = symmetric_cross_entropy(out.logits_per_image)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(max=MAX_LOG_SCALE)
            yield loss.item()

    return _epochs("clip", cfg.epochs, steps, run, on_epoch)


def _hard_negatives(logits: torch.Tensor, same: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One index per row, sampled in proportion to softmax(logits) over non-matching columns."""
    weights = torch.softmax(logits.float().masked_fill(same, -1e4), dim=1)
    return torch.multinomial(weights, 1, generator=gen).squeeze(1)


def blip_step(blip, itc_scale, ids, mask, pixels, neg_logits, gen) -> torch.Tensor:
    """ITC + ITM loss of one batch; `neg_logits` (B, B) image->text picks the hard negatives."""
    vis = blip.vision_model(pixel_values=pixels).last_hidden_state
    txt = blip.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
    img_feat = F.normalize(blip.vision_proj(vis[:, 0]), dim=-1)
    txt_feat = F.normalize(blip.text_proj(txt), dim=-1)
    itc = symmetric_cross_entropy(itc_scale.exp() * img_feat @ txt_feat.T)
    b = len(ids)
    with torch.no_grad():
        # Identical captions of two images are not negatives of each other.
        same = (ids[:, None, :] == ids[None, :, :]).all(-1) | torch.eye(b, dtype=torch.bool)
        sim = neg_logits if neg_logits is not None else itc_scale.exp() * img_feat @ txt_feat.T
        neg_txt, neg_img = _hard_negatives(sim, same, gen), _hard_negatives(sim.T, same.T, gen)
    pos = torch.arange(b)
    img_idx, txt_idx = torch.cat([pos, pos, neg_img]), torch.cat([pos, neg_txt, pos])
    _, itm = itm_forward(blip, ids[txt_idx], mask[txt_idx], vis[img_idx])
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long()
    return itc + F.cross_entropy(itm, labels)


def train_blip(blip, data: Encoded, cfg: BootstrapConfig, *, clip=None, clip_data: Encoded | None = None,
               on_epoch=dict) -> list[dict]:
    """ITC (learnable temperature, not saved) + ITM on hard negatives from `clip` if given."""
    n = len(data.pixels)
    steps = n // cfg.batch_size
    itc_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    opt, sched = _optimizer(list(blip.parameters()) + [itc_scale], cfg, steps * cfg.n_blip_epochs)
    gen = torch.Generator().manual_seed(cfg.seed + 1)

    def run(epoch):
        blip.train()
        for img, txt in _batches(n, data.owner, cfg.batch_size, gen):
            neg_logits = None
            if clip is not None:
                with torch.no_grad():
                    neg_logits = clip(input_ids=clip_data.ids[txt], attention_mask=clip_data.mask[txt],
                                      pixel_values=clip_data.norm(clip_data.pixels[img])).logits_per_image
            loss = blip_step(blip, itc_scale, data.ids[txt], data.mask[txt], data.norm(data.pixels[img]),
                             neg_logits, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                itc_scale.clamp_(max=MAX_LOG_SCALE)
            yield loss.item()

    return _epochs("blip", cfg.n_blip_epochs, steps, run, on_epoch)


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def dual_logits(clip, data: Encoded, batch: int = 256) -> torch.Tensor:
    """(n_images, n_texts) logit-scaled cosine similarities s * v.t of a CLIPModel."""
    clip.eval()
    v = torch.cat([clip_image_embeddings(clip, data.norm(data.pixels[i:i + batch]))
                   for i in range(0, len(data.pixels), batch)])
    t = torch.cat([clip_text_embeddings(clip, data.ids[i:i + batch], data.mask[i:i + batch])
                   for i in range(0, len(data.ids), batch)])
    return clip.logit_scale.exp().float() * v @ t.T


@torch.no_grad()
def itm_pairs(blip, data: Encoded, vis: torch.Tensor, img_idx: torch.Tensor, txt_idx: torch.Tensor,
              batch: int = 512) -> torch.Tensor:
    """ITM logit(match) - logit(no match) per pair; `vis` is each image's vision output, computed once."""
    out = []
    for s in range(0, len(img_idx), batch):
        i, t = img_idx[s:s + batch], txt_idx[s:s + batch]
        out.append(itm_logit(itm_forward(blip, data.ids[t], data.mask[t], vis[i])[1]))
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def itm_signals(blip, data: Encoded, dual: torch.Tensor, top_k: int, batch: int = 256) -> dict:
    """The dual's top-k candidates in both directions and their ITM logits."""
    blip.eval()
    vis = torch.cat([blip.vision_model(pixel_values=data.norm(data.pixels[i:i + batch])).last_hidden_state
                     for i in range(0, len(data.pixels), batch)])
    n_i, n_t = dual.shape
    k_t, k_i = min(top_k, n_t), min(top_k, n_i)
    i2t_idx, t2i_idx = dual.topk(k_t, dim=1).indices, dual.T.topk(k_i, dim=1).indices
    i2t = itm_pairs(blip, data, vis, torch.arange(n_i).repeat_interleave(k_t), i2t_idx.flatten())
    t2i = itm_pairs(blip, data, vis, t2i_idx.flatten(), torch.arange(n_t).repeat_interleave(k_i))
    return {"dual": dual, "owner": data.owner, "i2t_idx": i2t_idx, "i2t_itm": i2t.view(n_i, k_t),
            "t2i_idx": t2i_idx, "t2i_itm": t2i.view(n_t, k_i)}


def teacher_recall(ev: dict, *, beta: float) -> dict:
    """dual, single (ITM re-ranks the dual's top-k) and combined (dual + beta * ITM) recall."""
    return rerank_recalls(ev["dual"], ev["owner"], i2t_idx=ev["i2t_idx"], i2t_itm=ev["i2t_itm"],
                          t2i_idx=ev["t2i_idx"], t2i_itm=ev["t2i_itm"], beta=beta)


def choose_beta(ev: dict, betas: Sequence[float] = BETAS) -> float:
    """The beta with the best combined R@1 (both directions); ties go to the smaller beta."""
    def score(b):
        r = teacher_recall(ev, beta=b)["combined"]
        return r["i2t"]["R@1"] + r["t2i"]["R@1"]

    return max(betas, key=lambda b: (score(b), -b))


def teacher_signals(clip, clip_proc, blip, blip_proc, split: Split, top_k: int) -> dict:
    dual = dual_logits(clip, Encoded.make(split, clip_proc))
    return itm_signals(blip, Encoded.make(split, blip_proc), dual, top_k)


# ---------------------------------------------------------------- the command

def _r1(r: dict) -> list[float]:
    return [r["i2t"]["R@1"], r["t2i"]["R@1"]]


def _monitors(clip, clip_proc, blip, blip_proc, val: Split | None, cfg: BootstrapConfig):
    """Cheap per-epoch val figures on the first `cfg.monitor` val images (R@1 i2t, t2i)."""
    if val is None or cfg.monitor < 1:
        return dict, dict
    small = val.head(cfg.monitor)
    clip_data, blip_data = Encoded.make(small, clip_proc), Encoded.make(small, blip_proc)

    def on_clip():
        d = dual_logits(clip, clip_data)
        return {"val_dual_R@1": _r1(recall_at_k(d, clip_data.owner))}

    def on_blip():
        ev = itm_signals(blip, blip_data, dual_logits(clip, clip_data), cfg.top_k)
        r = teacher_recall(ev, beta=1.0)
        return {"val_single_R@1": _r1(r["single"]), "val_combined_R@1(beta=1)": _r1(r["combined"])}

    return on_clip, on_blip


def _final_recall(dual_dir: Path, single_dir: Path, splits: dict[str, Split], top_k: int) -> dict:
    """Recall of the teachers as saved (reloaded with plain transformers, float32)."""
    from transformers import AutoProcessor, BlipForImageTextRetrieval, CLIPModel

    clip = CLIPModel.from_pretrained(dual_dir, dtype=torch.float32, use_safetensors=True, local_files_only=True)
    blip = BlipForImageTextRetrieval.from_pretrained(single_dir, dtype=torch.float32, use_safetensors=True,
                                                     local_files_only=True)
    procs = (AutoProcessor.from_pretrained(dual_dir, local_files_only=True),
             AutoProcessor.from_pretrained(single_dir, local_files_only=True))
    evs = {name: teacher_signals(clip, procs[0], blip, procs[1], split, top_k) for name, split in splits.items()}
    beta, beta_from = (choose_beta(evs["val"]), "val") if "val" in evs else (1.0, "default")
    out = {"beta": beta, "beta_from": beta_from, "top_k": top_k}
    for name, ev in evs.items():
        out[name] = teacher_recall(ev, beta=beta)
        # R@1 (i2t, t2i) of the combined score for every beta tried: how sensitive the choice is.
        out[name]["combined_R@1_by_beta"] = {str(b): _r1(teacher_recall(ev, beta=b)["combined"]) for b in BETAS}
    return out


def bootstrap(cfg: BootstrapConfig, train: Split, out_dir: str | Path, *, val: Split | None = None,
              test: Split | None = None, sources: dict | None = None) -> dict:
    """Train both teachers on `train`, save OUT/dual, OUT/single, the config and the recall JSON."""
    out, seconds, start = Path(out_dir), {}, time.time()
    info = {"config": asdict(cfg), "size": get_size(cfg.size).to_dict(), "data": sources or {},
            "counts": {name: {"images": s.n_images, "texts": len(s.captions), "rejects": s.rejects}
                       for name, s in (("train", train), ("val", val), ("test", test)) if s is not None},
            "torch_threads": torch.get_num_threads()}
    atomic_write_json(out / "bootstrap_config.json", info)
    torch.manual_seed(cfg.seed)
    clip_tok, blip_tok = build_tokenizers(train.captions)
    clip_proc, blip_proc = build_processors(cfg.size, clip_tok, blip_tok)
    clip, blip = build_clip(cfg.size, clip_proc), build_blip(cfg.size, blip_tok)
    clip_data, blip_data = Encoded.make(train, clip_proc), Encoded.make(train, blip_proc)
    on_clip, on_blip = _monitors(clip, clip_proc, blip, blip_proc, val, cfg)
    seconds["prepare"] = time.time() - start

    history = {"dual": train_clip(clip, clip_data, cfg, on_epoch=on_clip)}
    seconds["dual"] = time.time() - start - sum(seconds.values())
    clip.eval()
    history["single"] = train_blip(blip, blip_data, cfg, clip=clip if cfg.negatives == "clip" else None,
                                   clip_data=clip_data, on_epoch=on_blip)
    seconds["single"] = time.time() - start - sum(seconds.values())

    dtype = DTYPES[cfg.dtype]
    dual_dir = save_teacher(clip, clip_proc, out / "dual", dtype=dtype)
    single_dir = save_teacher(blip, blip_proc, out / "single", dtype=dtype)
    splits = {name: s for name, s in (("val", val), ("test", test)) if s is not None}
    if not splits:  # nothing held out: at least show the teachers fit their training data
        splits = {"train_head": train.head(500)}
    result = _final_recall(dual_dir, single_dir, splits, cfg.top_k)
    seconds["eval"] = time.time() - start - sum(seconds.values())
    atomic_write_json(out / "teacher_recall.json", result)
    info.update(history=history, seconds={k: round(v, 1) for k, v in seconds.items()},
                parameters={"dual": count_parameters(clip), "single": count_parameters(blip)},
                vocab={"dual": len(clip_tok), "single": len(blip_tok)})
    atomic_write_json(out / "bootstrap_config.json", info)
    return {"dual": str(dual_dir), "single": str(single_dir), "recall": result, "seconds": info["seconds"]}
