"""pipeline/shard_list.py: shard listing forms; pipeline/shards.py: one shard read as Samples and Rejects
(with pipeline/images.py's decode_image and pipeline/read_ahead.py's read_ahead)."""
from __future__ import annotations

import tarfile
import warnings

import numpy as np
import pytest
from PIL import Image

from helpers import encoded, noise_images, png_header
from mcad.pipeline import shards
from mcad.pipeline.images import decode_image
from mcad.pipeline.read_ahead import read_ahead
from mcad.pipeline.shard_list import list_shards, shard_name
from mcad.pipeline.shards import Reject, Sample, iter_shard
from mcad.storage.errors import InputError


def read(path, **kwargs):
    items = list(iter_shard(path, **kwargs))
    assert all(isinstance(i, (Sample, Reject)) for i in items)
    return items


def kept(items):
    return [i for i in items if isinstance(i, Sample)]


def rejected(items):
    return [i for i in items if isinstance(i, Reject)]


def assert_accounts(items, keys):
    """Every input sample occurrence comes out exactly once, in tar order."""
    assert [i.key for i in items] == keys


def only_reject(items, key, reason):
    (bad,) = rejected(items)
    assert (bad.key, bad.reason) == (key, reason), bad
    assert bad.detail
    return bad


# ---------------------------------------------------------------- good input


def test_good_shard_keeps_every_sample_in_order(good_shard):
    items = read(good_shard)
    assert_accounts(items, ["000000000", "000000001", "000000002"])
    assert len(kept(items)) == 3
    first = items[0]
    assert first.caption == "a red square" and first.captions == ("a red square",)
    assert first.image.mode == "RGB" and first.image.size == (8, 8)
    r, g, b = first.image.getpixel((4, 4))
    assert r > 150 and g < 80 and b < 80
    assert first.meta["url"].endswith("000000000.jpg")


def test_reasons_vocabulary_is_fixed():
    assert len(set(shards.REASONS)) == len(shards.REASONS) == 11
    assert shards.TRUNCATED_TAR in shards.REASONS and shards.UNSAFE_MEMBER in shards.REASONS


def test_captions_txt_first_then_json_list_deduplicated(make_tar, image_bytes):
    meta = b'{"captions": ["  a cat ", "a dog", "a cat", "   "], "caption": "ignored"}'
    path = make_tar("s.tar", [("k.png", image_bytes("PNG")), ("k.txt", b" a dog \n"), ("k.json", meta)])
    (sample,) = read(path)
    assert sample.captions == ("a dog", "a cat")
    assert sample.meta["caption"] == "ignored"


def test_json_caption_alone_and_unknown_members_ignored(make_tar, image_bytes):
    path = make_tar(
        "s.tar",
        [("k.JPG", image_bytes()), ("k.json", b'{"caption": "a boat"}'), ("k.cls", b"3"), ("k.0.txt", b"x")],
    )
    (sample,) = read(path)
    assert sample.captions == ("a boat",)


def test_gzip_tar_and_folder_keys(make_tar, image_bytes):
    path = make_tar("s.tar.gz", [("d/k.webp", image_bytes("WEBP")), ("d/k.txt", b"hi")], compress="gz")
    (sample,) = read(path)
    assert sample.key == "d/k" and sample.image.mode == "RGB"
    assert shard_name(path) == "s"


# ---------------------------------------------------------------- image conversions (kept)


