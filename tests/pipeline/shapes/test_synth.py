"""The shapes benchmark: determinism, swap pairs, shard layout, captions that tell the truth, CLI."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner

from helpers import assert_one_line_error
from mcad.jobs.cli import main
from mcad.pipeline.shapes import synth, world
from mcad.pipeline.shapes.world import Obj, Scene
from mcad.pipeline.shapes.synth import SynthConfig, write_benchmark
from mcad.storage.errors import InputError

REPO = Path(__file__).resolve().parents[3]
TINY = SynthConfig(train=40, val=10, test=20, image_size=48, shard_size=16, seed=0)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read(root: Path, split: str) -> list[dict]:
    urls = [str(p) for p in sorted((root / split).glob("*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))


def _meaning(caption: str) -> str:
    """Parse a caption independently of synth and return its meaning in normal form."""
    words = [w for w in caption.split() if w not in ("a", "the")]
    text = re.sub(r"\bto (left|right) of\b", r"\1 of", " ".join(words))
    m = re.fullmatch(r"(\w+ \w+ \w+)(?: (left of|right of|above|below) (\w+ \w+ \w+))?(?: and (\w+ \w+ \w+))?", text)
    assert m, caption
    first, rel, second, extra = m.groups()
    if rel in ("right of", "below"):
        first, second = second, first
        rel = {"right of": "left of", "below": "above"}[rel]
    parts = [f"a {first}"] + ([rel, f"a {second}"] if rel else []) + ([f"and a {extra}"] if extra else [])
    return " ".join(parts)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("shapes")
    return root, write_benchmark(TINY, root)


def test_same_seed_gives_byte_identical_files_even_in_another_process(bench, tmp_path):
    root, _ = bench
    # Another process with another hash seed, through the real console entry point.
    env = dict(os.environ, PYTHONHASHSEED="12345")
    cmd = [sys.executable, "-c", "from mcad.jobs.cli import main; main()", "data", "synth", "--out", str(tmp_path),
           "--train", "40", "--val", "10", "--test", "20", "--shard-size", "16", "--seed", "0"]
    subprocess.run(cmd, check=True, cwd=REPO, env=env, capture_output=True)
    assert _hashes(tmp_path) == _hashes(root)
    assert len(_hashes(root)) == 3 + 1 + 2 + 1  # 3 train shards, 1 val, 2 test, the config


def test_another_seed_gives_other_bytes(bench, tmp_path):
    root, _ = bench
    write_benchmark(SynthConfig(train=40, val=10, test=20, shard_size=16, seed=1), tmp_path)
    ours, theirs = _hashes(root), _hashes(tmp_path)
    assert ours.keys() == theirs.keys()
    assert all(ours[k] != theirs[k] for k in ours if k.endswith(".tar"))


def test_shard_layout_and_keys(bench):
    root, summary = bench
    all_keys = []
    for split, offset in synth.KEY_OFFSETS.items():
        shards = sorted((root / split).glob("*.tar"))
        assert [p.name for p in shards] == [f"{i:06d}.tar" for i in range(len(shards))]
        assert summary["shards"][split] == [f"{split}/{p.name}" for p in shards]
        sizes = []
        for shard in shards:
            with tarfile.open(shard) as tar:
                members = tar.getmembers()
            assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o444 for m in members)
            keys = sorted({m.name.split(".")[0] for m in members})
            assert [m.name for m in members] == [f"{k}.{ext}" for k in keys for ext in ("jpg", "json", "txt")]
            sizes.append(len(keys))
            all_keys += keys
        n = getattr(TINY, split)
        assert sum(sizes) == n == summary["counts"][split]
        assert all(s == TINY.shard_size for s in sizes[:-1]) and 0 < sizes[-1] <= TINY.shard_size
    assert len(all_keys) == len(set(all_keys)) == TINY.total
    assert all(re.fullmatch(r"\d{9}", k) for k in all_keys)
    config = json.loads((root / synth.CONFIG_NAME).read_text())
    assert config["config"] == {**TINY.__dict__, "hold_out_seeds": []} and config["vocabulary"] == world.VOCABULARY


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_images_match_their_metadata_and_every_caption_tells_the_truth(bench, split):
    root, _ = bench
    samples = _read(root, split)
    assert len(samples) == getattr(TINY, split)
    for s in samples:
        meta, img = s["json"], s["jpg"]
        assert img.size == (48, 48) and img.mode == "RGB"
        assert meta["key"] == s["__key__"] and meta["split"] == split
        caps = meta["captions"]
        assert len(caps) == len(set(caps)) and 1 <= len(caps) <= 5
        assert s["txt"] == caps[0]
        assert all(len(c.split()) <= 17 and set(c.split()) <= set(world.VOCABULARY) for c in caps)
        assert {_meaning(c) for c in caps} == {meta["canonical"]}
        objs = [Obj(**o) for o in meta["objects"]]
        assert 1 <= len(objs) <= 3
        assert world.canonical(Scene(tuple(objs), 48)) == meta["canonical"]
        pixels = np.asarray(img).astype(int)
        for o in objs:  # the JPEG shows each shape's colour at its centre
            assert np.abs(pixels[o.y, o.x] - world.COLOURS[o.colour]).max() < 40, (meta, o)
        if len(objs) >= 2:  # the stated relation holds in the picture, along a clear axis
            m = re.fullmatch(r"a (\w+ \w+ \w+) (left of|above) a (\w+ \w+ \w+).*", meta["canonical"])
            by_phrase = {o.phrase: o for o in objs}
            a, b = by_phrase[m.group(1)], by_phrase[m.group(3)]
            main_axis, other = ((b.x - a.x, b.y - a.y) if m.group(2) == "left of" else (b.y - a.y, b.x - a.x))
            assert main_axis > 0 and 2 * abs(other) <= main_axis


@pytest.mark.parametrize("split", ["val", "test"])
def test_val_and_test_are_pairs_with_one_bag_of_words_and_distinct_meanings(bench, split):
    root, _ = bench
    samples = _read(root, split)
    metas = [s["json"] for s in samples]
    assert all(len(m["captions"]) == 5 for m in metas)
    pairs: dict[int, list[dict]] = {}
    for m in metas:
        pairs.setdefault(m["pair"]["id"], []).append(m)
    assert sorted(pairs) == list(range(getattr(TINY, split) // 2))
    kinds = set()
    for pid, (a, b) in pairs.items():
        assert (a["pair"]["variant"], b["pair"]["variant"]) == ("a", "b")
        assert a["pair"]["swap"] == b["pair"]["swap"]
        kinds.add(a["pair"]["swap"])
        assert Counter(a["canonical"].split()) == Counter(b["canonical"].split())
        assert a["canonical"] != b["canonical"]
        oa, ob = a["objects"], b["objects"]
        assert oa[2:] == ob[2:]  # the unrelated third shape stays as it was
        if a["pair"]["swap"] == "colour":
            assert [(o["x"], o["y"], o["shape"], o["size"]) for o in oa] == \
                   [(o["x"], o["y"], o["shape"], o["size"]) for o in ob]
        else:
            assert [o["colour"] for o in oa] == [o["colour"] for o in ob]
            assert (oa[0]["x"], oa[0]["y"]) == (ob[1]["x"], ob[1]["y"])
    assert kinds == {"colour", "relation"}
    meanings = [m["canonical"] for m in metas]
    assert len(set(meanings)) == len(meanings)  # one right answer per query
    texts = [c for m in metas for c in m["captions"]]
    assert len(set(texts)) == len(texts)


def test_written_splits_share_no_meaning(bench):
    """Read back from the shards: no canonical meaning of val or test occurs in another split."""
    root, _ = bench
    meanings = {split: {s["json"]["canonical"] for s in _read(root, split)} for split in synth.SPLITS}
    assert not meanings["train"] & meanings["val"]
    assert not meanings["train"] & meanings["test"]
    assert not meanings["val"] & meanings["test"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_default_benchmark_holds_val_and_test_meanings_out_of_train(seed):
    """At the default sizes, per report seed: val and test meanings never occur in train.

    Without the hold-out 42-47 % of test meanings occurred in train; the scene
    generators are run without rendering (what write_benchmark draws, image for image).
    """
    cfg = SynthConfig(seed=seed)
    drawn = {split: [world.canonical(s) for s, _, _ in synth.split_scenes(split, cfg,
                                                                           synth.held_out_meanings(split, cfg))]
             for split in synth.SPLITS}
    assert [len(drawn[s]) for s in synth.SPLITS] == [10_000, 1_000, 2_000]
    train, val, test = (set(drawn[s]) for s in synth.SPLITS)
    assert len(test) == 2_000 and len(val) == 1_000  # one right answer per query
    assert not train & test and not train & val and not val & test
    # The hold-out is not empty: without it, train would draw many of those meanings.
    unfiltered = {world.canonical(s) for s, _, _ in synth.split_scenes("train", cfg)}
    assert len(unfiltered & test) > 400


def test_hold_out_seeds_keep_other_benchmarks_meanings_out_of_train():
    """Teachers' data: train avoids the val/test meanings of every report seed, not only its own."""
    small = dict(train=3_000, val=200, test=400)
    teachers = SynthConfig(**small, seed=0, hold_out_seeds=(0, 1, 2))
    train = {world.canonical(s) for s, _, _ in synth.split_scenes("train", teachers,
                                                                  synth.held_out_meanings("train", teachers))}
    plain = SynthConfig(**small, seed=0)
    leaked = {world.canonical(s) for s, _, _ in synth.split_scenes("train", plain,
                                                                   synth.held_out_meanings("train", plain))}
    for seed in (0, 1, 2):
        other = SynthConfig(**small, seed=seed)
        held = {world.canonical(s) for split in ("val", "test")
                for s, _, _ in synth.split_scenes(split, other, synth.held_out_meanings(split, other))}
        assert not train & held
        if seed:  # without the option, another seed's test meanings do occur in train
            assert leaked & held
    # The benchmark's own val and test do not change with the option.
    assert synth.held_out_meanings("val", teachers) == synth.held_out_meanings("val", plain)


