"""Small Hugging Face teachers built from configs: a CLIP (dual) and a BLIP-ITM (single).

Nothing downloads: tokenizers are made from the training captions, models from
configs with random weights. What `save_teacher` writes is a standard HF
directory that plain `transformers` loads without mcad:

    CLIPModel.from_pretrained(dir) / BlipForImageTextRetrieval.from_pretrained(dir)
    AutoProcessor.from_pretrained(dir)

Tests everywhere use `make_tiny_teachers(tmp_path, captions)` for random
"smoke" teachers; `pipeline/shapes/bootstrap.py` trains the "demo" size.
"""
from __future__ import annotations

import copy
import heapq
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import pre_tokenizers
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForImageTextRetrieval,
    BlipImageProcessorPil,
    BlipProcessor,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
)
from transformers.utils import logging as hf_logging

from mcad.storage.errors import InputError
from mcad.student.models import ClipSize, clip_config, resolve_size

MAX_TEXT_LEN = 24  # shapes captions are <= 17 words; +2 for the special tokens

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Characters (and BERT continuations) always in the vocabularies, so a word
# never seen in training is spelled out instead of becoming [UNK].
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


# Shape of both teachers (student.models.ClipSize, the students' one): the BLIP
# vision tower equals the CLIP one, proj_dim is also BLIP's image_text_hidden_size
# (its ITC space), and image_size sets both processors.
SIZES: dict[str, ClipSize] = {
    # Random weights build in well under a second: for tests everywhere.
    "smoke": ClipSize(image_size=32, patch_size=8, hidden=32, intermediate=64,
                      vision_layers=1, text_layers=1, heads=2, proj_dim=32),
    # About 1.3 M parameters each: small enough to train on the 48x48 shapes on a CPU.
    "demo": ClipSize(image_size=48, patch_size=8, hidden=128, intermediate=512,
                     vision_layers=3, text_layers=3, heads=4, proj_dim=128),
}


def get_size(size: str | ClipSize) -> ClipSize:
    return resolve_size(size, SIZES, "teacher")


# ---------------------------------------------------------------- tokenizers

def _words(tokenizer, captions: Iterable[str]) -> Counter:
    """Word counts as `tokenizer`'s own normalizer and pre-tokenizer split them."""
    backend = tokenizer.backend_tokenizer
    counts: Counter = Counter()
    for caption in captions:
        counts.update(w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(caption)))
    return counts


