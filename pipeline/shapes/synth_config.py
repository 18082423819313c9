"""The shapes benchmark's config: sizes, seed and hold-out, free of numpy and Pillow.

`mcad data synth --help` reads its defaults from here without importing the
generator (pipeline/shapes/synth.py, which re-exports SynthConfig).
"""
from __future__ import annotations

from dataclasses import dataclass

from mcad.storage.errors import InputError

SPLITS = ("train", "val", "test")
PAIRED_SPLITS = ("val", "test")  # made of swap pairs, 5 captions per image
MAX_PER_SPLIT = 100_000_000
MIN_IMAGE_SIZE = 24  # 3 shapes fit
# flat: shapes on black, image-size square JPEGs (quality 95, 4:4:4), the benchmark as it always was;
# photo: the same scenes in a 4:3 frame of gradients and noise, JPEG quality 90 (web-photo size and
# decode cost: --image-size 480 gives 640 x 480 at about 40-120 KB), for input-path benches.
TEXTURES = ("flat", "photo")


@dataclass(frozen=True)
class SynthConfig:
    train: int = 10_000
    val: int = 1_000
    test: int = 2_000
    image_size: int = 48
    shard_size: int = 1000
    seed: int = 0
    # Share of train/val samples written as adjacent swap pairs (as in test): pools of
    # consecutive samples then hold the hard negatives a binding-aware teacher knows.
    train_pairs: float = 0.0
    # Benchmarks of these seeds (same sizes) also keep their val and test meanings
    # out of this train split: teachers trained on it can be evaluated on any of them.
    hold_out_seeds: tuple[int, ...] = ()
    texture: str = "flat"  # TEXTURES; scenes and captions do not depend on it

    def __post_init__(self):
        object.__setattr__(self, "hold_out_seeds", tuple(sorted({int(s) for s in self.hold_out_seeds})))
        for name in ("train", "val", "test", "shard_size"):
            value = getattr(self, name)
            if value < 1:
                raise InputError(f"{name} must be positive, got {value}")
            if name != "shard_size" and value >= MAX_PER_SPLIT:
                raise InputError(f"{name} must be below {MAX_PER_SPLIT:,} (9-digit keys), got {value}")
        for name in PAIRED_SPLITS:
            if getattr(self, name) % 2:
                raise InputError(f"{name} must be even (the {name} split is made of pairs), "
                                 f"got {getattr(self, name)}")
        if self.texture not in TEXTURES:
            raise InputError(f"texture must be one of {', '.join(TEXTURES)}, got {self.texture!r}")
        if not 0.0 <= self.train_pairs <= 1.0:
            raise InputError(f"train_pairs must be within [0, 1], got {self.train_pairs}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise InputError(f"image_size must be at least {MIN_IMAGE_SIZE} px to fit 3 shapes, "
                             f"got {self.image_size}")

    @property
    def total(self) -> int:
        return self.train + self.val + self.test
