"""Exported encoders (TorchScript, ONNX) give the student's own embeddings on new inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mcad.jobs.cli import main
from mcad.student.export import example_inputs, export_encoders
from mcad.student.models import build_student, export_hf, load_processor


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    from mcad.pipeline.shapes.teacher_models import make_tiny_teachers

    root = tmp_path_factory.mktemp("export")
    dual, _ = make_tiny_teachers(root / "t", ["a small red circle left of a large blue square"])
    student, processor = build_student("smoke", tokenizer_from=dual, teacher_dim=8, seed=1)
    return export_hf(student, processor, root / "run" / "model")


def _reference(model_dir):
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(model_dir).eval()
    processor = load_processor(model_dir)
    pixels = torch.rand(3, 3, clip.config.vision_config.image_size, clip.config.vision_config.image_size)
    tokens = processor.tokenizer(["a red circle", "a large blue square left of a circle", "circle"],
                                 padding="max_length", max_length=clip.config.text_config.max_position_embeddings,
                                 return_tensors="pt")
    with torch.no_grad():
        u = torch.nn.functional.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        w = torch.nn.functional.normalize(clip.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output, dim=-1)
    return clip, processor, pixels, tokens, u, w


def test_torchscript_encoders_match(student_dir, tmp_path):
    clip, processor, pixels, tokens, u, w = _reference(student_dir)
    image_file, text_file = export_encoders(clip, processor, tmp_path, "torchscript")
    image, text = torch.jit.load(str(image_file)), torch.jit.load(str(text_file))
    assert torch.allclose(image(pixels), u, atol=1e-5)
    assert torch.allclose(text(tokens["input_ids"], tokens["attention_mask"]), w, atol=1e-5)


def test_onnx_encoders_match(student_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    clip, processor, pixels, tokens, u, w = _reference(student_dir)
    image_file, text_file = export_encoders(clip, processor, tmp_path, "onnx")
    image = ort.InferenceSession(str(image_file)).run(None, {"pixel_values": pixels.numpy()})[0]
    text = ort.InferenceSession(str(text_file)).run(None, {k: tokens[k].numpy() for k in ("input_ids", "attention_mask")})[0]
    np.testing.assert_allclose(image, u.numpy(), atol=1e-4)
    np.testing.assert_allclose(text, w.numpy(), atol=1e-4)


def test_cli_exports_a_run_as_hf(student_dir, tmp_path):
    from transformers import CLIPModel

    result = CliRunner().invoke(main, ["export", "--run", str(student_dir.parent), "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert CLIPModel.from_pretrained(tmp_path / "hf").config.projection_dim == 32


def test_cli_refuses_a_folder_without_a_student(tmp_path):
    result = CliRunner().invoke(main, ["export", "--run", str(tmp_path), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no exported student" in result.output


def test_example_inputs_fit_the_model(student_dir):
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(student_dir)
    pixels, tokens = example_inputs(clip, load_processor(student_dir))
    assert pixels.shape[-1] == clip.config.vision_config.image_size
    assert tokens["input_ids"].shape[1] == clip.config.text_config.max_position_embeddings