def _learn_merges(counts: Counter) -> list[tuple[str, str]]:
    """Byte-pair merges until every word is one token; ties broken by the pair itself.

    Written out (not `tokenizers`' BpeTrainer) because that trainer breaks ties
    in hash order, so the same captions gave different vocabularies per run.
    Meant for caption vocabularies of up to a few thousand words.
    """
    keys = sorted(counts)
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in keys]
    freqs = [counts[w] for w in keys]
    pairs: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, sym in enumerate(words):
        for p in zip(sym, sym[1:]):
            pairs[p] += freqs[i]
            where.setdefault(p, set()).add(i)
    heap = [(-n, p) for p, n in pairs.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap:
        n, best = heapq.heappop(heap)
        if pairs.get(best, 0) != -n or n == 0:
            continue  # stale heap entry
        merges.append(best)
        touched = set()
        for i in sorted(where.pop(best)):
            sym, f = words[i], freqs[i]
            for p in zip(sym, sym[1:]):
                pairs[p] -= f
                touched.add(p)
            new, j = [], 0
            while j < len(sym):
                if j + 1 < len(sym) and (sym[j], sym[j + 1]) == best:
                    new.append(sym[j] + sym[j + 1])
                    j += 2
                else:
                    new.append(sym[j])
                    j += 1
            words[i] = new
            for p in zip(new, new[1:]):
                pairs[p] += f
                where.setdefault(p, set()).add(i)
                touched.add(p)
        for p in touched:
            if pairs[p] > 0:
                heapq.heappush(heap, (-pairs[p], p))
            else:
                del pairs[p]
    return merges


def _clip_bpe(captions: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style BPE vocabulary in which every training word is one token.

    bos = 0, eos = 1: CLIP pools text at the first eos, and an eos of 2 would
    switch transformers to its legacy argmax(input_ids) pooling. All 256 bytes
    (and their word-final forms) are in, so any text encodes without unk (= eos).
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # An empty CLIPTokenizer only lends its normalizer and byte-level pre-tokenizer.
    merges = _learn_merges(_words(CLIPTokenizer(), captions))
    pieces = [CLIP_BOS, CLIP_EOS] + alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    vocab: dict[str, int] = {}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    return vocab, merges


def _bert_vocab(captions: Iterable[str]) -> dict[str, int]:
    """Word-level BERT vocabulary: specials, the training words, then characters."""
    words = set(_words(BertTokenizer(vocab={t: i for i, t in enumerate(BERT_SPECIALS)}), captions))
    pieces = list(BERT_SPECIALS) + sorted(words) + list(_CHARS) + ["##" + c for c in _CHARS]
    vocab: dict[str, int] = {}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    return vocab


def build_tokenizers(captions: Iterable[str], out_dir: str | Path | None = None, *,
                     max_length: int = MAX_TEXT_LEN) -> tuple[CLIPTokenizer, BertTokenizer]:
    """(CLIP tokenizer, BLIP/BERT tokenizer) from the training captions, offline.

    With `out_dir`, also saved to `out_dir/clip_tokenizer` and `out_dir/blip_tokenizer`.
    """
    captions = [c for c in captions if c and c.strip()]
    if not captions:
        raise InputError("no captions to build a tokenizer from")
    vocab, merges = _clip_bpe(captions)
    clip_tok = CLIPTokenizer(vocab=vocab, merges=merges, bos_token=CLIP_BOS, eos_token=CLIP_EOS,
                             pad_token=CLIP_EOS, unk_token=CLIP_EOS, model_max_length=max_length)
    blip_tok = BertTokenizer(vocab=_bert_vocab(captions), model_max_length=max_length)
    if out_dir is not None:
        clip_tok.save_pretrained(Path(out_dir) / "clip_tokenizer")
        blip_tok.save_pretrained(Path(out_dir) / "blip_tokenizer")
    return clip_tok, blip_tok


# -------------------------------------------------------------------- models

def build_clip(size: str | ClipSize, processor: CLIPProcessor) -> CLIPModel:
    """A randomly initialised CLIPModel that reads `processor`'s inputs (the students' config builder)."""
    return CLIPModel(clip_config(get_size(size), processor))


def build_blip(size: str | ClipSize, tokenizer: BertTokenizer) -> BlipForImageTextRetrieval:
    """A randomly initialised BLIP image-text retrieval model (ITM head + ITC projections)."""
    s = get_size(size)
    text = dict(vocab_size=len(tokenizer), hidden_size=s.hidden, encoder_hidden_size=s.hidden,
                intermediate_size=s.intermediate, num_hidden_layers=s.text_layers,
                num_attention_heads=s.heads, max_position_embeddings=tokenizer.model_max_length,
                projection_dim=s.proj_dim,
                # is_decoder builds the cross-attention layers; the forward still
                # runs bidirectional self-attention by default.
                is_decoder=True,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                eos_token_id=tokenizer.sep_token_id, sep_token_id=tokenizer.sep_token_id)
    vision = dict(hidden_size=s.hidden, intermediate_size=s.intermediate,
                  num_hidden_layers=s.vision_layers, num_attention_heads=s.heads,
                  image_size=s.image_size, patch_size=s.patch_size, projection_dim=s.proj_dim,
                  # the 1e-10 default leaves position/CLS embeddings at ~0 and stalls training
                  initializer_range=0.02)
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=s.proj_dim,
                        image_text_hidden_size=s.proj_dim)
    return BlipForImageTextRetrieval(config)


def build_processors(size: str | ClipSize, clip_tok: CLIPTokenizer,
                     blip_tok: BertTokenizer) -> tuple[CLIPProcessor, BlipProcessor]:
    """Pillow-only processors (no torchvision) at the size's image resolution."""
    px = get_size(size).image_size
    clip_img = CLIPImageProcessorPil(size={"shortest_edge": px}, crop_size={"height": px, "width": px})
    blip_img = BlipImageProcessorPil(size={"height": px, "width": px})
    return (CLIPProcessor(image_processor=clip_img, tokenizer=clip_tok),
            BlipProcessor(image_processor=blip_img, tokenizer=blip_tok))


def save_teacher(model, processor, out_dir: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write a standard HF dir (config, safetensors, processor, tokenizer).

    `dtype=torch.float16` halves the files for shipping; the model passed in is
    not changed. Load such a dir with `dtype=torch.float32` on a CPU.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = copy.deepcopy(model).to(dtype)
    # A per-file "Writing model shards" bar is noise for a few-MB model.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    # A tokenizer call leaves its padding/truncation on the backend, which would be
    # saved into tokenizer.json and turn every later processor call's padding=True
    # into a max_length warning; the saved tokenizer should start clean.
    processor.tokenizer.backend_tokenizer.no_truncation()
    processor.tokenizer.backend_tokenizer.no_padding()
    processor.save_pretrained(out)
    return out


def make_tiny_teachers(out_dir: str | Path, captions: Iterable[str], size: str = "smoke",
                       seed: int = 0) -> tuple[Path, Path]:
    """Untrained random teachers saved as `out_dir/dual` (CLIP) and `out_dir/single` (BLIP)."""
    out = Path(out_dir)
    clip_tok, blip_tok = build_tokenizers(captions)
    clip_proc, blip_proc = build_processors(size, clip_tok, blip_tok)
    torch.manual_seed(seed)
    clip = build_clip(size, clip_proc)
    torch.manual_seed(seed + 1)
    blip = build_blip(size, blip_tok)
    return save_teacher(clip, clip_proc, out / "dual"), save_teacher(blip, blip_proc, out / "single")


# ------------------------------------------------- real-size architectures

# The public checkpoints' shapes (their config.json), explicit; weights random.
# CLIP: openai/clip-vit-base-patch16, openai/clip-vit-large-patch14 (224 px).
# BLIP ITM: Salesforce/blip-itm-base-coco, Salesforce/blip-itm-large-coco (384 px).
CLIP_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=8, max_position_embeddings=77)
BLIP_TEXT = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=512)
ARCHITECTURES: dict[str, dict] = {
    "clip-vit-b16": dict(kind="clip", projection_dim=512, text=CLIP_TEXT,
                         vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, image_size=224, patch_size=16)),
    "clip-vit-l14": dict(kind="clip", projection_dim=768,
                         text={**CLIP_TEXT, "hidden_size": 768, "intermediate_size": 3072,
                               "num_attention_heads": 12},
                         vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, image_size=224, patch_size=14)),
    "blip-itm-base": dict(kind="blip", projection_dim=512, image_text_hidden_size=256,
                          text={**BLIP_TEXT, "encoder_hidden_size": 768},
                          vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, image_size=384, patch_size=16)),
    "blip-itm-large": dict(kind="blip", projection_dim=512, image_text_hidden_size=256,
                           text={**BLIP_TEXT, "encoder_hidden_size": 1024},
                           vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=384, patch_size=16)),
}
# Teacher sizes beyond SIZES: (dual architecture, single architecture).
REAL_SIZES: dict[str, tuple[str, str]] = {"base": ("clip-vit-b16", "blip-itm-base"),
                                          "large": ("clip-vit-l14", "blip-itm-large")}
