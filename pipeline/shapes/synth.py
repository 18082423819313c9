"""The shapes benchmark: small synthetic images of coloured shapes with compositional captions.

Each image holds 1-3 non-overlapping shapes (6 colours, 5 shapes, 2 sizes) on
black; captions name the shapes and the relation of the first two ("a small red
circle left of a large blue square and a small green star"). The val and test
splits are made of PAIRS that differ only by swapped colours or by the two
related objects swapping places, so both members have the same bag of words and
only attribute binding tells them apart: where a cross-attention teacher beats a
dual encoder. Val and test hold out what they measure: no canonical meaning
occurs in two splits, so recall is never recall of a scene seen in training
(docs/design.md, section 3, "The benchmark protocol").

Everything is deterministic from the seed; the same config gives byte-identical
WebDataset shards (img2dataset layout: OUT/{train,val,test}/000000.tar with
KEY.jpg, KEY.txt, KEY.json). Run: `mcad data synth --out data/shapes`.
`--texture photo` draws the same scenes and captions as photo-like JPEGs
(world.render_photo: 4:3, gradients and noise, quality 90), whose pixels come
from a generator of their own keyed by (seed, split, index).
"""
from __future__ import annotations

import functools
import io
import itertools
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from mcad.pipeline.shapes.synth_config import PAIRED_SPLITS, SPLITS, SynthConfig  # noqa: F401 (re-exported)
from mcad.pipeline.shapes.world import (
    SWAPS, VOCABULARY, Scene, canonical, captions, make_scene, relation, render, render_photo,
)
from mcad.storage.atomic import atomic_write, atomic_write_json
from mcad.storage.errors import InputError

# Fixed per-split key offsets: keys are unique over the benchmark and a split's
# keys do not move when another split's size changes.
KEY_OFFSETS = {"train": 0, "val": 100_000_000, "test": 200_000_000}
OBJECT_COUNTS = {1: 0.10, 2: 0.65, 3: 0.25}  # train; val and test draw 2 or 3 in the same ratio
N_CAPTIONS = 5  # exactly 5 per val/test image (COCO/Flickr protocol); up to 5 for train
JPEG_QUALITY = 95
PHOTO_JPEG_QUALITY = 90  # texture "photo": web photos' usual quality, default 4:2:0 chroma
CONFIG_NAME = "synth_config.json"
FORMAT = "mcad-shapes-v2"  # v2: val made of pairs, meanings held out of train


def _object_count(rng: np.random.Generator, minimum: int) -> int:
    counts = [k for k in OBJECT_COUNTS if k >= minimum]
    p = np.array([OBJECT_COUNTS[k] for k in counts])
    return int(counts[rng.choice(len(counts), p=p / p.sum())])


def _swap_pair(rng: np.random.Generator, image_size: int) -> tuple[str, Scene, Scene] | None:
    """(kind, scene, its colour- or place-swapped partner), or None when the swap means the same."""
    kind = "colour" if rng.random() < 0.5 else "relation"
    first = make_scene(rng, image_size=image_size, n_objects=_object_count(rng, 2))
    second = SWAPS[kind](first)
    if second is None or canonical(second) == canonical(first):
        return None
    return kind, first, second


def _train_scenes(rng: np.random.Generator, n: int, image_size: int, pairs: float,
                  held_out: frozenset[str]) -> Iterator[tuple[Scene, None]]:
    """Plain scenes whose meaning is not held out; with pairs > 0, that share comes as adjacent swap pairs."""
    made = 0
    while made < n:
        if pairs > 0 and n - made >= 2 and rng.random() < pairs:  # no draw at all when pairs = 0
            while (pair := _swap_pair(rng, image_size)) is None or \
                    {canonical(pair[1]), canonical(pair[2])} & held_out:
                pass
            yield pair[1], None
            yield pair[2], None
            made += 2
        else:
            scene = make_scene(rng, image_size=image_size, n_objects=_object_count(rng, 1))
            if canonical(scene) in held_out:
                continue  # redrawn: training never sees a val or test meaning
            yield scene, None
            made += 1


def _paired_scenes(rng: np.random.Generator, n: int, image_size: int,
                   held_out: frozenset[str]) -> Iterator[tuple[Scene, dict]]:
    """n/2 swap pairs; no canonical scene occurs twice in the split (one right answer) or in held_out."""
    seen: set[str] = set(held_out)
    misses = 0
    for pair_id in range(n // 2):
        while True:
            pair = _swap_pair(rng, image_size)
            meanings = {canonical(pair[1]), canonical(pair[2])} if pair else set()
            if pair and not meanings & seen:
                kind, first, second = pair
                break
            misses += 1
            if misses > 10_000 + 20 * n:
                raise InputError(f"{n} paired images: cannot find that many distinct scene pairs; "
                                 f"ask for fewer val or test images")
        seen |= meanings
        yield first, {"id": pair_id, "variant": "a", "swap": kind}
        yield second, {"id": pair_id, "variant": "b", "swap": kind}


def split_scenes(split: str, cfg: SynthConfig,
                 held_out: frozenset[str] = frozenset()) -> Iterator[tuple[Scene, dict | None, list[str]]]:
    """The split's (scene, pair, captions), in key order, without rendering.

    Each split has its own generator, keyed by (seed, split). held_out is the
    set of meanings the split must not draw (see held_out_meanings).
    """
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split)])
    n = getattr(cfg, split)
    if split in PAIRED_SPLITS:
        scenes = _paired_scenes(rng, n, cfg.image_size, held_out)
    else:
        scenes = _train_scenes(rng, n, cfg.image_size, cfg.train_pairs, held_out)
    for scene, pair in scenes:
        # Captions are drawn from the same generator right after their scene.
        yield scene, pair, captions(scene, rng, N_CAPTIONS)


