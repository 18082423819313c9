"""Fault matrix, inputs (issue #8): bad input costs neither the run nor a good sample.

Damaged shards go through a real teacher pass (real Ray, pyarrow, DuckDB and HF
models; nothing mocked): good samples kept, each reject with its reason in
rejects/ and in `mcad signals stats`, kept + rejected = the input, per shard,
counted again key by key by a plain `tarfile` walk (helpers.tar_sample_keys), not
by the reader that wrote the store; tars cut in the middle (inside a member's data,
inside a header, between two members) as well as in their last sample; tar member
names are never used as paths. Bad command-line input (and a dataset
without one usable sample) ends in exit code 2 and one line, no traceback.
Per-reason unit tests of the shard reader live in tests/pipeline/test_shards.py;
the crash cases are tests/jobs/test_fault_crashes.py, the security scan
tests/jobs/test_fault_security.py.

    ./dev.sh test tests/jobs/test_fault_inputs.py                     every case here (none is slow)
    ./dev.sh test tests/jobs/test_fault_inputs.py -k CMYK              one case
"""
from __future__ import annotations

import collections
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import assert_one_line_error, image_bytes, invoke, leftovers, png_header, tar_sample_keys, write_tar
from mcad.pipeline.shards import CORRUPT_IMAGE, DUPLICATE_KEY, EMPTY_CAPTION, IMAGE_TOO_LARGE, MALFORMED_JSON, NOT_A_TAR, NO_CAPTION, TRUNCATED_TAR, UNDECODABLE_TEXT, UNSAFE_MEMBER
from mcad.storage.manifest import Manifest, REJECTED, ROWS, rejects_path, signals_path

KEPT = "kept"
CAPTION = "a small red circle left of a large blue square"


# ------------------------------------------------------------------ helpers


def image(mode: str = "RGB", fmt: str = "JPEG", color=(200, 30, 30), size=(16, 16)) -> bytes:
    return image_bytes(fmt, size, color, mode)


def sample(key: str, img: bytes | None = None, *, ext: str = "jpg", txt: bytes | None = CAPTION.encode(),
           js: bytes | None = None) -> list[tuple[str, bytes]]:
    members = [(f"{key}.{ext}", image() if img is None else img)]
    if txt is not None:
        members.append((f"{key}.txt", txt))
    if js is not None:
        members.append((f"{key}.json", js))
    return members


# ------------------------------------------------------------ damaged shards

# (case, shard, key, what the store must say about that sample)
INPUT_CASES = [
    ("corrupt JPEG", "000000", "img-corrupt-jpeg", CORRUPT_IMAGE),
    ("zero-byte image", "000000", "img-zero-byte", CORRUPT_IMAGE),
    ("PNG with alpha", "000000", "img-png-alpha", KEPT),
    ("CMYK JPEG", "000000", "img-cmyk-jpeg", KEPT),
    ("16-bit PNG", "000000", "img-png-16bit", KEPT),
    ("image over the pixel limit", "000000", "img-bomb", IMAGE_TOO_LARGE),
    ("missing caption", "000001", "cap-missing", NO_CAPTION),
    ("empty caption", "000001", "cap-empty", EMPTY_CAPTION),
    ("whitespace caption", "000001", "cap-whitespace", EMPTY_CAPTION),
    ("non-UTF-8 caption", "000001", "cap-non-utf8", UNDECODABLE_TEXT),
    ("malformed json", "000001", "cap-bad-json", MALFORMED_JSON),
    ("duplicate key (second occurrence)", "000001", "cap-dup", DUPLICATE_KEY),
    ("truncated tar", "000002", "trunc-cut", TRUNCATED_TAR),
    # Cut in the middle: the samples after the cut are not in the file at all.
    ("tar cut mid-way inside a member's data", "000006", "mid-data-2", TRUNCATED_TAR),
    ("tar cut mid-way inside a header", "000007", "mid-head-2", TRUNCATED_TAR),  # the sample read before it
    ("tar cut mid-way between two members", "000008", "mid-edge-2", TRUNCATED_TAR),
    ("file that is not a tar", "000003", "000003", NOT_A_TAR),
    ("tar member named ../", "000005", "../evil", UNSAFE_MEMBER),
    ("tar member with an absolute name", "000005", "/abs/evil", UNSAFE_MEMBER),
]
# Samples each shard holds (wholly or in part, with at least their first member's header whole; a
# file that is not a tar counts as one): kept + rejected must equal these.
INPUT_COUNTS = {"000000": 9, "000001": 9, "000002": 3, "000003": 1, "000004": 0, "000005": 4,
                "000006": 3, "000007": 3, "000008": 3}
GOOD_KEYS = {"000000": ["img-good-0", "img-good-1", "img-good-2"], "000001": ["cap-good-0", "cap-dup", "cap-good-1"],
             "000002": ["trunc-good-0", "trunc-good-1"], "000005": ["safe-good-0", "safe-good-1"],
             **{shard: [f"mid-{cut}-0", f"mid-{cut}-1"] for shard, cut in
                (("000006", "data"), ("000007", "head"), ("000008", "edge"))}}
