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


# ------------------------------------------------- real-size architectures

def test_registry_has_the_public_shapes():
    """Architecture, not weights: the numbers of the public checkpoints' config.json."""
    from transformers import BertTokenizer

    from mcad.pipeline.shapes.teacher_models import ARCHITECTURES, REAL_SIZES, TEACHER_SIZES, architecture_config

    assert TEACHER_SIZES == ("smoke", "demo", "base", "large")
    assert REAL_SIZES == {"base": ("clip-vit-b16", "blip-itm-base"), "large": ("clip-vit-l14", "blip-itm-large")}
    clip_tok, blip_tok = build_tokenizers(["a red circle"])
    want = {  # name: (vision hidden, layers, image px, patch, text hidden, projection)
        "clip-vit-b16": (768, 12, 224, 16, 512, 512), "clip-vit-l14": (1024, 24, 224, 14, 768, 768),
        "blip-itm-base": (768, 12, 384, 16, 768, 512), "blip-itm-large": (1024, 24, 384, 16, 768, 512)}
    for name, (vh, vl, px, patch, th, proj) in want.items():
        cfg = architecture_config(name, clip_tok if name.startswith("clip") else blip_tok)
        v, t = cfg.vision_config, cfg.text_config
        assert (v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size, t.hidden_size,
                cfg.projection_dim) == (vh, vl, px, patch, th, proj), name
        assert t.vocab_size == ARCHITECTURES[name]["text"]["vocab_size"]
    blip = architecture_config("blip-itm-large", blip_tok).text_config
    assert blip.is_decoder and blip.encoder_hidden_size == 1024 and blip.vocab_size == 30524
    with pytest.raises(InputError, match="tokenizer has"):
        architecture_config("blip-itm-base", BertTokenizer(vocab={f"w{i}": i for i in range(30600)}))


def _shrunk(monkeypatch):
    """Registry entries cut to one thin layer (same kinds, same build and save code): seconds, not GBs."""
    from mcad.pipeline.shapes import teacher_models

    thin = {}
    for name, arch in teacher_models.ARCHITECTURES.items():
        small = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2)
        text = {**arch["text"], **small, "vocab_size": 1024}
        if "encoder_hidden_size" in text:
            text["encoder_hidden_size"] = 32
        thin[name] = {**arch, "projection_dim": 32, "text": text,
                      "vision": {**arch["vision"], **small, "image_size": 32, "patch_size": 8}}
    monkeypatch.setattr(teacher_models, "ARCHITECTURES", thin)


def test_registry_dirs_load_like_any_checkpoint(tmp_path, monkeypatch):
    """A registry-built dir goes through load_teachers and its checks exactly as a
    checkpoint saved by plain transformers (as the Hub's are) does."""
    from mcad.pipeline.shapes.teacher_models import make_real_teachers
    from mcad.pipeline.teachers import load_teachers

    _shrunk(monkeypatch)
    dual_dir, single_dir = make_real_teachers(tmp_path / "reg", ["a red circle", "a blue square"], "base")
    dual, single = load_teachers(dual_dir, single_dir)
    # The same models saved the plain way: model.save_pretrained + processor.save_pretrained.
    plain = tmp_path / "plain"
    for teacher, name in ((dual, "dual"), (single, "single")):
        teacher.model.save_pretrained(plain / name)
        teacher.processor.save_pretrained(plain / name)
    dual2, single2 = load_teachers(plain / "dual", plain / "single")
    for a, b in ((dual, dual2), (single, single2)):
        ia, ib = a.identity(), b.identity()
        assert (ia["kind"], ia["architecture"]) == (ib["kind"], ib["architecture"])
        assert ia["weights_sha256"] == ib["weights_sha256"]
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    torch.testing.assert_close(dual.encode_images([image]), dual2.encode_images([image]))
    assert single.encode_images([image]).shape[1] == (32 // 8) ** 2 + 1
    # The loader's refusals hold for registry dirs too.
    (single_dir / "vocab.txt").unlink(missing_ok=True)
    (single_dir / "tokenizer.json").unlink(missing_ok=True)
    with pytest.raises(InputError, match="no tokenizer files"):
        load_teachers(dual_dir, single_dir)


@pytest.mark.slow
def test_base_registry_teachers_load(tmp_path):
    """The full-size base teachers (about 1.4 GB on disk) build, save and load."""
    from mcad.pipeline.shapes.teacher_models import make_real_teachers
    from mcad.pipeline.teachers import load_teachers

    dual, single = load_teachers(*make_real_teachers(tmp_path, ["a red circle"], "base"))
    assert dual.model.config.vision_config.image_size == 224 and dual.dim == 512
    assert single.encode_images([Image.new("RGB", (48, 48))]).shape == (1, 577, 768)