def test_png_with_alpha_is_composited_on_white(make_tar):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # transparent black
    rgba.paste((255, 0, 0, 255), (0, 0, 4, 8))  # opaque red left half
    items = read(make_tar("s.tar", [("k.png", encoded(rgba, "PNG")), ("k.txt", b"red")]))
    (sample,) = kept(items)
    assert sample.image.mode == "RGB"
    assert sample.image.getpixel((1, 1)) == (255, 0, 0)
    assert sample.image.getpixel((6, 6)) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb(make_tar, image_bytes):
    cmyk = image_bytes("JPEG", mode="CMYK", color=(0, 255, 255, 0))  # pure red in CMYK
    (sample,) = kept(read(make_tar("s.tar", [("k.jpg", cmyk), ("k.txt", b"red")])))
    r, g, b = sample.image.getpixel((4, 4))
    assert sample.image.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16bit_png_is_scaled_not_clipped(make_tar):
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    (sample,) = kept(read(make_tar("s.tar", [("k.png", encoded(Image.fromarray(ramp), "PNG")), ("k.txt", b"ramp")])))
    pixels = np.asarray(sample.image)
    assert sample.image.mode == "RGB"
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[-1, -1].tolist() == [255, 255, 255]
    assert abs(int(pixels[4, 0, 0]) - ramp[4, 0] / 257) <= 1  # mid-grey (130), not white
    assert len(np.unique(pixels)) > 32


@pytest.mark.parametrize("mode,color", [("L", 128), ("P", 5), ("LA", (90, 255)), ("1", 1)])
def test_palette_and_grey_modes_become_rgb(make_tar, mode, color):
    image = Image.new(mode, (8, 8), color)
    if mode == "P":
        image.info["transparency"] = 0  # palette entry 0 transparent; pixels use entry 5
    (sample,) = kept(read(make_tar("s.tar", [("k.png", encoded(image, "PNG")), ("k.txt", b"c")])))
    assert sample.image.mode == "RGB" and sample.image.size == (8, 8)


# ---------------------------------------------------------------- one test per reject reason