# Tars of six samples cut in the middle: (shard, name, the member cut, where: its offset + bytes).
MID_CUTS = [("000006", "data", "mid-data-2.jpg", "offset_data", 50),  # inside the third image
            ("000007", "head", "mid-head-3.jpg", "offset", 100),      # inside the fourth sample's header
            ("000008", "edge", "mid-edge-2.txt", "offset", 0)]        # after the third image, before its caption


def cut_tar(path: Path, member: str, where: str, plus: int) -> None:
    """Cut a tar file `plus` bytes after `member`'s header (where="offset") or data ("offset_data")."""
    with tarfile.open(path) as tf:
        cut = getattr(tf.getmember(member), where) + plus
    path.write_bytes(path.read_bytes()[:cut])


def write_damaged_shards(folder: Path) -> Path:
    """Nine shards holding every input case of the matrix next to good samples."""
    folder.mkdir(parents=True)
    cmyk = image("CMYK", color=(0, 200, 200, 0))
    write_tar(folder / "000000.tar", [
        *sample("img-good-0"),
        *sample("img-corrupt-jpeg", image()[:120]),
        *sample("img-zero-byte", b""),
        *sample("img-good-1", image(color=(30, 200, 30))),
        *sample("img-png-alpha", image("RGBA", "PNG", (0, 0, 255, 0)), ext="png"),
        *sample("img-cmyk-jpeg", cmyk),
        *sample("img-png-16bit", image("I;16", "PNG", 40000), ext="png"),
        *sample("img-bomb", png_header(20000, 20000), ext="png"),
        *sample("img-good-2", image(color=(30, 30, 200))),
    ])
    write_tar(folder / "000001.tar", [
        *sample("cap-good-0"),
        *sample("cap-missing", txt=None, js=b'{"url": "http://example.com/x.jpg"}'),
        *sample("cap-empty", txt=b""),
        *sample("cap-whitespace", txt=b"  \n\t "),
        *sample("cap-non-utf8", txt=b"a caf\xe9 \xff\xfe"),
        *sample("cap-dup"),
        *sample("cap-bad-json", js=b'{"caption": "x"'),
        *sample("cap-dup", image(color=(0, 0, 0))),
        *sample("cap-good-1"),
    ])
    full = write_tar(folder / "000002.tar", [*sample("trunc-good-0"), *sample("trunc-good-1"), *sample("trunc-cut")])
    cut_tar(full, "trunc-cut.jpg", "offset_data", 50)  # cut inside the last sample's image
    (folder / "000003.tar").write_bytes(b"key\tcaption\nthis file is not a tar\n" * 40)
    write_tar(folder / "000004.tar", [])
    write_tar(folder / "000005.tar", [
        *sample("safe-good-0"),
        ("../evil.jpg", image()), ("../evil.txt", CAPTION.encode()),
        ("/abs/evil.jpg", image()), ("/abs/evil.txt", CAPTION.encode()),
        *sample("safe-good-1"),
    ])
    for shard, cut, member, where, plus in MID_CUTS:
        full = write_tar(folder / f"{shard}.tar", [m for i in range(6) for m in sample(f"mid-{cut}-{i}")])
        cut_tar(full, member, where, plus)
    return folder


@pytest.fixture(scope="module")
def damaged(ray_local, tiny_teachers, tiny_pass, tmp_path_factory):
    """The damaged shards and the store a real teacher pass made of them."""
    from mcad.jobs.teacher_pass import TeacherPassJob, run_teacher_pass

    root = tmp_path_factory.mktemp("damaged")
    data = write_damaged_shards(root / "data")
    dual, single = tiny_teachers
    run_teacher_pass(TeacherPassJob(data=str(data), dual=dual, single=single, out=str(root / "store"),
                                    **tiny_pass), progress=False)
    return data, root / "store"


def store_keys(store: Path, shard: str) -> tuple[list[str], list[tuple[str, str]]]:
    from mcad.storage import schema

    kept = pq.read_table(signals_path(store, shard)).column(schema.KEY).to_pylist()
    rej = pq.read_table(rejects_path(store, shard)).to_pylist()
    return kept, [(r[schema.REJECT_KEY], r[schema.REJECT_REASON]) for r in rej]


@pytest.mark.ray
@pytest.mark.parametrize("case, shard, key, outcome", INPUT_CASES, ids=[c[0] for c in INPUT_CASES])
def test_input_case_is_kept_or_rejected_with_its_reason(damaged, case, shard, key, outcome):
    _, store = damaged
    kept, rejected = store_keys(store, shard)
    if outcome == KEPT:
        assert key in kept and key not in dict(rejected)
    else:
        assert (key, outcome) in rejected
    if shard in GOOD_KEYS:  # the damaged shard's good samples are all kept, in order
        assert [k for k in kept if k in GOOD_KEYS[shard]] == GOOD_KEYS[shard]