def test_train_pairs_put_swap_partners_side_by_side(tmp_path):
    write_benchmark(SynthConfig(train=60, val=10, test=2, shard_size=100, train_pairs=1.0), tmp_path)
    metas = [s["json"] for s in _read(tmp_path, "train")]
    assert len(metas) == 60
    for a, b in zip(metas[::2], metas[1::2]):  # every sample comes with its partner next to it
        assert Counter(a["canonical"].split()) == Counter(b["canonical"].split())
        assert a["canonical"] != b["canonical"]
    # No pairs asked: the train split is what it always was (plain random scenes).
    plain = tmp_path / "plain"
    write_benchmark(SynthConfig(train=60, val=10, test=2, shard_size=100), plain)
    again = tmp_path / "again"
    write_benchmark(SynthConfig(train=60, val=10, test=2, shard_size=100, train_pairs=0.0), again)
    assert _hashes(plain) == {k: v for k, v in _hashes(again).items()}
    metas = [s["json"]["canonical"] for s in _read(plain, "train")]
    neighbours = sum(Counter(a.split()) == Counter(b.split()) for a, b in zip(metas[::2], metas[1::2]))
    assert neighbours < 10


def test_mirrored_relation_is_the_same_scene():
    red = Obj("red", "circle", "small", 10, 24)
    blue = Obj("blue", "square", "large", 34, 24)
    assert world.canonical(Scene((red, blue), 48)) == world.canonical(Scene((blue, red), 48))
    assert world.canonical(Scene((red, blue), 48)) == "a small red circle left of a large blue square"
    swapped = world.swap_places(Scene((red, blue), 48))
    assert world.canonical(swapped) == "a large blue square left of a small red circle"
    variants = world.caption_variants(Scene((red, blue), 48))
    assert "the large blue square to the right of the small red circle" in variants
    assert "small red circle left of large blue square" in variants


