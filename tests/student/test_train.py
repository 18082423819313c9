"""The training loop: schedule, checkpoints, and a resume that continues exactly where it stopped."""
from __future__ import annotations

import json

import pytest
import torch

from mcad.storage.errors import InputError
from mcad.student.data import ATTENTION, BLOCK, INPUT_IDS, PIXELS
from mcad.student.models import build_student
from mcad.student.config import TrainConfig
from mcad.student.train import batch_loss, train, warmup_cosine


def test_warmup_then_cosine_to_zero():
    f = warmup_cosine(100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5, abs=0.01)
    assert f(100) == pytest.approx(0.0, abs=1e-9)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


@pytest.mark.parametrize("kw, message", [(dict(w_con=-1.0), "w_con must be >= 0"),
                                         (dict(mode="shuffle"), "mode must be one of"),
                                         (dict(epochs=0), "epochs must be at least 1"),
                                         (dict(w_rank=-0.5), "w_rank must be >= 0"),
                                         (dict(rank_by="dual"), "rank_by must be one of"),
                                         (dict(itm_norm="batch"), "itm_norm must be one of"),
                                         (dict(itm_temperature=0.0), "itm_temperature must be")])
def test_config_refuses_bad_values(kw, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(**kw)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from mcad.pipeline.shapes.teacher_models import make_tiny_teachers

    dual, _ = make_tiny_teachers(tmp_path_factory.mktemp("t"), ["a small red circle left of a blue square"])
    return dual


def _batches(processor, n_batches=3, size=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    words = ["a small red circle", "a large blue square", "a green star", "a white diamond"]
    out = []
    for _ in range(n_batches):
        pixels = torch.rand(size, 3, 32, 32, generator=gen)
        texts = [words[int(i)] for i in torch.randint(len(words), (size,), generator=gen)]
        tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
        out.append({PIXELS: pixels, INPUT_IDS: tokens["input_ids"], ATTENTION: tokens["attention_mask"]})
    return out


def _student(clip_dir):
    return build_student("smoke", tokenizer_from=clip_dir, teacher_dim=8, seed=0)


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_clip_dir, tmp_path):
    """Killed mid-epoch 1, resumed in a fresh process: it starts at epoch 1 from the checkpoint's
    weights (never epoch 0 again), sees epoch 1's own data, and ends where the uninterrupted run
    ended. Each epoch has different batches, so a resume that ignored the checkpoint or replayed
    another epoch's data order would end with other weights."""
    cfg = TrainConfig(w_dist=0.0, w_feat=0.0, epochs=3, lr=1e-3, log_every=1)
    reference, processor = _student(tiny_clip_dir)
    per_epoch = [_batches(processor, seed=epoch) for epoch in range(cfg.epochs)]
    train(cfg, student=reference, batches=lambda epoch: iter(per_epoch[epoch]), steps_per_epoch=3,
          teacher_logit_scale=10.0, run=tmp_path / "ref", progress=False)

    def crashing(epoch):
        for i, batch in enumerate(per_epoch[epoch]):
            if epoch == 1 and i == 2:
                raise KeyboardInterrupt("killed mid-epoch")
            yield batch

    crashed, _ = _student(tiny_clip_dir)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, student=crashed, batches=crashing, steps_per_epoch=3, teacher_logit_scale=10.0,
              run=tmp_path / "run", progress=False)
    resumed, _ = _student(tiny_clip_dir)  # a fresh process: weights come from the checkpoint
    asked = []

    def recorded(epoch):
        asked.append(epoch)
        return iter(per_epoch[epoch])

    record = train(cfg, student=resumed, batches=recorded, steps_per_epoch=3,
                   teacher_logit_scale=10.0, run=tmp_path / "run", resume=True, progress=False)
    assert asked == [1, 2]  # epoch 0 is done: it is not trained again
    assert record["epoch"] == 2 and record["step"] == 9
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == 9  # no step logged twice after the resume