@pytest.mark.ray
def test_every_shard_accounts_for_every_sample(damaged):
    data, store = damaged
    manifest = Manifest.load(store)
    assert sorted(manifest.done_shards()) == sorted(INPUT_COUNTS)  # the empty shard too
    for shard, count in INPUT_COUNTS.items():
        kept, rejected = store_keys(store, shard)
        entry = manifest.shards[shard]
        assert (entry[ROWS], entry[REJECTED]) == (len(kept), len(rejected)), shard
        assert len(kept) + len(rejected) == count, shard
        # Counted again by a plain tarfile walk, not by the reader that wrote the store: the same
        # samples, key by key (the lost tail of a tar cut mid-way is in neither).
        walked = tar_sample_keys(data / f"{shard}.tar")
        assert len(walked) == count, (shard, walked)
        assert collections.Counter(walked) == collections.Counter(kept + [key for key, _ in rejected]), shard
    # And key by key, in tar order, against the input (DuckDB over the store).
    result = invoke("signals", "validate", store, "--data", data)
    assert result.exit_code == 0, result.output
    assert leftovers(store) == []


@pytest.mark.ray
def test_stats_counts_every_reject_reason(damaged, tmp_path):
    _, store = damaged
    want = collections.Counter(outcome for _, _, _, outcome in INPUT_CASES if outcome != KEPT)
    want[UNSAFE_MEMBER] = 2
    result = invoke("signals", "stats", store, "--json", tmp_path / "stats.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "stats.json").read_text())["rejects_by_reason"] == dict(want)
    for reason, n in want.items():
        assert any(line.split() == [reason, str(n)] for line in result.output.splitlines()), reason


@pytest.mark.ray
def test_tar_member_names_are_never_used_as_paths(damaged):
    data, _ = damaged
    assert not (data.parent / "evil.jpg").exists() and not (data / "evil.jpg").exists()
    assert not Path("/abs").exists()


# ------------------------------------------------------------ bad CLI input


def _cli_case(case: str, shapes_data: Path, teachers: tuple, tmp: Path) -> tuple[list, str]:
    dual, single = teachers
    train = shapes_data / "train"

    def tp(data=train, d=dual, s=single, *extra):
        return ["pipeline", "teacher-pass", "--data", data, "--dual", d, "--single", s, "--out", tmp / "s",
                "--pool", "8", "--topk", "3", *extra]

    (tmp / "empty").mkdir()
    ts = ["pipeline", "train-student", "--store", tmp, "--data", train, "--out", tmp / "r"]
    return {
        "data does not exist": (tp(tmp / "nowhere"), "shard not found"),
        "teacher folder does not exist": (tp(train, tmp / "nowhere"), "does not exist"),
        "store does not exist": (["signals", "stats", tmp / "nowhere"], "not a signal store"),
        "K larger than the pool": (tp()[:-4] + ["--pool", "8", "--topk", "9"], "must not exceed the pool size"),
        "pool smaller than 2": (tp()[:-4] + ["--pool", "1", "--topk", "1"], "pool size must be at least 2"),
        "dual is not a CLIP": (tp(train, single, single), "expected 'clip'"),
        "single is not a BLIP-ITM": (tp(train, dual, dual), "expected 'blip'"),
        "teacher folder is not a model": (tp(train, tmp / "empty"), "not a Hugging Face model directory"),
        "eval model is not a CLIP": (["eval", "--model", single, "--data", train], "expected 'clip'"),
        "negative loss weight": (ts + ["--w-feat", "-0.5"], "w_feat must be >= 0"),
        "negative alpha": (ts + ["--alpha", "-1"], "alpha must be >= 0"),
        "empty dataset (no shards)": (tp(tmp / "empty"), "no shards match"),
        "not a number": (tp()[:-2] + ["--topk", "many"], "'many' is not a valid integer"),
    }[case]


CLI_CASES = ["data does not exist", "teacher folder does not exist", "store does not exist",
             "K larger than the pool", "pool smaller than 2", "dual is not a CLIP", "single is not a BLIP-ITM",
             "teacher folder is not a model", "eval model is not a CLIP", "negative loss weight",
             "negative alpha", "empty dataset (no shards)", "not a number"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_cli_input_is_one_line_and_exit_2(case, shapes_data, tiny_teachers, tmp_path):
    args, needle = _cli_case(case, shapes_data, tiny_teachers, tmp_path)
    assert_one_line_error(invoke(*args), needle)
    assert not (tmp_path / "s").exists()  # refused before anything was written


@pytest.mark.ray
def test_dataset_without_a_usable_sample_is_one_line_and_exit_2(tiny_teachers, tiny_pass, tmp_path):
    """Found only once the pass reads the shards (in a Ray task): still one line."""
    data = tmp_path / "data"
    data.mkdir()
    write_tar(data / "000000.tar", [])
    (data / "000001.tar").write_bytes(b"not a tar\n" * 10)
    dual, single = tiny_teachers
    result = invoke("pipeline", "teacher-pass", "--data", data, "--dual", dual, "--single", single,
                    "--out", tmp_path / "s", "--pool", 8, "--topk", 3)
    assert_one_line_error(result, "no kept samples")
