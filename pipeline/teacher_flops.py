"""FLOPs of the teacher pass's model stages, counted from the teachers' configs.

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
pair batch) instead of once per pair. Plain Python on the config objects:
nothing heavy is imported.
"""
from __future__ import annotations


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
