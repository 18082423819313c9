"""Small HF teachers from configs: plain-transformers round trip, CLIP eos pooling, BLIP ITM."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, BlipForImageTextRetrieval, CLIPModel

from mcad.pipeline.shapes.teacher_models import (
    SIZES,
    build_blip,
    build_clip,
    build_processors,
    build_tokenizers,
    get_size,
    make_tiny_teachers,
    save_teacher,
)
from mcad.pipeline.shapes import DEMO_TEACHERS
from mcad.storage.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")


CAPTIONS = [
    "a small red circle left of a large blue square",
    "a large green star",
    "a blue triangle above a red square and a small green star",
    "a small yellow square below a large purple circle",
]


def _images(n: int, px: int = 32) -> list[Image.Image]:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    return [Image.new("RGB", (px, px), colours[i % 4]) for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_teachers(tmp_path_factory.mktemp("teachers"), CAPTIONS, seed=0)


def test_tokenizers_one_token_per_training_word_and_eos_not_2():
    clip_tok, blip_tok = build_tokenizers(CAPTIONS)
    ids = clip_tok(CAPTIONS[0]).input_ids
    assert ids[0] == clip_tok.bos_token_id and ids[-1] == clip_tok.eos_token_id
    assert len(ids) == len(CAPTIONS[0].split()) + 2
    assert clip_tok.eos_token_id != 2 and clip_tok.pad_token_id == clip_tok.eos_token_id
    bert_ids = blip_tok(CAPTIONS[2]).input_ids
    assert len(bert_ids) == len(CAPTIONS[2].split()) + 2
    assert blip_tok.unk_token_id not in bert_ids
    # unseen words are spelled out, never unknown (for CLIP, unk would be eos)
    assert clip_tok.eos_token_id not in clip_tok("a zebra!").input_ids[1:-1]
    assert blip_tok.unk_token_id not in blip_tok("a zebra").input_ids
    long = clip_tok(["a " * 60], truncation=True, padding="max_length").input_ids[0]
    assert len(long) == 24 and long[-1] == clip_tok.eos_token_id


def test_bad_input_is_input_error():
    with pytest.raises(InputError):
        get_size("huge")
    with pytest.raises(InputError):
        build_tokenizers(["", "  "])


def test_round_trip_with_plain_transformers(tiny):
    dual, single = tiny
    for folder in (dual, single):
        config = json.loads((folder / "config.json").read_text())
        assert "auto_map" not in config  # no remote code: plain transformers loads it
    clip = CLIPModel.from_pretrained(dual).eval()
    blip = BlipForImageTextRetrieval.from_pretrained(single).eval()
    clip_proc, blip_proc = AutoProcessor.from_pretrained(dual), AutoProcessor.from_pretrained(single)
    px = SIZES["smoke"].image_size
    x = clip_proc(text=CAPTIONS, images=_images(4, 48), return_tensors="pt", padding=True)
    assert x["pixel_values"].shape == (4, 3, px, px)
    with torch.no_grad():
        assert clip(**x).logits_per_image.shape == (4, 4)
        y = blip_proc(text=CAPTIONS, images=_images(4, 48), return_tensors="pt", padding=True)
        out = blip(**y)
        assert out.itm_score.shape == (4, 2)
        assert blip(**y, use_itm_head=False).itm_score.shape == (4, 4)  # ITC similarities
    # the saved weights are the loaded weights
    saved = load_file(str(single / "model.safetensors"))
    for name, tensor in blip.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], tensor), name


def test_clip_pools_at_eos(tiny):
    clip = CLIPModel.from_pretrained(tiny[0]).eval()
    tok = AutoProcessor.from_pretrained(tiny[0]).tokenizer

    def embed(texts, **pad):
        enc = tok(texts, return_tensors="pt", **pad)
        with torch.no_grad():
            return clip.get_text_features(**enc).pooler_output

    short = embed([CAPTIONS[1]], padding="longest")
    padded = embed([CAPTIONS[1]], padding="max_length", max_length=20)
    torch.testing.assert_close(short, padded)
    last_word = embed(["a large green circle"], padding="longest")
    assert (short - last_word).abs().max() > 1e-4


def test_seeded_builds_are_deterministic(tmp_path):
    a = make_tiny_teachers(tmp_path / "a", CAPTIONS, seed=3)
    b = make_tiny_teachers(tmp_path / "b", CAPTIONS, seed=3)
    c = make_tiny_teachers(tmp_path / "c", CAPTIONS, seed=4)
    for i in (0, 1):
        wa, wb, wc = (load_file(str(d[i] / "model.safetensors")) for d in (a, b, c))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert any(not torch.equal(wa[k], wc[k]) for k in wa)
        assert (a[i] / "tokenizer.json").read_text() == (b[i] / "tokenizer.json").read_text()


def test_float16_save_leaves_model_alone(tmp_path):
    clip_tok, blip_tok = build_tokenizers(CAPTIONS)
    clip_proc, _ = build_processors("smoke", clip_tok, blip_tok)
    model = build_clip("smoke", clip_proc)
    clip_tok(CAPTIONS, padding=True, truncation=True)  # leaves state on the backend tokenizer
    save_teacher(model, clip_proc, tmp_path / "fp16", dtype=torch.float16)
    saved = json.loads((tmp_path / "fp16" / "tokenizer.json").read_text())
    assert saved["truncation"] is None and saved["padding"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "max_length is ignored" warning on plain padding
        AutoProcessor.from_pretrained(tmp_path / "fp16")(text=CAPTIONS, images=_images(4), padding=True)
    assert next(model.parameters()).dtype == torch.float32
    loaded = CLIPModel.from_pretrained(tmp_path / "fp16", dtype=torch.float32)
    ref = model.text_model.embeddings.token_embedding.weight
    got = loaded.text_model.embeddings.token_embedding.weight
    torch.testing.assert_close(got, ref.half().float())


def test_blip_config_traps_are_set():
    _, blip_tok = build_tokenizers(CAPTIONS)
    blip = build_blip("smoke", blip_tok)
    assert blip.config.text_config.is_decoder  # cross-attention layers exist
    assert blip.text_encoder.encoder.layer[0].crossattention is not None
    assert blip.vision_model.embeddings.class_embedding.std() > 1e-3  # not the 1e-10 default


DEMO = DEMO_TEACHERS


@pytest.mark.skipif(not (DEMO / "dual").is_dir(), reason="demo teachers not shipped in this checkout")
def test_shipped_demo_teachers_load_and_see_colours():
    from mcad.pipeline.shapes.world import COLOURS, Obj, Scene, render

    clip = CLIPModel.from_pretrained(DEMO / "dual", dtype=torch.float32).eval()
    blip = BlipForImageTextRetrieval.from_pretrained(DEMO / "single", dtype=torch.float32).eval()
    clip_proc, blip_proc = AutoProcessor.from_pretrained(DEMO / "dual"), AutoProcessor.from_pretrained(DEMO / "single")
    assert load_file(str(DEMO / "dual" / "model.safetensors"))["logit_scale"].dtype == torch.float16
    assert clip.config.text_config.eos_token_id != 2
    captions = [f"a large {c} circle" for c in COLOURS]
    for k, colour in enumerate(COLOURS):
        image = render(Scene((Obj(colour, "circle", "large", 24, 24),), 48))
        with torch.no_grad():
            dual = clip(**clip_proc(text=captions, images=[image], return_tensors="pt", padding=True))
            itm = blip(**blip_proc(text=captions, images=[image] * len(captions), return_tensors="pt",
                                   padding=True)).itm_score
        assert dual.logits_per_image[0].argmax() == k
        assert (itm[:, 1] - itm[:, 0]).argmax() == k
