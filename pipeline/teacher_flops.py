"""FLOPs and memory of the teacher pass's model stages, counted from the teachers' configs.

Only matrix products count (2 FLOPs per multiply-add); layer norms, softmax,
activations and embedding look-ups are left out (well under 1 % at the real
sizes). For a transformer layer over n tokens of width d with MLP width i:

    layer(n, d, i) = 8 n d^2          Q, K, V and output projections
                   + 4 n^2 d          scores Q K^T and the weighted sum of V
                   + 4 n d i          the two MLP matrices

    vision tower   = 2 (n - 1) (3 p^2) d  +  layers x layer(n, d, i),   n = (image / p)^2 + 1
    CLIP image     = vision tower + 2 d e                  (e: projection_dim)
    CLIP text      = layers x layer(T, d, i) + 2 d e       (T: text tokens)
    BLIP ITM pair  = layers x [layer(T, d, i) + 4 T d^2 + 4 T L d + 4 L d_v d] + 4 d
                     cross-attention: Q and output projections (4 T d^2), scores and
                     weighted sum over the image's L tokens (4 T L d), and the
                     projection of those L tokens (width d_v) to keys and values
                     (4 L d_v d: `kv_per_image`); the ITM head (4 d)

With the cross-attention cache, `kv_per_image` is paid once per image (per
pair batch) instead of once per pair. `roofline` turns them into the samples/s
bound of a registry size at a given MFU and peak. `working_set_bytes` and
`size_micro_batches` size a teacher's micro-batches to a device's free memory.
Plain Python on the config objects: nothing heavy is imported (`registry_configs`
reads the registry module when called).
"""
from __future__ import annotations

from dataclasses import dataclass


def layer_flops(n: int, d: int, i: int) -> int:
    """One transformer encoder layer over n tokens, width d, MLP width i."""
    return 8 * n * d * d + 4 * n * n * d + 4 * n * d * i