def held_out_meanings(split: str, cfg: SynthConfig) -> frozenset[str]:
    """The meanings a split may not draw: test draws first, val avoids test's, train avoids both
    (and, for train, those of the benchmarks of cfg.hold_out_seeds)."""
    if split == "test":
        return frozenset()
    test, val = _paired_meanings(cfg)
    if split == "val":
        return test
    others = [held_out_meanings("train", replace(cfg, seed=seed, hold_out_seeds=()))
              for seed in cfg.hold_out_seeds if seed != cfg.seed]
    return frozenset().union(test, val, *others)


@functools.lru_cache(maxsize=16)
def _paired_meanings(cfg: SynthConfig) -> tuple[frozenset[str], frozenset[str]]:
    """(test, val) meanings of cfg's benchmark; writing one draws each split's scenes once, not per split."""
    test = frozenset(canonical(s) for s, _, _ in split_scenes("test", cfg))
    return test, frozenset(canonical(s) for s, _, _ in split_scenes("val", cfg, test))


def _meta(scene: Scene, *, key: str, split: str, caps: list[str], pair: dict | None) -> dict:
    objs = scene.objects
    meta = {
        "key": key, "split": split, "captions": caps, "canonical": canonical(scene),
        "image_size": scene.image_size,
        "objects": [asdict(o) for o in objs],
        "relation": None if len(objs) < 2 else {"subject": 0, "object": 1, "relation": relation(objs[0], objs[1])},
    }
    if pair is not None:
        meta["pair"] = pair
    return meta


def _samples(split: str, cfg: SynthConfig) -> Iterator[dict]:
    """The split's WebDataset samples (key, jpg, txt, json as bytes), in key order."""
    for index, (scene, pair, caps) in enumerate(split_scenes(split, cfg, held_out_meanings(split, cfg))):
        key = f"{KEY_OFFSETS[split] + index:09d}"
        buf = io.BytesIO()
        if cfg.texture == "photo":
            # Its own generator: the scenes and captions are those of the flat benchmark.
            pixels = np.random.default_rng([cfg.seed, SPLITS.index(split), index, 1])
            render_photo(scene, pixels).save(buf, format="JPEG", quality=PHOTO_JPEG_QUALITY)
        else:
            # 4:4:4 chroma keeps the colours of 5-pixel shapes; no optimize/EXIF: stable bytes.
            render(scene).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        meta = _meta(scene, key=key, split=split, caps=caps, pair=pair)
        yield {"__key__": key, "jpg": buf.getvalue(), "txt": caps[0].encode(),
               "json": json.dumps(meta, sort_keys=True).encode()}


def _write_shard(path: Path, samples: list[dict]) -> None:
    import webdataset as wds  # imports torch: only when shards are really written

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            # TarWriter is byte-stable given a fixed mtime: members sorted per sample, fixed mode/owner.
            sink = wds.TarWriter(fh, encoder=False, mtime=0, user="mcad", group="mcad", mode=0o444)
            for sample in samples:
                sink.write(sample)
            sink.close()

    atomic_write(path, write)


def _write_split(folder: Path, samples: Iterable[dict], shard_size: int,
                 on_sample: Callable[[], None] | None) -> list[Path]:
    paths = []
    samples = iter(samples)
    for index in itertools.count():
        chunk = []
        for sample in itertools.islice(samples, shard_size):
            chunk.append(sample)
            if on_sample:
                on_sample()
        if not chunk:
            return paths
        paths.append(folder / f"{index:06d}.tar")
        _write_shard(paths[-1], chunk)


def existing_shards(out_dir: str | Path, *, overwrite: bool = False) -> list[Path]:
    """The shards already under out_dir; refuses (InputError) if there are any, unless overwrite."""
    out = Path(out_dir)
    old = sorted(p for split in SPLITS for p in (out / split).glob("*.tar"))
    if old and not overwrite:
        raise InputError(f"{out} already holds {len(old)} shards; pass --overwrite to replace them")
    return old


def write_benchmark(cfg: SynthConfig, out_dir: str | Path, *, overwrite: bool = False,
                    on_sample: Callable[[], None] | None = None) -> dict:
    """Write the benchmark under out_dir/{train,val,test}/ and out_dir/synth_config.json.

    Refuses a folder that already holds shards unless overwrite (then only those
    shards and the config are removed). on_sample is called once per sample
    written (a progress bar). Returns the summary that is also the config JSON.
    """
    out = Path(out_dir)
    for path in existing_shards(out, overwrite=overwrite) + [out / CONFIG_NAME]:
        path.unlink(missing_ok=True)
    shards = {}
    for split in SPLITS:
        paths = _write_split(out / split, _samples(split, cfg), cfg.shard_size, on_sample)
        shards[split] = [str(p.relative_to(out)) for p in paths]
    summary = {
        "format": FORMAT, "config": asdict(cfg),
        "counts": {split: getattr(cfg, split) for split in SPLITS},
        "shards": shards, "key_offsets": KEY_OFFSETS, "captions_per_paired_image": N_CAPTIONS,
        "paired_splits": list(PAIRED_SPLITS), "held_out": "val and test meanings never occur in train; test meanings never in val",
        "vocabulary": VOCABULARY,
    }
    atomic_write_json(out / CONFIG_NAME, summary)  # written last: its presence means complete
    return summary
