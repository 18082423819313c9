"""The FLOP formulas of pipeline/teacher_flops.py against torch's own count of the HF forwards."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BlipForImageTextRetrieval, CLIPModel

from mcad.pipeline.shapes.teacher_models import build_blip, build_clip, build_processors, build_tokenizers
from mcad.pipeline.teacher_flops import (blip_kv_per_image, blip_pair_flops, clip_image_flops, clip_text_flops,
                                         stage_flops_per_sample, vision_flops)


def _count(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _models():
    clip_tok, blip_tok = build_tokenizers(["a red circle left of a blue square"])
    clip_proc, _ = build_processors("smoke", clip_tok, blip_tok)
    torch.manual_seed(0)
    clip = build_clip("smoke", clip_proc).eval()
    clip.set_attn_implementation("eager")  # torch's counter skips the CPU SDPA kernel
    return clip, build_blip("smoke", blip_tok).eval()


def test_formulas_equal_torch_flop_counter():
    clip, blip = _models()
    assert isinstance(clip, CLIPModel) and isinstance(blip, BlipForImageTextRetrieval)
    side = clip.config.vision_config.image_size
    px = torch.zeros(1, 3, side, side)
    tokens = 7
    ids = torch.full((1, tokens), 3)
    ids[0, -1] = clip.config.text_config.eos_token_id
    assert _count(lambda: clip.get_image_features(pixel_values=px)) == clip_image_flops(clip.config)
    assert _count(lambda: clip.get_text_features(input_ids=ids)) == clip_text_flops(clip.config, tokens)

    bside = blip.config.vision_config.image_size
    assert _count(lambda: blip.vision_model(pixel_values=torch.zeros(1, 3, bside, bside))) == \
        vision_flops(blip.config.vision_config)
    pair = _count(lambda: blip(input_ids=ids, attention_mask=torch.ones_like(ids),
                               pixel_values=torch.zeros(1, 3, bside, bside), use_itm_head=True))
    assert pair == vision_flops(blip.config.vision_config) + blip_pair_flops(blip.config, tokens, cached=False)
    assert blip_pair_flops(blip.config, tokens, cached=False) - blip_pair_flops(blip.config, tokens, cached=True) \
        == blip_kv_per_image(blip.config)


def test_stage_flops_count_the_cache_once_per_image():
    clip, blip = _models()
    kw = dict(dual_tokens=5, single_tokens=6, pairs_per_sample=10.0, kv_images_per_sample=1.0)
    plain = stage_flops_per_sample(clip.config, blip.config, cached=False, **kw)
    cached = stage_flops_per_sample(clip.config, blip.config, cached=True, **kw)
    assert set(plain) == {"dual_image", "dual_text", "single_vision", "itm_pairs"}
    assert plain["itm_pairs"] - cached["itm_pairs"] == 9 * blip_kv_per_image(blip.config)
    assert {k: v for k, v in plain.items() if k != "itm_pairs"} == \
        {k: v for k, v in cached.items() if k != "itm_pairs"}
