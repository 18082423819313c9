"""Fixtures that write tiny WebDataset tars (good and broken) into tmp_path.

- `image_bytes(fmt="JPEG", size=(8, 8), color=(200, 30, 30), mode="RGB")` -> encoded bytes
- `make_tar(name, members, *, folder=None, compress="")` -> Path of a tar holding
  `members`: (member name, bytes) pairs, or (name, None, tarfile type) for links
  and other special members; names are written as given (`../x.jpg` included).
- `sample_members(key, caption=..., *, ext="jpg", meta=None)` -> the img2dataset
  members of one sample: KEY.jpg, KEY.txt, KEY.json.
- `good_shard`: a 3-sample img2dataset tar (keys 000000000..000000002).
- `img2dataset_dir`: a folder as img2dataset writes it: 00000.tar, 00001.tar and
  their .parquet / _stats.json sidecars.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import image_bytes as _image_bytes, write_tar


def _sample_members(key: str, caption: str = "a red square", *, ext: str = "jpg", meta: dict | None = None):
    image = _image_bytes("PNG" if ext == "png" else "JPEG")
    info = {"key": key, "caption": caption, "url": f"http://example.com/{key}.{ext}"}
    info.update(meta or {})
    return [
        (f"{key}.{ext}", image),
        (f"{key}.txt", caption.encode()),
        (f"{key}.json", json.dumps(info).encode()),
    ]


@pytest.fixture
def image_bytes():
    return _image_bytes


@pytest.fixture
def sample_members():
    return _sample_members


@pytest.fixture
def make_tar(tmp_path):
    def make(name: str, members, *, folder: Path | None = None, compress: str = "") -> Path:
        return write_tar((folder or tmp_path) / name, members, compress=compress)

    return make


@pytest.fixture
def good_shard(make_tar):
    members = []
    for i, caption in enumerate(["a red square", "a small blue circle", "two green triangles"]):
        members += _sample_members(f"{i:09d}", caption)
    return make_tar("000000.tar", members)


@pytest.fixture
def img2dataset_dir(tmp_path):
    folder = tmp_path / "img2dataset"
    for shard in range(2):
        members = []
        for i in range(2):
            members += _sample_members(f"{shard:05d}{i:04d}", f"caption {shard} {i}")
        write_tar(folder / f"{shard:05d}.tar", members)
        (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1 not really parquet PAR1")
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 2, "successes": 2}))
    return folder


@pytest.fixture
def one_thread():
    """One torch thread: on two cores shared with other work, extra intra-op threads only spin."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
