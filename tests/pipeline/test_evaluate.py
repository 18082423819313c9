"""`pipeline.evaluate` and `mcad eval` on a tiny shapes test split with random smoke teachers."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, invoke, write_tar
from mcad.pipeline.evaluate import evaluate, evaluate_student, recall_table
from mcad.pipeline.shard_list import list_shards
from mcad.pipeline.shards import Sample, iter_shard
from mcad.pipeline.shapes.world import VOCABULARY
from mcad.pipeline.shapes.synth import SynthConfig, write_benchmark
from mcad.pipeline.shapes.teacher_models import make_tiny_teachers
from mcad.pipeline.teachers import DualTeacher, SingleTeacher
from mcad.storage.errors import InputError
from mcad.student.metrics import recall_at_k, rerank_recalls, top_k
from mcad.student.models import build_student, export_hf


N_TEST = 10
EVAL_KEYS = {"i2t", "t2i", "rsum", "n_images", "n_texts", "n_rejected", "rejected"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    write_benchmark(SynthConfig(train=4, val=2, test=N_TEST, shard_size=4), root / "data")
    dual, single = make_tiny_teachers(root / "teachers", [" ".join(VOCABULARY)])
    return {"root": root, "test": root / "data" / "test", "dual": dual, "single": single}


def _well_formed(r: dict, n_images: int = N_TEST) -> None:
    assert EVAL_KEYS <= set(r)
    assert r["n_images"] == n_images and r["n_texts"] == 5 * n_images  # the 5-caption protocol
    for d in ("i2t", "t2i"):
        assert set(r[d]) == {"R@1", "R@5", "R@10"}  # the JSON file sorts keys
        values = [r[d][f"R@{k}"] for k in (1, 5, 10)]
        assert all(0 <= v <= 100 for v in values) and values == sorted(values)
    assert r["rsum"] == pytest.approx(sum(r["i2t"].values()) + sum(r["t2i"].values()), abs=0.02)


def _split(path):
    samples = [s for shard in list_shards(path) for s in iter_shard(shard) if isinstance(s, Sample)]
    captions = [c for s in samples for c in s.captions]
    owner = np.repeat(np.arange(len(samples)), [len(s.captions) for s in samples])
    return [s.image for s in samples], captions, owner


def test_dual_teacher_recall_is_the_metric_of_its_logits(bench):
    r = evaluate(bench["dual"], bench["test"], batch_size=3)  # batches cross shard boundaries
    _well_formed(r)
    assert r["n_rejected"] == 0 and r["rejected"] == {}
    images, captions, owner = _split(bench["test"])
    dual = DualTeacher.load(bench["dual"])
    logits = dual.logit_scale * dual.encode_images(images) @ dual.encode_texts(captions).T
    assert {k: r[k] for k in ("i2t", "t2i", "rsum")} == {
        k: v for k, v in recall_at_k(logits.double().numpy(), owner).items() if k in ("i2t", "t2i", "rsum")}


def test_single_teacher_reranks_the_dual_top_k(bench):
    k, beta = 4, 0.5
    r = evaluate(bench["dual"], bench["test"], single=bench["single"], rerank_k=k, beta=beta, batch_size=3)
    assert set(r) == {"dual", "single", "combined"}
    for name in r:
        _well_formed(r[name])
    assert r["single"]["rerank_k"] == r["combined"]["rerank_k"] == k and r["combined"]["beta"] == beta
    assert (r["single"]["i2t"], r["single"]["t2i"]) != (r["dual"]["i2t"], r["dual"]["t2i"])  # ITM re-orders

    # the same figures from the ITM head run on EVERY pair, without the streaming second pass
    images, captions, owner = _split(bench["test"])
    dual, single = DualTeacher.load(bench["dual"]), SingleTeacher.load(bench["single"])
    logits = (dual.logit_scale * dual.encode_images(images) @ dual.encode_texts(captions).T).double().numpy()
    states = single.encode_images(images)
    n_i, n_t = logits.shape
    pi, pt = np.repeat(np.arange(n_i), n_t), np.tile(np.arange(n_t), n_i)
    _, m = single.match(states[torch.from_numpy(pi)], [captions[j] for j in pt])
    itm = m.double().numpy().reshape(n_i, n_t)
    i2t_idx, t2i_idx = top_k(logits, k), top_k(logits.T, k)
    want = rerank_recalls(logits, owner, i2t_idx=i2t_idx, i2t_itm=np.take_along_axis(itm, i2t_idx, 1),
                          t2i_idx=t2i_idx, t2i_itm=np.take_along_axis(itm.T, t2i_idx, 1), beta=beta)
    for name in want:
        for d in ("i2t", "t2i"):
            for key, value in want[name][d].items():
                assert r[name][d][key] == pytest.approx(value, abs=1e-9), (name, d, key)


def test_default_beta_and_a_student_export(bench, tmp_path):
    student, processor = build_student("smoke", tokenizer_from=bench["dual"], teacher_dim=32)
    out = export_hf(student, processor, tmp_path / "student")
    r = evaluate(out, bench["test"], single=bench["single"])
    assert r["combined"]["beta"] == 1.0 and r["single"]["rerank_k"] == 16
    _well_formed(r["dual"])
    assert "dual" in recall_table(r) and "combined" in recall_table(r)

    # in training (no export): the same figures, and the student keeps its train mode
    student.train()
    live = evaluate_student(student, processor, bench["test"], batch_size=4)
    assert student.training
    assert live == r["dual"]


def test_rejected_samples_are_counted_not_dropped(bench, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(bench["test"], data)
    write_tar(data / "zz-broken.tar", [("bad1.jpg", b"not a jpeg"), ("bad1.txt", b"a red circle"),
                                       ("bad2.txt", b"a caption without an image")])
    r = evaluate(bench["dual"], data)
    _well_formed(r)
    assert r["n_rejected"] == 2 and r["rejected"] == {"corrupt_image": 1, "no_image": 1}


def test_bad_inputs_are_input_errors(bench, tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        evaluate(tmp_path, bench["test"])
    with pytest.raises(InputError, match="model_type is 'blip'"):
        evaluate(bench["single"], bench["test"])
    with pytest.raises(InputError, match="needs a single teacher"):
        evaluate(bench["dual"], bench["test"], beta=1.0)
    with pytest.raises(InputError, match="rerank k"):
        evaluate(bench["dual"], bench["test"], single=bench["single"], rerank_k=0)
    with pytest.raises(InputError, match="shard not found"):
        evaluate(bench["dual"], tmp_path / "nothing.tar")
    empty = tmp_path / "empty"
    empty.mkdir()
    write_tar(empty / "a.tar", [("x.txt", b"x")])
    with pytest.raises(InputError, match="no usable samples"):
        evaluate(bench["dual"], empty)


# --------------------------------------------------------------------- CLI

def mcad(*args):
    return invoke("eval", *args)


def test_cli_help_has_examples():
    result = mcad("--help")
    assert result.exit_code == 0 and "Examples:" in result.output
    assert "mcad eval --model" in result.output


def test_cli_writes_the_eval_json_and_its_config(bench, tmp_path):
    out = tmp_path / "res" / "eval.json"
    result = mcad("--model", bench["dual"], "--data", bench["test"], "--single", bench["single"],
                  "--rerank-k", 3, "--json", out)
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert set(figures) == {"dual", "single", "combined"}
    _well_formed(figures["combined"])
    config = json.loads((tmp_path / "res" / "eval.config.json").read_text())
    assert config["rerank_k"] == 3 and config["beta"] == 1.0 and len(config["shards"]) == 3
    assert "combined" in result.stdout and "R@10" in result.stdout

    plain = mcad("--model", bench["dual"], "--data", bench["test"], "--json", tmp_path / "plain.json")
    assert plain.exit_code == 0, plain.output
    _well_formed(json.loads((tmp_path / "plain.json").read_text()))


def test_cli_beta_defaults_to_the_one_chosen_on_val_beside_the_teachers(bench, tmp_path):
    """Shipped teachers carry the beta chosen on val (teacher_recall.json): eval uses it unless told."""
    teachers = tmp_path / "teachers"
    teachers.mkdir()
    (teachers / "single").symlink_to(bench["single"])
    (teachers / "teacher_recall.json").write_text(json.dumps({"beta": 0.25}))
    for extra, beta in (([], 0.25), (["--beta", "2"], 2.0)):
        out = tmp_path / f"eval{beta}.json"
        result = mcad("--model", bench["dual"], "--data", bench["test"], "--single", teachers / "single",
                      "--rerank-k", 3, "--json", out, *extra)
        assert result.exit_code == 0, result.output
        assert json.loads(out.read_text())["combined"]["beta"] == beta
        assert json.loads((tmp_path / f"eval{beta}.config.json").read_text())["beta"] == beta


@pytest.mark.parametrize("args,needle", [
    (["--model", "{tmp}"], "no config.json"),
    (["--model", "{single}"], "model_type is 'blip'"),
    (["--model", "{dual}", "--beta", "1"], "need --single"),
    (["--model", "{dual}", "--single", "{tmp}"], "single teacher"),
])
def test_cli_bad_input_exits_2_with_one_line(bench, tmp_path, args, needle):
    args = [a.format(tmp=tmp_path, single=bench["single"], dual=bench["dual"]) for a in args]
    assert_one_line_error(mcad(*args, "--data", bench["test"]), needle)


def test_recall_table_is_one_table_for_eval_and_demo():
    r = {"i2t": {"R@1": 50.0, "R@5": 90.0, "R@10": 100.0}, "t2i": {"R@1": 25.5, "R@5": 80.0, "R@10": 95.0},
         "rsum": 440.5, "n_images": 4, "n_texts": 20}
    short = recall_table({"model": r}).splitlines()
    assert short[0].startswith("model" + " " * 7 + "i2t R@1") and short[1].split() == [
        "model", "50.00", "90.00", "100.00", "25.50", "80.00", "95.00", "440.50", "4", "20"]
    demo = recall_table({"teacher combined": r, "student mcad": r}).splitlines()
    assert len({len(line) for line in demo}) == 1  # columns stay aligned past ten characters
    assert demo[1].startswith("teacher combined ") and demo[2].startswith("student mcad     ")