TEACHER_SIZES = (*SIZES, *REAL_SIZES)  # what the benches' --size takes


def check_teacher_size(size: str) -> None:
    if size not in SIZES and size not in REAL_SIZES:
        raise InputError(f"unknown teacher size {size!r}; choose from {', '.join(TEACHER_SIZES)}")


def architecture_config(name: str, tokenizer):
    """The transformers config of a registry architecture, special ids from `tokenizer`
    (whose vocabulary may be smaller than the architecture's: the embedding table keeps its size)."""
    from transformers import CLIPConfig

    arch = ARCHITECTURES[name]
    if len(tokenizer) > arch["text"]["vocab_size"]:
        raise InputError(f"{name}: tokenizer has {len(tokenizer)} tokens, the architecture {arch['text']['vocab_size']}")
    if arch["kind"] == "clip":
        text = {**arch["text"], "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id, "projection_dim": arch["projection_dim"]}
        vision = {**arch["vision"], "projection_dim": arch["projection_dim"]}
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=arch["projection_dim"])
    # is_decoder builds the cross-attention layers (as build_blip does).
    text = {**arch["text"], "is_decoder": True, "projection_dim": arch["projection_dim"],
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id, "sep_token_id": tokenizer.sep_token_id}
    return BlipConfig(text_config=text, vision_config={**arch["vision"], "projection_dim": arch["projection_dim"]},
                      projection_dim=arch["projection_dim"], image_text_hidden_size=arch["image_text_hidden_size"])


def make_real_teachers(out_dir: str | Path, captions: Iterable[str], size: str = "base", seed: int = 0, *,
                       dtype: torch.dtype | None = None) -> tuple[Path, Path]:
    """Random teachers of a registry size (REAL_SIZES) saved as `out_dir/dual` and `out_dir/single`:
    ordinary `from_pretrained` directories (config, safetensors, processor, tokenizer), as a
    downloaded checkpoint of the same architecture is. The tokenizers are built from `captions`
    offline (a subset of the architecture's vocabulary); images are processed at its resolution."""
    if size not in REAL_SIZES:
        raise InputError(f"unknown real teacher size {size!r}; choose from {', '.join(REAL_SIZES)}")
    out = Path(out_dir)
    dual_arch, single_arch = REAL_SIZES[size]
    clip_tok, blip_tok = build_tokenizers(captions, max_length=CLIP_TEXT["max_position_embeddings"])
    blip_tok.model_max_length = BLIP_TEXT["max_position_embeddings"]
    clip_px = ARCHITECTURES[dual_arch]["vision"]["image_size"]
    blip_px = ARCHITECTURES[single_arch]["vision"]["image_size"]
    clip_proc = CLIPProcessor(image_processor=CLIPImageProcessorPil(
        size={"shortest_edge": clip_px}, crop_size={"height": clip_px, "width": clip_px}), tokenizer=clip_tok)
    blip_proc = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": blip_px, "width": blip_px}),
                              tokenizer=blip_tok)
    torch.manual_seed(seed)
    dual = save_teacher(CLIPModel(architecture_config(dual_arch, clip_tok)), clip_proc, out / "dual", dtype=dtype)
    torch.manual_seed(seed + 1)
    single = save_teacher(BlipForImageTextRetrieval(architecture_config(single_arch, blip_tok)), blip_proc,
                          out / "single", dtype=dtype)
    return dual, single


def make_teachers(out_dir: str | Path, captions: Iterable[str], size: str = "smoke",
                  seed: int = 0) -> tuple[Path, Path]:
    """Random teachers of any teacher size: SIZES (small) or REAL_SIZES (public shapes)."""
    check_teacher_size(size)
    if size in REAL_SIZES:
        return make_real_teachers(out_dir, captions, size, seed)
    return make_tiny_teachers(out_dir, captions, size, seed)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

