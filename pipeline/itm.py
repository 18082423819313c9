"""BLIP's image-text matching branch on pairs, from vision states computed once per image.

`itm_forward` is what `BlipForImageTextRetrieval(..., use_itm_head=True)` computes
for pairs; `itm_forward_cached` gives the same result with each image's
cross-attention keys and values projected once and shared by its pairs (the
teacher pass's default path, docs/design.md section 3); `itm_logit` is the
match logit m = logit(match) - logit(no match).
"""
from __future__ import annotations

import functools

import torch


def itm_forward(blip, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's ITM branch on pairs r = (image_states[r], text r): (fused [CLS] state (m, F), ITM logits (m, 2)).

    What BlipForImageTextRetrieval computes with `use_itm_head=True`, from
    vision states the caller computed once per image; in the model's dtype,
    with gradient when the caller allows it (the teacher bootstrap trains through it).
    """
    mask = torch.ones(image_states.shape[:-1], dtype=torch.long, device=image_states.device)
    out = blip.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                            encoder_hidden_states=image_states, encoder_attention_mask=mask)
    cls_state = out.last_hidden_state[:, 0, :]
    return cls_state, blip.itm_head(cls_state)


@functools.cache
def _pair_kv_layer():
    """The cache layer class, made on first use (transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class PairKV(DynamicLayer):
        """One cross-attention layer's keys and values, projected once per image
        (n, heads, L, head_dim) and gathered to pair order (m, heads, L, head_dim)
        when the layer reads them, so only one layer's gathered copy lives at a time.

        A read-only transformers cache layer: BlipTextSelfAttention reads
        `cache.cross_attention_cache.layers[i].keys / .values` once `is_updated[i]`.
        """

        is_initialized = True

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor):
            # No super().__init__(): it would assign keys and values, read-only here.
            self._keys, self._values, self._index = keys, values, index

        @property
        def keys(self) -> torch.Tensor:
            return self._keys.index_select(0, self._index)

        @property
        def values(self) -> torch.Tensor:
            return self._values.index_select(0, self._index)

        def get_seq_length(self) -> int:
            return self._keys.shape[-2]

    return PairKV


def image_groups(image_index: torch.Tensor, max_images: int):
    """Split pairs (in their order) into runs naming at most `max_images` distinct images;
    per run: (slice of pairs, its distinct images, each pair's row among them)."""
    index = image_index.tolist()
    lo, seen = 0, {}
    for r, i in enumerate(index + [None]):
        if i is not None and (i in seen or len(seen) < max_images):
            seen.setdefault(i, len(seen))
            continue
        yield (slice(lo, r), torch.tensor(list(seen), dtype=torch.long),
               torch.tensor([seen[j] for j in index[lo:r]], dtype=torch.long))
        lo, seen = r, {i: 0}


def itm_forward_cached(blip, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       image_states: torch.Tensor, image_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`itm_forward` on pairs r = (image_states[image_index[r]], text r), each image's
    cross-attention keys and values projected once (image_states: (n, L, H), one row per image).

    The projections fill transformers' own EncoderDecoderCache, marked as
    already updated, so every BLIP text layer reads them instead of projecting
    the pair's image states again; equal to `itm_forward` on the gathered states
    (tests/pipeline/test_teachers.py checks it against the plain HF forward).
    """
    from transformers import DynamicCache, EncoderDecoderCache
    from transformers.cache_utils import Cache

    n, length = image_states.shape[:2]
    layers = []
    for layer in blip.text_encoder.encoder.layer:
        att = layer.crossattention.self
        shape = (n, length, -1, att.attention_head_size)
        layers.append(_pair_kv_layer()(att.key(image_states).view(shape).transpose(1, 2),
                              att.value(image_states).view(shape).transpose(1, 2), image_index))
    cache = EncoderDecoderCache(DynamicCache(), Cache(layers=layers))
    for i in range(len(layers)):
        cache.is_updated[i] = True
    m = image_index.shape[0]
    # Only its shape is read (masks, the cross-attention switch): keys and values come from the cache.
    stand_in = image_states[:1].expand(m, -1, -1)
    mask = torch.ones((m, length), dtype=torch.long, device=image_states.device)
    out = blip.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=stand_in,
                            encoder_attention_mask=mask, cache=cache, use_cache=True)
    cls_state = out.last_hidden_state[:, 0, :]
    return cls_state, blip.itm_head(cls_state)


def itm_logit(logits: torch.Tensor) -> torch.Tensor:
    """m = logit(match) - logit(no match) in float32, from (m, 2) ITM logits (docs/design.md, section 3)."""
    logits = logits.float()
    return logits[:, 1] - logits[:, 0]
