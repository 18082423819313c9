"""Student presets, the Student module, HF export round trip and cost, on a tiny random teacher dir."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from helpers import noise_images
from mcad.storage.errors import InputError
from mcad.student.models import (
    MAX_LOGIT_SCALE,
    PRESETS,
    ClipSize,
    Student,
    build_student,
    clip_config,
    export_hf,
    get_preset,
    image_size,
    load_processor,
    model_cost,
)

CAPTIONS = ["a small red circle left of a large blue square", "the large green star above a small white diamond",
            "a yellow triangle", "a purple square below a red star and a small blue circle"]


@pytest.fixture(scope="module")
def dual_dir(tmp_path_factory):
    from mcad.pipeline.shapes.teacher_models import make_tiny_teachers  # tests may use pipeline; student/ may not

    torch.set_num_threads(1)
    dual, _ = make_tiny_teachers(tmp_path_factory.mktemp("teachers"), CAPTIONS)
    return dual


def _images(n, side=40, seed=0):
    return noise_images([(side, side + 3 * i) for i in range(n)], seed)


def test_presets_are_an_explicit_registry():
    assert set(PRESETS) == {"smoke", "s", "m"}
    assert all(isinstance(p, ClipSize) for p in PRESETS.values())
    assert get_preset("s") is PRESETS["s"]
    with pytest.raises(InputError, match="unknown student size 'xl'"):
        get_preset("xl")


def test_one_config_builder_for_students_and_teachers(dual_dir):
    # The small teachers build their CLIP with the students' clip_config; a size that
    # names an image side must agree with the processor it is built on.
    from mcad.pipeline.shapes.teacher_models import SIZES, build_clip

    processor = load_processor(dual_dir)
    teacher = SIZES["smoke"]
    assert isinstance(teacher, ClipSize) and teacher.image_size == image_size(processor.image_processor)
    assert build_clip("smoke", processor).config.to_dict() == clip_config(teacher, processor).to_dict()
    with pytest.raises(InputError, match="px"):
        clip_config(dataclasses.replace(teacher, image_size=teacher.image_size + 8), processor)


def test_student_reads_the_teachers_inputs(dual_dir):
    from transformers import CLIPModel

    teacher = CLIPModel.from_pretrained(dual_dir)
    student, processor = build_student("smoke", tokenizer_from=dual_dir, teacher_dim=48)
    assert isinstance(student, Student) and isinstance(student.clip, CLIPModel)
    tc, sc = teacher.config.text_config, student.clip.config.text_config
    for name in ("vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(sc, name) == getattr(tc, name), name
    assert sc.eos_token_id == processor.tokenizer.eos_token_id != 2
    assert student.clip.config.vision_config.image_size == teacher.config.vision_config.image_size
    assert student.clip.config.projection_dim == student.dim == PRESETS["smoke"].proj_dim
    assert student.head_image.out_features == student.head_text.out_features == student.teacher_dim == 48


def test_encoders_pool_at_the_first_eos_and_normalise(dual_dir):
    student, processor = build_student("smoke", tokenizer_from=dual_dir, teacher_dim=16)
    student.eval()
    tok = processor.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    px = processor(images=_images(3), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        u, w = student.encode_images(px), student.encode_texts(tok["input_ids"], tok["attention_mask"])
        out = student.clip(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=px)
    assert u.shape == (3, student.dim) and w.shape == (4, student.dim)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(u, out.image_embeds)
    torch.testing.assert_close(w, out.text_embeds)
    # Padding after the eos must not change a text's embedding (pooling at the first eos, not the last token).
    one = processor.tokenizer(CAPTIONS[2:3], return_tensors="pt")
    with torch.no_grad():
        alone = student.encode_texts(one["input_ids"], one["attention_mask"])
    torch.testing.assert_close(alone[0], w[2], atol=1e-5, rtol=1e-5)


def test_forward_heads_and_logit_scale(dual_dir):
    student, processor = build_student("smoke", tokenizer_from=dual_dir, teacher_dim=20)
    tok = processor.tokenizer(CAPTIONS[:2], padding=True, return_tensors="pt")
    px = processor(images=_images(2), return_tensors="pt")["pixel_values"]
    out = student(px, tok["input_ids"], tok["attention_mask"])
    assert out["image_head"].shape == out["text_head"].shape == (2, 20)
    torch.testing.assert_close(out["image_head"], student.head_image(out["image"]))
    assert out["logit_scale"].item() == pytest.approx(student.clip.logit_scale.exp().item())
    (out["image_head"].sum() + out["logit_scale"]).backward()
    assert student.head_image.weight.grad is not None and student.clip.logit_scale.grad is not None
    with torch.no_grad():
        student.clip.logit_scale.fill_(10.0)  # exp(10) >> 100
    assert student.logit_scale.item() == MAX_LOGIT_SCALE


def test_seed_makes_weights_reproducible_without_touching_the_global_rng(dual_dir):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, _ = build_student("smoke", tokenizer_from=dual_dir, teacher_dim=8, seed=3)
    assert torch.equal(torch.rand(1), before)
    b, _ = build_student("smoke", tokenizer_from=dual_dir, teacher_dim=8, seed=3)
    c, _ = build_student("smoke", tokenizer_from=dual_dir, teacher_dim=8, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_hf_export_round_trip(dual_dir, tmp_path):
    from transformers import AutoProcessor, CLIPModel

    student, processor = build_student("smoke", tokenizer_from=dual_dir, teacher_dim=16, seed=1)
    student.eval()
    out = export_hf(student, processor, tmp_path / "export", extra={"preset": "smoke"})
    assert json.loads((out / "mcad_student.json").read_text()) == {"preset": "smoke"}

    clip = CLIPModel.from_pretrained(out).eval()
    proc = AutoProcessor.from_pretrained(out)
    images = _images(3)
    inputs = proc(images=images, text=CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = clip(**inputs)
        u = student.encode_images(processor(images=images, return_tensors="pt")["pixel_values"])
        tok = processor.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
        w = student.encode_texts(tok["input_ids"], tok["attention_mask"])
    torch.testing.assert_close(got.image_embeds, u)
    torch.testing.assert_close(got.text_embeds, w)
    # the heads are dropped: nothing of them in the saved weights
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "head_" in k]

    # and the export starts a new student (init) with the same weights
    again, _ = build_student(None, tokenizer_from=out, init=out, teacher_dim=16)
    sd, sd2 = student.clip.state_dict(), again.clip.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_init_must_fit_the_tokenizer(dual_dir, tmp_path):
    with pytest.raises(InputError, match="exactly one"):
        build_student("smoke", tokenizer_from=dual_dir, init=dual_dir, teacher_dim=8)
    with pytest.raises(InputError, match="no config.json"):
        build_student(None, tokenizer_from=dual_dir, init=tmp_path, teacher_dim=8)
    # a CLIP with a different image size does not read this processor's images
    student, processor = build_student("smoke", tokenizer_from=dual_dir, teacher_dim=8)
    processor.image_processor.crop_size = {"height": 16, "width": 16}
    processor.image_processor.size = {"shortest_edge": 16}
    other = tmp_path / "other"
    export_hf(student, processor, other)
    with pytest.raises(InputError, match="images are 16 px, the model takes 32"):
        build_student(None, tokenizer_from=other, init=dual_dir, teacher_dim=8)
    with pytest.raises(InputError, match="not a directory"):
        build_student("smoke", tokenizer_from=tmp_path / "missing", teacher_dim=8)


def test_model_cost_is_positive_and_grows_with_the_preset(dual_dir):
    small, processor = build_student("smoke", tokenizer_from=dual_dir, teacher_dim=8)
    bigger, _ = build_student("s", tokenizer_from=dual_dir, teacher_dim=8)
    a, b = model_cost(small, processor), model_cost(bigger.clip, processor)
    for key in ("params_vision", "params_text", "params_total", "flops_per_image", "flops_per_caption"):
        assert 0 < a[key] < b[key], key
    # heads are not counted: the total is the exported CLIPModel's
    assert a["params_total"] == sum(p.numel() for p in small.clip.parameters())
    assert a["params_vision"] + a["params_text"] + 1 == a["params_total"]  # + the logit scale
    # the count by hand (2 per multiply-add): patch conv, q/k/v/out and MLP per token,
    # the two attention products, the projection of the pooled token
    size = PRESETS["smoke"]
    h, i, d = size.hidden, size.intermediate, size.proj_dim
    n_tok = (a["image_size"] // size.patch_size) ** 2 + 1

    def tower(n, conv, layers):
        return conv + layers * (2 * n * h * h * 4 + 2 * n * h * i * 2 + 2 * 2 * n * n * h) + 2 * h * d

    patches = 2 * 3 * size.patch_size ** 2 * h * (n_tok - 1)
    assert a["flops_per_image"] == tower(n_tok, patches, size.vision_layers)
    assert a["flops_per_caption"] == tower(a["text_length"], 0, size.text_layers)
    assert small.clip.config._attn_implementation == "sdpa"  # measured on a copy; the model is untouched
