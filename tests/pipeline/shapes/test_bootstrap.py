"""Teacher bootstrap: recall maths against naive loops, training steps that learn, the CLI end to end."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoProcessor, BlipForImageTextRetrieval, CLIPModel

from mcad.pipeline.shapes.bootstrap import BETAS, BootstrapConfig, _batches, _hard_negatives, blip_step, choose_beta, dual_logits, teacher_recall, train_clip
from mcad.pipeline.shapes.bootstrap_data import Encoded, Split, split_from_samples
from mcad.pipeline.shapes.teacher_models import build_blip, build_clip, build_processors, build_tokenizers
from mcad.storage.errors import InputError
from mcad.student.metrics import recall_at_k

pytestmark = pytest.mark.usefixtures("one_thread")


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "white": (255, 255, 255), "purple": (160, 0, 200), "cyan": (0, 255, 255), "grey": (128, 128, 128)}


def _halves(a: str, b: str, px: int = 32) -> Image.Image:
    image = Image.new("RGB", (px, px), COLOURS[a])
    image.paste(Image.new("RGB", (px // 2, px), COLOURS[b]), (px // 2, 0))
    return image


def _toy(n: int | None = None, seed: int = 0) -> Split:
    """Two-colour images, "A left of B"; n random ones, or each of the 56 once."""
    pairs = [(a, b) for a in COLOURS for b in COLOURS if a != b]
    if n is not None:
        g = torch.Generator().manual_seed(seed)
        pairs = [pairs[i] for i in torch.randint(len(pairs), (n,), generator=g)]
    return split_from_samples(SimpleNamespace(image=_halves(a, b), captions=(f"{a} left of {b}", f"{b} right of {a}"))
                                 for a, b in pairs)


# ------------------------------------------------------------------ recall maths

def _naive_recall(i2t, t2i, owner, k):
    n_i, n_t = i2t.shape
    hits_i = 0
    for i in range(n_i):
        own = [j for j in range(n_t) if owner[j] == i]
        best = max(i2t[i, j] for j in own)
        beaten_or_tied = sum(1 for j in range(n_t) if j not in own and i2t[i, j] >= best)
        hits_i += beaten_or_tied < k
    hits_t = sum(sum(1 for i in range(n_i) if i != owner[j] and t2i[j, i] >= t2i[j, owner[j]]) < k
                 for j in range(n_t))
    return 100 * hits_i / n_i, 100 * hits_t / n_t


def test_recall_matches_naive_loops_with_several_captions_per_image():
    g = torch.Generator().manual_seed(0)
    owner = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5])
    i2t = torch.randn(6, 10, generator=g).round(decimals=1)  # rounding makes ties
    t2i = torch.randn(10, 6, generator=g).round(decimals=1)
    r = recall_at_k(i2t, owner, (1, 2, 5), t2i=t2i)
    for k in (1, 2, 5):
        want = _naive_recall(i2t, t2i, owner, k)
        assert (r["i2t"][f"R@{k}"], r["t2i"][f"R@{k}"]) == pytest.approx(want, abs=0.01)
    assert r["n_images"] == 6 and r["n_texts"] == 10
    assert r["rsum"] == pytest.approx(sum(r["i2t"].values()) + sum(r["t2i"].values()))


def test_constant_scores_get_no_hits():
    owner = torch.arange(4)
    r = recall_at_k(torch.zeros(4, 4), owner)
    assert r["i2t"]["R@1"] == 0 and r["t2i"]["R@1"] == 0


def _signals(n=8, k=3, itm_right=True):
    """Dual puts the true pair 2nd behind a distractor; ITM favours the truth (or the distractor)."""
    dual = torch.zeros(n, n)
    for i in range(n):
        dual[i, i], dual[i, (i + 1) % n] = (5.0, 5.5) if itm_right else (5.5, 5.0)
    owner = torch.arange(n)
    g = torch.Generator().manual_seed(1)
    ev = {"dual": dual, "owner": owner}
    for name, scores in (("i2t", dual), ("t2i", dual.T)):
        idx = scores.topk(k, dim=1).indices
        truth = (idx == torch.arange(n)[:, None]).float()
        favoured = truth if itm_right else (idx == scores.topk(2, dim=1).indices[:, 1:]).float()
        ev[f"{name}_idx"] = idx
        ev[f"{name}_itm"] = 4 * favoured + torch.randn(n, k, generator=g) * 0.1
    return ev


def test_rerank_keeps_top_k_first_and_single_beats_dual():
    ev = _signals()
    r = teacher_recall(ev, beta=1.0)
    assert r["dual"]["i2t"]["R@1"] == 0 and r["dual"]["i2t"]["R@5"] == 100
    assert r["single"]["i2t"]["R@1"] == 100 and r["single"]["t2i"]["R@1"] == 100
    assert r["combined"]["i2t"]["R@1"] == 100
    assert teacher_recall(ev, beta=0.0)["combined"] == r["dual"]  # beta 0: the dual order


def test_choose_beta_follows_how_useful_itm_is():
    assert choose_beta(_signals(itm_right=True)) > 0
    # here the dual is right and ITM prefers the distractor: keep the dual order
    assert choose_beta(_signals(itm_right=False)) == 0.0


# ------------------------------------------------------------------ data and batches

def test_split_counts_rejects_and_refuses_empty_input():
    reject = SimpleNamespace(key="x", reason="corrupt_image", detail="")
    split = split_from_samples([reject, SimpleNamespace(image=_halves("red", "blue"), captions=("a", "b"))])
    assert split.n_images == 1 and split.captions == ["a", "b"] and split.rejects == {"corrupt_image": 1}
    with pytest.raises(InputError, match="no usable samples"):
        split_from_samples([reject])
    with pytest.raises(InputError):
        BootstrapConfig(negatives="random")


def test_batches_cover_each_image_once_with_its_own_captions():
    owner = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 5, 5, 6, 7])
    seen = []
    for img, txt in _batches(8, owner, 4, torch.Generator().manual_seed(0)):
        assert torch.equal(owner[txt], img)
        seen += img.tolist()
    assert sorted(seen) == list(range(8))


def test_hard_negatives_never_pick_a_matching_caption():
    logits = torch.tensor([[9.0, 8.0, 0.0], [8.0, 9.0, 7.0], [0.0, 0.0, 9.0]])
    same = torch.eye(3, dtype=torch.bool) | torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    picks = torch.stack([_hard_negatives(logits, same, torch.Generator().manual_seed(s)) for s in range(50)])
    assert not same[torch.arange(3), picks].any()
    assert (picks[:, 1] == 2).all()  # the only allowed column for row 1


# ------------------------------------------------------------------ training

def test_clip_training_learns_the_colours():
    torch.manual_seed(0)
    train, val = _toy(512), _toy()
    clip_tok, blip_tok = build_tokenizers(train.captions)
    clip_proc, _ = build_processors("smoke", clip_tok, blip_tok)
    clip = build_clip("smoke", clip_proc)
    cfg = BootstrapConfig(size="smoke", epochs=4, batch_size=32, lr=2e-3)
    history = train_clip(clip, Encoded.make(train, clip_proc), cfg)
    assert history[-1]["loss"] < history[0]["loss"]
    data = Encoded.make(val, clip_proc)
    r = recall_at_k(dual_logits(clip, data), data.owner)
    assert r["i2t"]["R@5"] > 50  # chance: 5/56 = 9 %


def test_blip_step_trains_every_part_it_should():
    split = _toy()
    _, blip_tok = build_tokenizers(split.captions)
    _, blip_proc = build_processors("smoke", *build_tokenizers(split.captions))
    blip = build_blip("smoke", blip_tok)
    data = Encoded.make(split.head(16), blip_proc)
    scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    loss = blip_step(blip, scale, data.ids[::2], data.mask[::2], data.norm(data.pixels), None,
                        torch.Generator().manual_seed(0))
    loss.backward()
    assert math.isfinite(loss.item()) and scale.grad is not None
    for part in (blip.itm_head, blip.vision_proj, blip.text_proj, blip.vision_model.embeddings,
                 blip.text_encoder.encoder.layer[0].crossattention):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part


# ------------------------------------------------------------------ the command

@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from mcad.pipeline.shapes.synth import SynthConfig, write_benchmark

    root = tmp_path_factory.mktemp("shapes")
    write_benchmark(SynthConfig(train=96, val=16, test=16, image_size=32, shard_size=50), root)
    return root


def _cli(args):
    from click.testing import CliRunner

    from mcad.jobs.cli import McadGroup
    from mcad.jobs.cli.teachers import teachers

    return CliRunner().invoke(McadGroup(commands={"teachers": teachers}), ["teachers", "bootstrap", *args])


def test_bootstrap_command_writes_loadable_teachers_and_recall(shapes, tmp_path):
    out = tmp_path / "teachers"
    args = ["--data", str(shapes / "train"), "--val", str(shapes / "val"), "--test", str(shapes / "test"),
            "--out", str(out), "--size", "smoke", "--epochs", "1", "--batch-size", "32", "--dtype", "float16", "--threads", "1"]
    result = _cli(args)
    assert result.exit_code == 0, result.output
    assert "combined" in result.output
    recall = json.loads((out / "teacher_recall.json").read_text())
    assert recall["beta_from"] == "val" and recall["beta"] in BETAS
    for split, n_texts in (("val", None), ("test", 16 * 5)):
        assert set(recall[split]["combined_R@1_by_beta"]) == {str(b) for b in BETAS}
        for teacher in ("dual", "single", "combined"):
            r = recall[split][teacher]
            assert set(r) == {"i2t", "t2i", "rsum", "n_images", "n_texts"}
            assert set(r["i2t"]) == {"R@1", "R@5", "R@10"} and r["n_images"] == 16
            assert n_texts is None or r["n_texts"] == n_texts
    info = json.loads((out / "bootstrap_config.json").read_text())
    assert info["config"]["size"] == "smoke" and info["counts"]["train"]["images"] == 96
    assert [h["epoch"] for h in info["history"]["single"]] == [1]
    with safe_open(str(out / "dual" / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    clip = CLIPModel.from_pretrained(out / "dual", dtype=torch.float32)
    blip = BlipForImageTextRetrieval.from_pretrained(out / "single", dtype=torch.float32)
    proc = AutoProcessor.from_pretrained(out / "single")
    x = proc(text=["a red circle"], images=[_halves("red", "blue")], return_tensors="pt")
    assert blip(**x).itm_score.shape == (1, 2) and clip.config.vision_config.image_size == 32

    again = _cli(args)  # refuses to overwrite without --overwrite
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_bootstrap_command_bad_input_exits_2(tmp_path):
    result = _cli(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--size", "smoke"])
    assert result.exit_code == 2 and "shard not found" in result.output
    result = _cli(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--size", "huge"])
    assert result.exit_code == 2 and "unknown teacher size" in result.output