def test_other_image_size_decodes_to_that_size(tmp_path):
    write_benchmark(SynthConfig(train=3, val=2, test=2, image_size=32, shard_size=4), tmp_path)
    sizes = {s["jpg"].size for split in synth.SPLITS for s in _read(tmp_path, split)}
    assert sizes == {(32, 32)}


def _tar_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.tar")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_default_texture_keeps_the_benchmarks_bytes(bench):
    """The flat texture writes the very shards it wrote before textures existed (digest taken then)."""
    root, _ = bench
    assert TINY.texture == "flat"
    assert _tar_digest(root) == "0bb56fed5b4617a04e47046ac9ab4d5d7ddcd779b4526752575fbcdcee3d51f8"


def test_photo_texture_same_scenes_and_captions_as_web_photo_jpegs(tmp_path):
    import io

    from PIL import Image

    cfg = dict(train=4, val=2, test=2, shard_size=8, seed=0)
    write_benchmark(SynthConfig(**cfg, image_size=48), tmp_path / "flat")
    write_benchmark(SynthConfig(**cfg, image_size=480, texture="photo"), tmp_path / "photo")
    write_benchmark(SynthConfig(**cfg, image_size=480, texture="photo"), tmp_path / "again")
    assert _tar_digest(tmp_path / "photo") == _tar_digest(tmp_path / "again")
    for split in synth.SPLITS:
        flat, photo = (list(wds.WebDataset([str(p) for p in sorted((tmp_path / f / split).glob("*.tar"))],
                                           shardshuffle=False)) for f in ("flat", "photo"))
        assert [s["__key__"] for s in flat] == [s["__key__"] for s in photo]
        assert [s["txt"] for s in flat] == [s["txt"] for s in photo]
        for a, b in zip(flat, photo):
            meta_a, meta_b = json.loads(a["json"]), json.loads(b["json"])
            assert meta_b["captions"] == meta_a["captions"] and meta_b["canonical"] == meta_a["canonical"]
            image = Image.open(io.BytesIO(b["jpg"]))
            assert image.format == "JPEG" and image.size == (640, 480)
            assert 30_000 <= len(b["jpg"]) <= 130_000  # web photos: about 40-120 KB
    # The shapes sit in the middle square with their colours: the first object's centre shows it.
    sample = next(iter(wds.WebDataset(str(tmp_path / "photo" / "train" / "000000.tar"), shardshuffle=False)))
    obj = json.loads(sample["json"])["objects"][0]
    pixel = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=float)[obj["y"], 80 + obj["x"]]
    assert np.abs(pixel - world.COLOURS[obj["colour"]]).max() < 45  # noise and JPEG, not another colour


