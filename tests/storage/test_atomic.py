"""storage/atomic.py: a failed write leaves nothing behind and names the file it meant to write."""
from __future__ import annotations

import errno

import pytest

from mcad.storage.atomic import TMP_PREFIX, atomic_write


def test_a_write_that_fails_leaves_no_file_and_names_the_target(tmp_path):
    target = tmp_path / "signals" / "000001.parquet"

    def disk_full(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")  # what write(2) says on a full disk

    with pytest.raises(OSError) as info:
        atomic_write(target, disk_full)
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(target))
    assert list((tmp_path / "signals").iterdir()) == []


def test_an_existing_file_survives_a_failed_rewrite(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old and whole")
    with pytest.raises(OSError):
        atomic_write(target, lambda tmp: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    assert target.read_text() == "old and whole"
    assert not list(tmp_path.glob(TMP_PREFIX + "*"))


def test_a_folder_is_replaced_whole_and_a_failed_fill_keeps_the_old_one(tmp_path):
    from mcad.storage.atomic import atomic_write_dir

    target = tmp_path / "last"
    atomic_write_dir(target, lambda tmp: (tmp / "a").write_text("1"))
    assert (target / "a").read_text() == "1"
    atomic_write_dir(target, lambda tmp: (tmp / "b").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == ["b"]  # the new folder, not a merge

    def broken(tmp):
        (tmp / "c").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_write_dir(target, broken)
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temporary or old folder left