def test_corrupt_jpeg(make_tar, image_bytes, sample_members):
    noisy = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    members = [("a.jpg", noisy[: len(noisy) // 2]), ("a.txt", b"cut")]
    members += [("b.jpg", b"\xff\xd8 definitely not a jpeg"), ("b.txt", b"junk")]
    members += sample_members("c")
    items = read(make_tar("s.tar", members))
    assert_accounts(items, ["a", "b", "c"])
    assert [i.reason for i in rejected(items)] == [shards.CORRUPT_IMAGE] * 2
    assert [s.key for s in kept(items)] == ["c"]


def test_zero_byte_image(make_tar, sample_members):
    items = read(make_tar("s.tar", [("a.jpg", b""), ("a.txt", b"empty")] + sample_members("b")))
    assert_accounts(items, ["a", "b"])
    assert "0 bytes" in only_reject(items, "a", shards.CORRUPT_IMAGE).detail


def test_image_over_pixel_limit(make_tar, image_bytes, sample_members):
    members = [("big.png", image_bytes("PNG", size=(16, 16))), ("big.txt", b"big")]
    members += [("small.png", image_bytes("PNG", size=(8, 8))), ("small.txt", b"small")]
    items = read(make_tar("s.tar", members), max_pixels=100)
    assert_accounts(items, ["big", "small"])
    assert "16x16" in only_reject(items, "big", shards.IMAGE_TOO_LARGE).detail


def test_decompression_bomb_is_checked_from_the_header(make_tar):
    members = [("warn.png", png_header(10_000, 10_000)), ("warn.txt", b"100 MP")]
    members += [("bomb.png", png_header(20_000, 20_000)), ("bomb.txt", b"400 MP")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's bomb warning must not escape
        items = read(make_tar("s.tar", members))
    assert [(i.key, i.reason) for i in items] == [("warn", shards.IMAGE_TOO_LARGE), ("bomb", shards.IMAGE_TOO_LARGE)]
    # With our limit set above it, Pillow's own hard error (2x its MAX_IMAGE_PIXELS) still rejects.
    items = read(make_tar("bomb.tar", members[2:]), max_pixels=10**12)
    assert "DecompressionBomb" in only_reject(items, "bomb", shards.IMAGE_TOO_LARGE).detail or items[0].detail


def test_missing_caption(make_tar, image_bytes, sample_members):
    members = [("a.jpg", image_bytes())] + [("b.jpg", image_bytes()), ("b.json", b'{"caption": null, "url": "u"}')]
    items = read(make_tar("s.tar", members + sample_members("c")))
    assert_accounts(items, ["a", "b", "c"])
    assert [(i.key, i.reason) for i in rejected(items)] == [("a", shards.NO_CAPTION), ("b", shards.NO_CAPTION)]


def test_empty_or_whitespace_caption(make_tar, image_bytes, sample_members):
    members = [("a.jpg", image_bytes()), ("a.txt", b"  \n\t ")]
    members += [("b.jpg", image_bytes()), ("b.json", b'{"captions": ["", " "]}')]
    items = read(make_tar("s.tar", members + sample_members("c")))
    assert_accounts(items, ["a", "b", "c"])
    assert [(i.key, i.reason) for i in rejected(items)] == [("a", shards.EMPTY_CAPTION), ("b", shards.EMPTY_CAPTION)]


def test_non_utf8_caption(make_tar, image_bytes, sample_members):
    members = [("a.jpg", image_bytes()), ("a.txt", "café".encode("latin-1"))]
    members += [("b.jpg", image_bytes()), ("b.txt", "\ufeffcafé".encode("utf-8"))]  # BOM is fine
    items = read(make_tar("s.tar", members))
    assert_accounts(items, ["a", "b"])
    only_reject(items, "a", shards.UNDECODABLE_TEXT)
    assert kept(items)[0].caption == "café"


@pytest.mark.parametrize("raw", [b'{"caption": "x"', b'["a list"]', b'{"captions": "not a list"}', b'{"caption": 3}'])
def test_malformed_json_rejects_even_with_txt(make_tar, image_bytes, sample_members, raw):
    members = [("a.jpg", image_bytes()), ("a.txt", b"fine caption"), ("a.json", raw)]
    items = read(make_tar("s.tar", members + sample_members("b")))
    assert_accounts(items, ["a", "b"])
    only_reject(items, "a", shards.MALFORMED_JSON)


def test_duplicate_keys_keep_the_first(make_tar, sample_members):
    members = sample_members("a", "first a") + sample_members("b") + sample_members("a", "second a")
    members += [("b.jpg", members[3][1]), ("b.txt", b"b again, right after"), ("b.jpg", members[3][1])]
    items = read(make_tar("s.tar", members + [("b.txt", b"and once more")]))
    assert_accounts(items, ["a", "b", "a", "b", "b"])
    assert [s.caption for s in kept(items)] == ["first a", "a red square"]
    assert [i.reason for i in rejected(items)] == [shards.DUPLICATE_KEY] * 3


def test_no_image(make_tar, sample_members):
    members = [("a.txt", b"caption only"), ("a.cls", b"1"), ("b.xyz", b"?"), ("README", b"hello")]
    items = read(make_tar("s.tar", members + sample_members("c")))
    assert_accounts(items, ["a", "b", "README", "c"])
    assert [i.reason for i in rejected(items)] == [shards.NO_IMAGE] * 3


def test_unsafe_member_names_and_links(make_tar, image_bytes, sample_members):
    members = sample_members("a")
    members += [("../evil.jpg", image_bytes()), ("../evil.txt", b"escape")]
    members += [("/abs/x.jpg", image_bytes()), ("/abs/x.txt", b"absolute")]
    members += [("l.jpg", None, tarfile.SYMTYPE), ("l.txt", b"link")]
    items = read(make_tar("s.tar", members + sample_members("b")))
    assert_accounts(items, ["a", "../evil", "/abs/x", "l", "b"])
    assert [i.reason for i in rejected(items)] == [shards.UNSAFE_MEMBER] * 3
    assert [s.key for s in kept(items)] == ["a", "b"]


def _cut(path, at: int):
    data = path.read_bytes()
    path.write_bytes(data[:at])


def _offsets(path):
    with tarfile.open(path) as tf:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tf.getmembers()}


def test_truncated_in_a_member_keeps_earlier_samples(make_tar, sample_members):
    path = make_tar("s.tar", sample_members("a") + sample_members("b") + sample_members("c"))
    _, data_at, size = _offsets(path)["b.jpg"]
    _cut(path, data_at + size // 2)
    items = read(path)
    assert_accounts(items, ["a", "b"])
    assert [s.key for s in kept(items)] == ["a"]
    only_reject(items, "b", shards.TRUNCATED_TAR)


def test_truncated_at_a_header_boundary_is_not_a_clean_end(make_tar, sample_members):
    path = make_tar("s.tar", sample_members("a") + sample_members("b") + sample_members("c"))
    header_at = _offsets(path)["c.jpg"][0]
    for cut in (header_at, header_at + 100):  # no end marker / half a header
        write = make_tar("s.tar", sample_members("a") + sample_members("b") + sample_members("c"))
        _cut(write, cut)
        items = read(write)
        # b may be missing members after the break, so it is rejected too
        assert [(i.key, type(i).__name__) for i in items] == [("a", "Sample"), ("b", "Reject")]
        assert items[1].reason == shards.TRUNCATED_TAR


def test_truncated_first_member_uses_its_key(make_tar, sample_members):
    path = make_tar("s.tar", sample_members("a"))
    _, data_at, size = _offsets(path)["a.jpg"]
    _cut(path, data_at + size // 2)
    items = read(path)
    assert_accounts(items, ["a"])
    only_reject(items, "a", shards.TRUNCATED_TAR)


@pytest.mark.parametrize("content", [b"key\tcaption\nnot a tar at all\n" * 50, b"", bytes(range(256)) * 8])
def test_not_a_tar(tmp_path, content):
    path = tmp_path / "000007.tar"
    path.write_bytes(content)
    items = read(path)
    assert len(items) == 1
    only_reject(items, "000007", shards.NOT_A_TAR)


def test_empty_tar_yields_nothing(make_tar):
    assert read(make_tar("empty.tar", [])) == []


def test_missing_shard_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="nope.tar"):
        read(tmp_path / "nope.tar")


def test_iteration_is_lazy(make_tar, sample_members):
    path = make_tar("s.tar", sample_members("a") + sample_members("b"))
    stream = iter_shard(path)
    assert next(stream).key == "a"
    stream.close()


# ---------------------------------------------------------------- listing


@pytest.fixture
def shard_dir(make_tar, sample_members, tmp_path):
    folder = tmp_path / "data"
    for i in range(4):
        make_tar(f"{i:06d}.tar", sample_members(f"k{i}"), folder=folder)
    return folder


def names(paths):
    return [shard_name(p) for p in paths]


def test_list_folder_glob_and_brace(shard_dir):
    assert names(list_shards(shard_dir)) == ["000000", "000001", "000002", "000003"]
    assert names(list_shards(str(shard_dir / "00000[12].tar"))) == ["000001", "000002"]
    assert names(list_shards(f"{shard_dir}/{{000001..000003}}.tar")) == ["000001", "000002", "000003"]
    assert all(p.startswith("/") for p in list_shards(shard_dir))


def test_list_text_file_with_comments_and_relative_paths(shard_dir, tmp_path):
    listing = tmp_path / "shards.txt"
    listing.write_text(f"# train shards\n\ndata/000002.tar\n  data/000000.tar  \n{shard_dir / '000002.tar'}\ndata/00000[3].tar\n")
    assert names(list_shards(listing)) == ["000000", "000002", "000003"]


def test_list_of_specs_sorted_and_deduplicated(shard_dir, tmp_path):
    other = tmp_path / "notes.bin"
    other.write_bytes(b"not a tar")  # named explicitly: listed, rejected when read
    spec = [str(shard_dir / "000003.tar"), shard_dir / "000000.tar", f"{shard_dir}/*.tar", other]
    paths = list_shards(tuple(spec))
    assert names(paths) == ["000000", "000001", "000002", "000003", "notes"]
    assert paths == sorted(paths)
    assert [i.reason for i in read(paths[-1])] == [shards.NOT_A_TAR]


def test_img2dataset_folder_ignores_sidecars(img2dataset_dir):
    paths = list_shards(img2dataset_dir)
    assert names(paths) == ["00000", "00001"]
    assert [s.key for p in paths for s in read(p)] == ["000000000", "000000001", "000010000", "000010001"]


@pytest.mark.parametrize("spec", ["*.tgz", "nothing/*.tar", "{a,b}/*.tar"])
def test_nothing_matches(shard_dir, spec):
    with pytest.raises(InputError, match="no shards match"):
        list_shards(f"{shard_dir}/{spec}")


def test_empty_folder_and_empty_list(tmp_path):
    with pytest.raises(InputError, match="no shards match"):
        list_shards(tmp_path)
    with pytest.raises(InputError, match="empty"):
        list_shards([])


def test_missing_paths_are_named(shard_dir, tmp_path):
    with pytest.raises(InputError, match="000004.tar"):
        list_shards(f"{shard_dir}/{{000002..000009}}.tar")
    with pytest.raises(InputError, match="missing.tar"):
        list_shards([shard_dir, tmp_path / "missing.tar"])
    listing = tmp_path / "list.txt"
    listing.write_text("data/000001.tar\ndata/gone.tar\n")
    with pytest.raises(InputError, match="gone.tar"):
        list_shards(listing)


def test_shard_name():
    assert shard_name("/x/y/000003.tar") == "000003"
    assert shard_name("a/b.tar.gz") == "b"
    assert shard_name("a/odd.bin") == "odd"


# ------------------------------------------- decoding off the reading thread


@pytest.fixture
def mixed_shard(make_tar, sample_members):
    """Good JPEGs and PNGs of several sizes between samples every kind of check rejects."""
    members = []
    for i, (h, w) in enumerate([(48, 64), (30, 30), (480, 640), (17, 9), (64, 48), (240, 320)]):
        fmt, ext = ("PNG", "png") if i % 3 == 1 else ("JPEG", "jpg")
        members += [(f"{i:04d}.{ext}", encoded(noise_images([(h, w)], seed=i)[0], fmt)),
                    (f"{i:04d}.txt", f"caption {i}".encode())]
    members += [("bad1.jpg", b"\xff\xd8 not a jpeg"), ("bad1.txt", b"broken")]    # corrupt image
    members += [("bad2.jpg", encoded(noise_images([(8, 8)])[0], "JPEG"))]         # no caption
    members += sample_members("0000")                                              # duplicate key
    members += [("zlast.jpg", encoded(noise_images([(32, 40)], seed=9)[0], "JPEG")), ("zlast.txt", b"last")]
    return make_tar("mixed.tar", members)


def _same_items(a, b):
    assert [(type(x), x.key) for x in a] == [(type(x), x.key) for x in b]
    for x, y in zip(a, b):
        if isinstance(x, Reject):
            assert (x.reason, x.detail) == (y.reason, y.detail)
        else:
            assert x.captions == y.captions and x.meta == y.meta
            assert x.image.size == y.image.size and x.image.tobytes() == y.image.tobytes()


@pytest.mark.parametrize("threads", [1, 3])
def test_decode_threads_give_the_serial_items(mixed_shard, threads):
    import hashlib

    serial_digest, threaded_digest = hashlib.sha256(), hashlib.sha256()
    serial = read(mixed_shard, digest=serial_digest)
    assert {r.reason for r in rejected(serial)} == {"corrupt_image", "no_caption", "duplicate_key"}
    _same_items(serial, read(mixed_shard, decode_threads=threads, digest=threaded_digest))
    assert threaded_digest.hexdigest() == serial_digest.hexdigest()


def test_encoded_samples_decode_to_the_same_images_when_asked(mixed_shard):
    serial = read(mixed_shard)
    lazy = list(iter_shard(mixed_shard, decode=False))
    # Only the image checks are left to the decoder: the corrupt image comes out encoded.
    assert [x.key for x in lazy] == [x.key for x in serial]
    assert [(x.key, x.reason) for x in lazy if isinstance(x, Reject)] == \
        [(x.key, x.reason) for x in rejected(serial) if x.reason != "corrupt_image"]
    encoded_ = {x.key: x for x in lazy if isinstance(x, shards.EncodedSample)}
    for sample in kept(serial):
        again = encoded_[sample.key].decoded()
        assert again.captions == sample.captions and again.image.tobytes() == sample.image.tobytes()
        assert encoded_[sample.key].image.tobytes() == sample.image.tobytes()
        assert encoded_[sample.key].caption == sample.caption
    with pytest.raises(InputError, match="sample bad1: corrupt_image"):
        encoded_["bad1"].decoded()
    # A local plain tar: the images are only referenced (offset and size), read when decoded.
    assert all(isinstance(x.encoded, shards.MemberRef) for x in encoded_.values())


def test_encoded_samples_of_a_compressed_tar_hold_their_bytes(make_tar, sample_members):
    members = sample_members("0000") + sample_members("0001", "a blue circle")
    plain, packed = make_tar("plain.tar", members), make_tar("packed.tar.gz", members, compress="gz")
    got = {}
    for path in (plain, packed):
        got[path] = [x for x in iter_shard(path, decode=False)]
    assert [type(x.encoded) for x in got[packed]] == [bytes, bytes]
    assert [type(x.encoded) for x in got[plain]] == [shards.MemberRef, shards.MemberRef]
    assert [x.data for x in got[plain]] == [x.data for x in got[packed]] == [x.encoded for x in got[packed]]
    assert [x.captions for x in got[plain]] == [("a red square",), ("a blue circle",)]
    # With a digest to feed every byte is read in one stream: the bytes are held.
    import hashlib

    assert all(isinstance(x.encoded, bytes) for x in iter_shard(plain, decode=False, digest=hashlib.sha256()))
    ref = got[plain][0].encoded
    with pytest.raises(InputError, match="cut short"):
        shards.MemberRef(ref.path, ref.offset, 10**9).read()


def test_draft_decodes_a_jpeg_at_the_smallest_scale_that_covers_the_size():
    photo = encoded(noise_images([(480, 640)])[0], "JPEG")
    full = decode_image(photo)
    assert full.size == (640, 480)
    assert decode_image(photo, draft=(48, 48)).size == (80, 60)      # 1/8
    assert decode_image(photo, draft=(224, 224)).size == (320, 240)  # 1/2
    assert decode_image(photo, draft=(300, 250)).size == (640, 480)  # 1/2 would be too small
    assert decode_image(photo, draft=(1000, 1000)).tobytes() == full.tobytes()
    png = encoded(noise_images([(480, 640)])[0], "PNG")
    assert decode_image(png, draft=(48, 48)).size == (640, 480)      # JPEG only
    cmyk = encoded(Image.new("CMYK", (64, 64), (0, 200, 200, 0)), "JPEG")
    small = decode_image(cmyk, draft=(8, 8))
    assert small.mode == "RGB" and small.size == (8, 8)
    with pytest.raises(InputError, match="corrupt_image"):
        decode_image(b"\xff\xd8 nothing")


def test_read_ahead_yields_the_items_and_prepares_each_pool_before_it_is_read(mixed_shard):
    serial = read(mixed_shard)
    prepared: list[list[str]] = []
    ahead = read_ahead(iter_shard(mixed_shard), pool_size=3, depth=1,
                       prepare=lambda pool: prepared.append([s.key for s in pool]))
    got = []
    for item in ahead:
        if isinstance(item, Sample):  # its pool was prepared before the caller saw it
            assert any(item.key in pool for pool in prepared)
        got.append(item)
    _same_items(serial, got)
    keys = [s.key for s in kept(serial)]
    assert prepared == [keys[i:i + 3] for i in range(0, len(keys), 3)]
    _same_items(serial, list(read_ahead(iter_shard(mixed_shard), pool_size=2, depth=0)))


def test_read_ahead_raises_in_the_caller_and_stops_when_the_caller_stops(tmp_path):
    import threading

    def items():
        yield from range(5)
        raise InputError("shard broke")

    got = []
    with pytest.raises(InputError, match="shard broke"):
        for x in read_ahead(items(), pool_size=2):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]  # everything before the error first

    closed = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()

    ahead = read_ahead(endless(), pool_size=4, depth=2)
    assert [next(ahead) for _ in range(6)] == list(range(6))
    ahead.close()
    assert closed.is_set()
    assert not any(t.name == "mcad-read-ahead" for t in threading.enumerate())