@pytest.mark.parametrize("field,value", [("test", 3), ("val", 5), ("image_size", 16), ("shard_size", 0), ("train", 0),
                                         ("train_pairs", 1.5), ("texture", "wood")])
def test_config_refuses_bad_values(field, value):
    with pytest.raises(InputError):
        SynthConfig(**{field: value})


def test_cli_help_refusals_and_overwrite(tmp_path):
    runner = CliRunner()
    help_ = runner.invoke(main, ["data", "synth", "--help"])
    assert help_.exit_code == 0 and "Examples:" in help_.output
    for bad in (["--test", "3"], ["--val", "5"], ["--image-size", "16"], ["--shard-size", "0"],
                ["--hold-out-seeds", "0,x"]):
        result = runner.invoke(main, ["data", "synth", "--out", str(tmp_path / "bad"), *bad])
        assert_one_line_error(result)
    assert not (tmp_path / "bad").exists()

    out = tmp_path / "shapes"
    tiny = ["--out", str(out), "--train", "5", "--val", "2", "--test", "2"]
    first = runner.invoke(main, ["data", "synth", *tiny, "--shard-size", "2"])
    assert first.exit_code == 0, first.output
    assert "train" in first.output and len(list((out / "train").glob("*.tar"))) == 3
    again = runner.invoke(main, ["data", "synth", *tiny])
    assert_one_line_error(again, "--overwrite")
    replaced = runner.invoke(main, ["data", "synth", *tiny, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["000000.tar"]  # stale shards gone
    assert json.loads((out / synth.CONFIG_NAME).read_text())["config"]["shard_size"] == 1000