def vision_tokens(vision_config) -> int:
    """Patches plus the class token."""
    return (vision_config.image_size // vision_config.patch_size) ** 2 + 1


def vision_flops(vision_config) -> int:
    v = vision_config
    n = vision_tokens(v)
    patches = 2 * (n - 1) * 3 * v.patch_size ** 2 * v.hidden_size
    return patches + v.num_hidden_layers * layer_flops(n, v.hidden_size, v.intermediate_size)


def clip_image_flops(config) -> int:
    """One image through a CLIPModel's vision tower and projection."""
    return vision_flops(config.vision_config) + 2 * config.vision_config.hidden_size * config.projection_dim


def clip_text_flops(config, tokens: int) -> int:
    """One caption of `tokens` tokens through a CLIPModel's text tower and projection."""
    t = config.text_config
    return (t.num_hidden_layers * layer_flops(tokens, t.hidden_size, t.intermediate_size)
            + 2 * t.hidden_size * config.projection_dim)


def blip_kv_per_image(config) -> int:
    """Keys and values of one image's tokens in every cross-attention layer of a BLIP text encoder."""
    t, v = config.text_config, config.vision_config
    return t.num_hidden_layers * 4 * vision_tokens(v) * v.hidden_size * t.hidden_size


def blip_pair_flops(config, tokens: int, *, cached: bool) -> int:
    """One ITM pair (caption of `tokens` tokens); cached: without the image's key/value projection."""
    t, v = config.text_config, config.vision_config
    d, n_img = t.hidden_size, vision_tokens(v)
    per_layer = layer_flops(tokens, d, t.intermediate_size) + 4 * tokens * d * d + 4 * tokens * n_img * d
    pair = t.num_hidden_layers * per_layer + 4 * d
    return pair if cached else pair + blip_kv_per_image(config)


def stage_flops_per_sample(dual_config, single_config, *, dual_tokens: int, single_tokens: int,
                           pairs_per_sample: float, kv_images_per_sample: float, cached: bool) -> dict[str, float]:
    """FLOPs per kept sample of each model stage of the pass.

    pairs_per_sample: ITM pairs scored per sample (at most 2K + 1); kv_images_per_sample:
    images whose keys and values the cache projects per sample (1 when each image's
    pairs fall in one pair batch).
    """
    itm = pairs_per_sample * blip_pair_flops(single_config, single_tokens, cached=cached)
    if cached:
        itm += kv_images_per_sample * blip_kv_per_image(single_config)
    return {"dual_image": float(clip_image_flops(dual_config)),
            "dual_text": float(clip_text_flops(dual_config, dual_tokens)),
            "single_vision": float(vision_flops(single_config.vision_config)),
            "itm_pairs": float(itm)}


# ------------------------------------------------------------- roofline

ROOFLINE_TOKENS = 32  # caption tokens per text, both teachers: a pool's captions padded to its longest


def registry_configs(size: str):
    """(dual, single) config stand-ins of a registry size (pipeline/shapes/teacher_models.REAL_SIZES):
    the architecture fields these formulas read, no model and no tokenizer built."""
    from types import SimpleNamespace as NS

    from mcad.pipeline.shapes.teacher_models import ARCHITECTURES, REAL_SIZES

    def config(name):
        arch = ARCHITECTURES[name]
        return NS(projection_dim=arch["projection_dim"], vision_config=NS(**arch["vision"]),
                  text_config=NS(**arch["text"]))

    dual, single = REAL_SIZES[size]
    return config(dual), config(single)


def roofline(size: str, *, peak_flops: float, mfu: float = 0.5, topk: int = 16, pool_size: int = 64,
             text_tokens: int = ROOFLINE_TOKENS, pairs_per_sample: float | None = None) -> dict:
    """Samples/s a teacher pass of registry `size` cannot beat on one device of `peak_flops`
    running every stage at `mfu`: mfu x peak / FLOPs per sample, with the cross-attention
    cache ("cached": keys and values once per image) and without ("uncached").

    Computed, not measured. Pairs per sample default to 2K, the design's bound (a pool
    scores at most 2 K P pairs; the positive is named by both directions, so the distinct
    pairs are at most 2K - 1). P enters only as K <= P: the pool's own products
    (2 P D per sample for the dual logits) are under 1e-5 of the models' FLOPs and left out.
    """
    if not 0 < mfu <= 1 or peak_flops <= 0 or not 1 <= topk <= pool_size:
        raise ValueError(f"bad roofline inputs: mfu {mfu}, peak {peak_flops}, K {topk}, P {pool_size}")
    dual, single = registry_configs(size)
    pairs = 2 * topk if pairs_per_sample is None else pairs_per_sample
    out = {"size": size, "peak_flops": peak_flops, "mfu": mfu, "topk": topk, "pool_size": pool_size,
           "text_tokens": text_tokens, "pairs_per_sample": pairs}
    for name, cached in (("uncached", False), ("cached", True)):
        stages = stage_flops_per_sample(dual, single, dual_tokens=text_tokens, single_tokens=text_tokens,
                                        pairs_per_sample=pairs, kv_images_per_sample=1.0, cached=cached)
        total = sum(stages.values())
        out[name] = {"flops_per_sample": stages, "total_flops_per_sample": total,
                     "samples_per_s": mfu * peak_flops / total, "pairs_per_s": pairs * mfu * peak_flops / total}
    return out


# -------------------------------------------------- micro-batches and memory

@dataclass(frozen=True)
class MicroBatches:
    """How much of a pool a teacher runs per forward."""

    images: int | None = None         # images (and captions) per tower forward; None: all given at once
    pairs: int | None = None          # ITM pairs per forward at most; None: as many as the caller hands over
    kv_cache_bytes: int = 1 << 30     # projected cross-attention keys and values held at once


CPU_BATCHES = MicroBatches()  # the CPU path's fixed sizes: a pool's images at once, the caller's pair batch, 1 GiB
DEVICE_SHARE = 0.5            # of the free device memory, measured after loading, that micro-batches may use
MAX_IMAGES, MAX_PAIRS = 1024, 4096  # beyond these a forward is no faster per item, only longer
NOMINAL_TOKENS = 77           # caption tokens assumed when sizing (CLIP's context; pool captions are shorter)


def size_micro_batches(free_bytes: int | None, *, image_bytes: int, pair_bytes: int = 0,
                       kv_image_bytes: int = 0, share: float = DEVICE_SHARE) -> MicroBatches:
    """Micro-batches that fit `share` of `free_bytes` (None: the CPU's fixed sizes, CPU_BATCHES).

    The stages of a pool run one after another, so each may use the whole budget:
    images = budget / image_bytes; the ITM stage gives a quarter of it to the
    cross-attention cache (at least one image's keys and values) and the rest to
    pairs = (budget - cache) / pair_bytes. Every count is at least 1 and at most
    MAX_IMAGES / MAX_PAIRS. Pure: the byte figures come from `working_set_bytes`.
    """
    if free_bytes is None:
        return CPU_BATCHES
    if image_bytes < 1 or pair_bytes < 0 or kv_image_bytes < 0 or not 0 < share <= 1:
        raise ValueError(f"bad sizes: image {image_bytes}, pair {pair_bytes}, kv {kv_image_bytes}, share {share}")
    budget = int(max(free_bytes, 0) * share)
    images = min(max(budget // image_bytes, 1), MAX_IMAGES)
    if not pair_bytes:
        return MicroBatches(images=images)
    kv = max(kv_image_bytes, budget // 4)
    pairs = min(max((budget - kv) // pair_bytes, 1), MAX_PAIRS)
    return MicroBatches(images=images, pairs=pairs, kv_cache_bytes=kv)


def _tower_bytes(vision_config, elt: int, eager: bool) -> int:
    """Working set of one image in a vision tower, inference: the widest activations of a layer
    (Q, K, V and the residual, 4d, beside the MLP's i) per token, the attention scores and
    probabilities (2 x heads x n^2) when eager, and the tower's output kept for the pool."""
    v = vision_config
    n = vision_tokens(v)
    scores = 2 * v.num_attention_heads * n * n if eager else 0
    return elt * (n * (4 * v.hidden_size + v.intermediate_size) + scores + n * v.hidden_size)


def working_set_bytes(config, kind: str, elt: int, attn: str, tokens: int = NOMINAL_TOKENS) -> dict[str, int]:
    """Bytes per image, per ITM pair and per cached image of a teacher config (model_type `kind`),
    `elt` bytes per element: the figures `size_micro_batches` divides the device budget by.

    A pair holds (eager BLIP text encoder, caption of `tokens` tokens, L image tokens
    of width d_v, text width d): its gathered image states L d_v (the uncached path),
    one layer's gathered keys and values 2 L d, the cross-attention scores and
    probabilities 2 heads T L, and its text activations T (4d + i).
    """
    eager = attn != "sdpa"
    if kind == "clip":
        return {"image_bytes": _tower_bytes(config.vision_config, elt, eager)}
    t, v = config.text_config, config.vision_config
    n_img, d = vision_tokens(v), t.hidden_size
    pair = elt * (n_img * v.hidden_size + 2 * n_img * d + 2 * t.num_attention_heads * tokens * n_img
                  + tokens * (4 * d + t.intermediate_size))
    kv = elt * 2 * t.num_hidden_layers * n_img * d
    return {"image_bytes": _tower_bytes(v, elt, eager), "pair_bytes": pair, "kv_image_bytes": kv}
