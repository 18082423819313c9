"""Teacher adapters against the plain Hugging Face models they wrap (tiny random teachers)."""
from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

from helpers import noise_images
from mcad.pipeline.shapes.teacher_models import make_tiny_teachers
from mcad.pipeline.teacher_flops import MicroBatches
from mcad.pipeline.teachers import (
    TEACHERS, DualTeacher, SingleTeacher, attention_implementation, default_dtype, load_teachers,
)
from mcad.storage.errors import InputError

CAPTIONS = ["a red circle", "a small blue square left of a green triangle",
            "two large shapes", "a yellow star above a purple diamond"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    torch.set_num_threads(1)
    return make_tiny_teachers(tmp_path_factory.mktemp("teachers"), CAPTIONS)


@pytest.fixture(scope="module")
def teachers(dirs):
    return load_teachers(*dirs)


def _images(n, seed=0):
    return noise_images([(20 + 3 * i, 28) for i in range(n)], seed)


def test_registry_is_explicit():
    assert TEACHERS == {"clip": DualTeacher, "blip": SingleTeacher}


def test_dual_matches_clip_forward(dirs, teachers):
    from transformers import AutoProcessor, CLIPModel

    dual, _ = teachers
    assert dual.device.type == "cpu" and dual.dtype == torch.float32
    images = _images(4)
    v, t = dual.encode_images(images), dual.encode_texts(CAPTIONS)
    assert v.shape == t.shape == (4, dual.dim)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(4))

    model = CLIPModel.from_pretrained(dirs[0]).eval()
    inputs = AutoProcessor.from_pretrained(dirs[0])(images=images, text=CAPTIONS, padding=True,
                                                   return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    torch.testing.assert_close(v, out.image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t, out.text_embeds, atol=1e-5, rtol=1e-5)
    assert dual.logit_scale == pytest.approx(model.logit_scale.exp().item())
    torch.testing.assert_close(dual.logit_scale * v @ t.T, out.logits_per_image, atol=1e-4, rtol=1e-5)
    assert not v.requires_grad


def test_single_match_equals_itm_forward(dirs, teachers):
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    _, single = teachers
    images = _images(3, seed=1)
    states = single.encode_images(images)
    assert states.shape[0] == 3 and states.shape[2] == single.model.config.vision_config.hidden_size
    # pairs (image r % 3, text r): every image reused for several texts
    img_of = [0, 1, 2, 0]
    fused, itm = single.match(states[img_of], CAPTIONS, batch_size=3)
    assert fused.shape == (4, single.dim_fused) and itm.shape == (4,)

    model = BlipForImageTextRetrieval.from_pretrained(dirs[1]).eval()
    proc = AutoProcessor.from_pretrained(dirs[1])
    for r, i in enumerate(img_of):
        inputs = proc(images=images[i], text=CAPTIONS[r], return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs, use_itm_head=True)
        score = out.itm_score[0]
        assert itm[r].item() == pytest.approx((score[1] - score[0]).item(), abs=1e-5)
        torch.testing.assert_close(fused[r], out.question_embeds[0, 0], atol=1e-5, rtol=1e-5)


def test_identity_digests_the_files(dirs, teachers):
    dual, single = teachers
    for teacher, d in zip((dual, single), dirs):
        ident = teacher.identity()
        assert ident["config_sha256"] == hashlib.sha256((d / "config.json").read_bytes()).hexdigest()
        assert ident["weights_sha256"] == hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
        assert ident["kind"] in TEACHERS
    assert dual.identity()["weights_sha256"] != single.identity()["weights_sha256"]


def test_refuses_what_is_not_the_right_teacher(dirs, tmp_path):
    clip_dir, blip_dir = dirs
    with pytest.raises(InputError, match="expected 'clip'"):
        DualTeacher.load(blip_dir)
    with pytest.raises(InputError, match="expected 'blip'"):
        SingleTeacher.load(clip_dir)
    with pytest.raises(InputError, match="no config.json"):
        DualTeacher.load(tmp_path / "missing")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(clip_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(InputError, match="no safetensors"):
        DualTeacher.load(no_weights)


def test_refuses_blip_without_itm_head(dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    headless = tmp_path / "headless"
    shutil.copytree(dirs[1], headless)
    weights = load_file(headless / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("itm_head")},
              headless / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match="weights missing"):
        SingleTeacher.load(headless)


def test_refuses_missing_tokenizer_and_corrupt_weights(dirs, tmp_path):
    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(dirs[0], no_tok)
    for f in no_tok.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(InputError, match="no tokenizer files"):
        DualTeacher.load(no_tok)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(dirs[1], corrupt)
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="cannot load"):
        SingleTeacher.load(corrupt)


def test_cached_match_equals_plain_pairs(dirs, teachers):
    """image_index: each image's cross-attention keys and values once, shared by its pairs;
    the same fused [CLS] and ITM logits as the full HF forward on every pair's pixels."""
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    _, single = teachers
    images = _images(3, seed=2)
    states = single.encode_images(images)
    img_of = torch.tensor([0, 1, 0, 2, 1, 0])
    texts = [CAPTIONS[r % 4] for r in range(6)]
    tokens = single.tokenize(texts)
    fused, itm = single.match_tokens(states, tokens, image_index=img_of, batch_size=4)
    plain = single.match_tokens(states[img_of], tokens, batch_size=4)
    torch.testing.assert_close((fused, itm), plain, atol=1e-5, rtol=1e-5)

    model = BlipForImageTextRetrieval.from_pretrained(dirs[1]).eval()
    inputs = AutoProcessor.from_pretrained(dirs[1])(images=[images[i] for i in img_of], text=texts,
                                                     padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, use_itm_head=True)
    torch.testing.assert_close(itm, out.itm_score[:, 1] - out.itm_score[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, out.question_embeds[:, 0], atol=1e-5, rtol=1e-5)


def test_cache_groups_respect_the_memory_cap(dirs, teachers, monkeypatch):
    # One image's keys and values per cached forward: every pair still scored, in order.
    _, single = teachers
    states = single.encode_images(_images(3, seed=3))
    img_of = torch.tensor([2, 2, 0, 1, 1, 0])
    tokens = single.tokenize([CAPTIONS[r % 4] for r in range(6)])
    want = single.match_tokens(states, tokens, image_index=img_of)
    monkeypatch.setattr(single, "batches", MicroBatches(kv_cache_bytes=1))
    torch.testing.assert_close(single.match_tokens(states, tokens, image_index=img_of), want,
                               atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(single, "cross_kv_cache", False)
    torch.testing.assert_close(single.match_tokens(states, tokens, image_index=img_of), want,
                               atol=1e-5, rtol=1e-5)


class _StatesIn(torch.nn.Module):
    """A vision tower stand-in that returns its input as the last hidden state."""

    def forward(self, pixel_values, **_):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(last_hidden_state=pixel_values)


def test_cached_itm_equals_hf_forward_at_base_size():
    """BLIP base (BlipConfig(): 12 text layers, 577 image tokens), random weights, float32:
    the cached path against BlipForImageTextRetrieval(..., use_itm_head=True) on pairs
    from three images; the HF forward's vision tower is fed the same states."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(BlipConfig()).eval()
    single = SingleTeacher(model, None, None)
    cfg = model.config
    states = torch.randn(3, (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 + 1,
                         cfg.vision_config.hidden_size)
    img_of = torch.tensor([0, 0, 1, 2, 2, 0])
    ids = torch.randint(1000, 2000, (6, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = mask[4, 5:] = 0
    fused, itm = single.match_tokens(states, {"input_ids": ids, "attention_mask": mask}, image_index=img_of)

    model.vision_model = _StatesIn()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=states[img_of], use_itm_head=True)
    assert (itm - (out.itm_score[:, 1] - out.itm_score[:, 0])).abs().max() < 1e-4
    assert (fused - out.question_embeds[:, 0]).abs().max() < 1e-4


# ---------------------------------------------------------- the accelerator path

def test_dtype_bfloat16_on_cuda_float16_without_it_float32_on_cpu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_dtype(cpu) == torch.float32
    assert default_dtype(cpu, torch.bfloat16) == torch.bfloat16 and default_dtype(cuda, torch.float32) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation
                        and bf16)
    bf16 = True
    assert default_dtype(cuda) == torch.bfloat16
    bf16 = False  # e.g. V100, T4: no native bfloat16 (emulated does not count)
    assert default_dtype(cuda) == torch.float16


def test_clip_loads_with_sdpa_blip_stays_eager(dirs, teachers):
    """transformers 5.24: CLIPModel has an SDPA path, BlipForImageTextRetrieval has none (asking raises)."""
    from transformers import BlipForImageTextRetrieval, CLIPModel

    dual, single = teachers
    assert attention_implementation(CLIPModel) == dual.attn_implementation == "sdpa"
    assert attention_implementation(BlipForImageTextRetrieval) == single.attn_implementation
    if not BlipForImageTextRetrieval._supports_sdpa:
        assert single.attn_implementation == "eager"
        with pytest.raises(ValueError, match="scaled_dot_product_attention"):
            BlipForImageTextRetrieval.from_pretrained(dirs[1], attn_implementation="sdpa")
    # SDPA changes the kernel, not the result
    eager = CLIPModel.from_pretrained(dirs[0], attn_implementation="eager").eval()
    images = _images(3, seed=4)
    inputs = dual.processor(images=images, text=CAPTIONS[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = eager(**inputs)
    torch.testing.assert_close(dual.encode_images(images), out.image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dual.encode_texts(CAPTIONS[:3]), out.text_embeds, atol=1e-5, rtol=1e-5)


def test_micro_batches_split_without_changing_results(dirs, teachers, monkeypatch):
    dual, single = teachers
    images = _images(5, seed=5)
    texts = [CAPTIONS[r % 4] for r in range(5)]
    states = single.encode_images(images)
    img_of = torch.tensor([0, 1, 1, 2, 4, 3, 0])
    tokens = single.tokenize([CAPTIONS[r % 4] for r in range(7)])
    want = (dual.encode_images(images), dual.encode_texts(texts), states,
            single.match_tokens(states, tokens, image_index=img_of))
    for teacher in (dual, single):
        monkeypatch.setattr(teacher, "batches", MicroBatches(images=2, pairs=3))
    got = (dual.encode_images(images), dual.encode_texts(texts), single.encode_images(images),
           single.match_tokens(states, tokens, image_index=img_of))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert single.pair_batch() == 3 and single.pair_batch(64) == 64
    with pytest.raises(ValueError, match="no images"):
        dual.encode_images([])