def test_resume_restores_the_checkpoint_weights(tiny_clip_dir, tmp_path):
    """load_checkpoint puts the saved weights into a fresh model (not only the progress state)."""
    from mcad.student.checkpoint import load_checkpoint

    cfg = TrainConfig(w_dist=0.0, w_feat=0.0, epochs=1, lr=1e-2)
    trained, processor = _student(tiny_clip_dir)
    batches = _batches(processor)
    train(cfg, student=trained, batches=lambda epoch: iter(batches), steps_per_epoch=3,
          teacher_logit_scale=10.0, run=tmp_path, progress=False)
    fresh, _ = _student(tiny_clip_dir)
    changed = [k for k, v in fresh.state_dict().items() if not torch.equal(v, trained.state_dict()[k])]
    assert changed  # training moved the weights, so the check below can tell
    state = load_checkpoint(tmp_path / "checkpoints", model=fresh)
    assert state is not None and state["epoch"] == 0
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, trained.state_dict()[name]), name


def test_checkpoint_loads_without_pickle(tiny_clip_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = TrainConfig(w_dist=0.0, w_feat=0.0, epochs=1)
    student, processor = _student(tiny_clip_dir)
    batches = _batches(processor, n_batches=1)
    train(cfg, student=student, batches=lambda epoch: iter(batches), steps_per_epoch=1,
          teacher_logit_scale=10.0, run=tmp_path, progress=False)
    last = tmp_path / "checkpoints" / "last"
    assert load_file(last / "student.safetensors").keys() == student.state_dict().keys()
    torch.load(last / "optimizer.pt", weights_only=True)  # plain tensors and numbers only


def _with_signals(batch, seed=0, d=8, k=3):
    """A replay batch of two pools (3 + 3 rows) with random stored signals, as student/data.collate gives."""
    gen = torch.Generator().manual_seed(seed)
    b = len(batch[INPUT_IDS])
    unit = [torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=1) for _ in range(3)]
    idx = torch.tensor([[0, 1, 2], [1, 2, 0], [2, 0, 1], [3, 4, 5], [4, 5, 3], [5, 3, 4]])[:, :k]
    itm = torch.randn(b, k, generator=gen) * 3
    return {**batch, "img_emb": unit[0], "txt_emb": unit[1], "fused_proj": unit[2], "i2t_idx": idx,
            "i2t_itm": itm, "t2i_idx": idx, "t2i_itm": itm.flip(1), BLOCK: torch.tensor([0, 0, 0, 1, 1, 1])}


def test_the_ranking_term_and_the_itm_scale_reach_the_loss(tiny_clip_dir, tmp_path):
    """w_rank > 0 adds the ranking term (its lists from rank_by); the ITM scale changes the KL;
    the defaults (w_rank 0) compute no ranking term. A short run logs the term."""
    student, processor = _student(tiny_clip_dir)
    batch = _with_signals(_batches(processor, n_batches=1)[0])
    torch.manual_seed(0)
    _, plain = batch_loss(TrainConfig(), student, batch, 10.0)
    assert "rank" not in plain
    _, ranked = batch_loss(TrainConfig(w_rank=0.5), student, batch, 10.0)
    assert ranked["loss"].item() == pytest.approx(plain["loss"].item() + 0.5 * ranked["rank"].item(), rel=1e-5)
    _, combined = batch_loss(TrainConfig(w_rank=0.5, rank_by="combined"), student, batch, 10.0)
    assert combined["rank"].item() != pytest.approx(ranked["rank"].item())
    _, scaled = batch_loss(TrainConfig(itm_temperature=4.0), student, batch, 10.0)
    _, as_stored = batch_loss(TrainConfig(itm_norm="none"), student, batch, 10.0)
    assert len({round(x["dist"].item(), 6) for x in (plain, scaled, as_stored)}) == 3
    assert scaled["feat"].item() == pytest.approx(plain["feat"].item())  # the features do not read m
    cfg = TrainConfig(w_rank=1.0, w_dist=0.0, w_feat=0.0, epochs=1, log_every=1)
    train(cfg, student=student, batches=lambda epoch: iter([batch]), steps_per_epoch=1, teacher_logit_scale=10.0,
          run=tmp_path, progress=False)
    step = next(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert {"rank", "rank_i2t", "rank_t2i"} <= step.keys() and "dist" not in step
