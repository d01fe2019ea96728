"""Image folder trees as collections, and the decoding every source shares: real files written with Pillow.

Covers both layouts, the seeded split's stability, versions, reads of files gone since the listing, every
image mode and format a collection may hold, EXIF orientation, and the refusals (corrupt bytes, unsupported
formats, a header claiming a huge image) that must cost nothing and leak no warning.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import warnings
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from cifar_transfer.errors import ConfigError, SourceError
from cifar_transfer.sources.folder import FolderSource
from cifar_transfer.sources.images import MAX_DECODE_MB, UndecodableImage, decode_image, decode_into

SIZE = 16
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


@pytest.fixture(autouse=True)
def warnings_are_errors():
    """Decoding must not leak a single Pillow warning (set here, not by a mark: the suite may run without pytest's
    warnings plugin)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the S3 client's, as pyproject.toml ignores
        yield


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def write(root: Path, key: str, data: bytes) -> None:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def halves(size: tuple[int, int], left, right, mode: str = "RGB") -> Image.Image:
    """An image whose left half is `left` and right half `right`."""
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def two_frame_gif() -> bytes:
    """A palette GIF whose first frame is green and second red."""
    frames = [Image.new("P", (24, 24), index) for index in (0, 1)]
    for frame in frames:
        frame.putpalette([*GREEN, *RED] + [0] * 762)
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def transparent_palette_png() -> bytes:
    """A palette PNG: left half a transparent red, right half opaque blue."""
    image = halves((30, 30), 0, 1, mode="P")
    image.putpalette([*RED, *BLUE] + [0] * 762)
    return encode(image, "PNG", transparency=0)


def png_header(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header (IHDR, with its CRC) claims `width` x `height` pixels."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)  # after the signature (8), chunk length (4) and type (4)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# Each image of the class-folders tree, with the colour its centre decodes to (None: it must not decode).
IMAGES = {
    "cat/photo.jpg": (encode(Image.new("RGB", (300, 200), RED), "JPEG", quality=95), RED),
    "cat/nested/deep/alpha.png": (encode(halves((20, 37), (255, 0, 0, 0), (0, 0, 255, 255), "RGBA"), "PNG"), None),
    "cat/anim.gif": (two_frame_gif(), GREEN),
    "cat/palette.png": (transparent_palette_png(), None),
    "cat/corrupt.jpg": (b"\xff\xd8\xff\xe0 this is not really a JPEG", None),
    "dog/photo.webp": (encode(Image.new("RGB", (64, 48), BLUE), "WEBP", quality=95), BLUE),
    "dog/photo.bmp": (encode(Image.new("RGB", (20, 37), GREEN), "BMP"), GREEN),
    "dog/gray.jpg": (encode(Image.new("L", (40, 40), 77), "JPEG", quality=95), (77, 77, 77)),
    "dog/print.JPG": (encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", quality=95), RED),
    "dog/depth.png": (encode(Image.fromarray(np.full((30, 50), 32896, np.uint16)), "PNG"), (128, 128, 128)),
    "dog/scan.TIFF": (encode(Image.new("RGB", (33, 21), (10, 20, 30)), "TIFF"), (10, 20, 30)),
}
STRAYS = {"README.md": b"a collection", "cat/notes.txt": b"not an image", "bird/about.txt": b"no images yet"}
HIDDEN = {".git/config": b"x", "cat/.DS_Store": b"x", "cat/._photo.jpg": b"x", ".cache/dog/photo.png": b"x"}


@pytest.fixture
def class_tree(tmp_path) -> Path:
    for key, (data, _) in IMAGES.items():
        write(tmp_path, key, data)
    for key, data in {**STRAYS, **HIDDEN}.items():
        write(tmp_path, key, data)
    return tmp_path


def read_all(source: FolderSource, listing) -> dict:
    items = listing.splits["train"] + listing.splits["test"]
    return {item.key: (data, reason) for item, data, reason in source.read_items(items)}


def test_class_folders_list_images_skip_strays_and_ignore_hidden_files(class_tree):
    listing = FolderSource(str(class_tree)).list_items()

    assert listing.classes == ["cat", "dog"]  # bird/ holds no image: not a class
    items = listing.splits["train"] + listing.splits["test"]
    assert sorted(item.key for item in items) == sorted(IMAGES)
    assert all(item.label == listing.classes.index(item.key.split("/")[0]) for item in items)
    for split in listing.splits.values():
        assert [item.key for item in split] == sorted(item.key for item in split)
    assert listing.skipped == [
        "README.md: not in a class folder",
        "bird/about.txt: not an image file (extension)",
        "cat/notes.txt: not an image file (extension)",
    ]
    assert listing.identity == {
        "format": "folder",
        "root": str(class_tree),
        "layout": "class-folders",
        "test_fraction": 0.2,
        "split_seed": 0,
        "classes": ["cat", "dog"],
    }


def test_a_local_tree_is_listed_with_the_versions_fsspec_gives(class_tree):
    """Listing a local tree walks it itself (twice fsspec's speed at 200,000 files); the versions must stay what
    fsspec's `find` gives, or every feature set made before would be recomputed."""
    write(class_tree, "dog/deeper/still/photo.png", next(iter(IMAGES.values()))[0])
    (class_tree / "cat" / "linked.jpg").symlink_to(class_tree / next(iter(IMAGES)))
    (class_tree / "dog" / "dangling.png").symlink_to(class_tree / "nowhere.png")
    (class_tree / "cat" / "folder-link").symlink_to(class_tree / "dog", target_is_directory=True)

    found = fsspec.filesystem("file").find(str(class_tree), detail=True)
    start = len(str(class_tree)) + 1
    expected = {name[start:]: f"{info['size']}-{info['mtime']}" for name, info in found.items() if "/." not in "/" + name[start:]}
    listing = FolderSource(str(class_tree)).list_items()
    versions = {item.key: item.version for items in listing.splits.values() for item in items}
    assert {"dog/deeper/still/photo.png", "cat/linked.jpg", "dog/dangling.png"} <= set(versions)
    assert versions == {key: version for key, version in expected.items() if key in versions}
    assert set(expected) - set(versions) == {"README.md", "bird/about.txt", "cat/notes.txt", "cat/folder-link"}
    assert "cat/folder-link: not an image file (extension)" in listing.skipped  # a link to a folder is not walked into


def test_every_image_decodes_to_square_rgb_and_a_corrupt_one_says_why(class_tree):
    source = FolderSource(str(class_tree))
    read = read_all(source, source.list_items())

    for key, (data, expected) in IMAGES.items():
        assert read[key] == (data, None)
        if key == "cat/corrupt.jpg":
            with pytest.raises(UndecodableImage, match="^cannot decode the image: .+") as refused:
                decode_image(data, SIZE)
            assert isinstance(refused.value, ValueError) and "\n" not in refused.value.reason
            continue
        pixels = decode_image(data, SIZE)
        assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8, key
        if expected is not None:
            assert np.abs(pixels[SIZE // 2, SIZE // 2].astype(int) - expected).max() <= 12, key

    for key in ("cat/nested/deep/alpha.png", "cat/palette.png"):  # transparency is composited over white
        pixels = decode_image(IMAGES[key][0], SIZE)
        assert (pixels[:, :4] == WHITE).all() and (pixels[:, -4:] == BLUE).all(), key


def test_a_shards_images_decode_on_several_threads_into_the_rows_one_thread_gives():
    """`decode_into` as a shard uses it: every image of IMAGES (the corrupt one included) and one that was never read,
    many times over, on four threads and on one; both views. The rows, the reasons and their order are the same, and
    the images really were decoded on several threads (their names, seen while the encoded images are taken)."""
    keys = list(IMAGES) * 6
    encoded = [(IMAGES[key][0], None) for key in keys] + [(None, "gone since the listing")]
    seen_threads: set[str] = set()

    def taken(rows):
        for row in rows:
            seen_threads.update(thread.name for thread in threading.enumerate() if thread.name.startswith("decode"))
            yield row

    for mirrored in (False, True):
        one = np.zeros((len(encoded), SIZE, SIZE, 3), np.uint8)
        four = np.zeros_like(one)
        reasons_one = decode_into(one, iter(encoded), mirrored=mirrored, threads=1)
        reasons_four = decode_into(four, taken(encoded), mirrored=mirrored, threads=4)
        assert reasons_four == reasons_one
        assert np.array_equal(four, one)
        for row, key in enumerate(keys):
            data = IMAGES[key][0]
            if key == "cat/corrupt.jpg":
                assert reasons_one[row].startswith("cannot decode the image: "), reasons_one[row]
                continue
            assert reasons_one[row] is None
            expected = decode_image(data, SIZE)
            assert np.array_equal(one[row], expected[:, ::-1] if mirrored else expected), (key, mirrored)
        assert reasons_one[-1] == "gone since the listing"
    assert len(seen_threads) > 1, seen_threads


def test_exif_orientation_is_applied():
    # Stored: left half red, right half blue. Orientation 6 means "rotate 90 degrees clockwise to display",
    # which brings the left half to the top.
    stored = halves((40, 20), RED, BLUE)
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = decode_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()), SIZE)
    plain = decode_image(encode(stored, "JPEG", quality=95), SIZE)

    def close(pixels, colour):
        return np.abs(pixels.astype(int) - colour).max() <= 40

    assert close(upright[:4], RED) and close(upright[-4:], BLUE)
    assert close(plain[:, :4], RED) and close(plain[:, -4:], BLUE)


def test_resize_is_one_bilinear_squash_of_the_whole_image():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 200, 3), dtype=np.uint8))
    expected = np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BILINEAR, reducing_gap=None))
    assert np.array_equal(decode_image(encode(image, "PNG"), SIZE), expected)


def test_a_large_jpeg_decoded_at_reduced_scale_matches_a_full_decode():
    rows, columns = np.mgrid[0:1200, 0:1600]
    image = Image.fromarray(np.stack([rows * 255 // 1200, columns * 255 // 1600, (rows + columns) % 256], -1).astype(np.uint8))
    data = encode(image, "JPEG", quality=95)
    full = np.asarray(Image.open(io.BytesIO(data)).resize((SIZE, SIZE), Image.Resampling.BILINEAR, reducing_gap=None))
    assert np.abs(decode_image(data, SIZE).astype(int) - full).mean() < 3


def test_refusals_are_one_line_undecodable_image_errors():
    cases = {
        b"": "not an image in a supported format",
        b"plain text, not an image": "not an image in a supported format",
        encode(Image.new("RGB", (16, 16)), "ICO"): "not an image in a supported format",  # a format not opened
        png_header(0, 10): "not an image in a supported format",  # Pillow opens no empty image
        encode(Image.new("RGB", (64, 64), RED), "PNG")[:-40]: "cannot decode the image: .*truncated",
        png_header(12_000, 12_000): f"12000x12000 pixels of RGB: decoding it takes 549 MiB, over the cap of {MAX_DECODE_MB} MiB",
        encode(Image.new("LAB", (8, 8), (50, 0, 0)), "TIFF"): "unsupported colour mode LAB",  # not wrong colours
    }
    for data, reason in cases.items():
        with pytest.raises(UndecodableImage, match=reason):
            decode_image(data, SIZE)


HUGE_HEADER_CHILD = """if True:
    import sys, time
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = None  # the cap must not depend on Pillow's global limit
    from cifar_transfer.sources.images import UndecodableImage, decode_image
    def peak_kib():  # VmHWM: this process's own peak (ru_maxrss carries the forking parent's across exec)
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    data = open(sys.argv[1], "rb").read()
    base, started = peak_kib(), time.perf_counter()
    try:
        decode_image(data, 16)
    except UndecodableImage as error:
        print(error.reason)
    print(time.perf_counter() - started, peak_kib() - base)
"""


def test_a_huge_header_is_refused_by_the_cap_before_any_allocation(tmp_path):
    """In a child process, whose own peak memory is measured: 30 GB of RGB, if it were decoded."""
    (tmp_path / "huge.png").write_bytes(png_header(100_000, 100_000))
    done = subprocess.run(
        [sys.executable, "-c", HUGE_HEADER_CHILD, str(tmp_path / "huge.png")], capture_output=True, text=True, timeout=60, check=True
    )
    reason, measures = done.stdout.strip().splitlines()
    seconds, grown_kib = measures.split()
    assert reason.startswith("image is 100000x100000 pixels of RGB: decoding it takes") and "over the cap" in reason
    assert float(seconds) < 1 and int(grown_kib) < 50_000


def test_train_and_test_folders_give_the_splits(tmp_path):
    pixel = encode(Image.new("RGB", (8, 8), RED), "PNG")
    for key in (
        "train/cat/a.png",
        "train/dog/sub/b.png",
        "test/cat/c.png",
        "test/bird/d.png",
        "train/stray.png",
        "extra/cat/e.png",
        "test/.hidden/f.png",
    ):
        write(tmp_path, key, pixel)

    listing = FolderSource(str(tmp_path), test_fraction=0.5, split_seed=3).list_items()

    assert listing.classes == ["bird", "cat", "dog"]  # the union of both splits' class folders
    assert [(item.key, item.label) for item in listing.splits["train"]] == [("train/cat/a.png", 1), ("train/dog/sub/b.png", 2)]
    assert [(item.key, item.label) for item in listing.splits["test"]] == [("test/bird/d.png", 0), ("test/cat/c.png", 1)]
    assert listing.skipped == [
        "extra/cat/e.png: not in ROOT/train/<class>/ or ROOT/test/<class>/",
        "train/stray.png: not in ROOT/train/<class>/ or ROOT/test/<class>/",
    ]
    assert listing.identity == {
        "format": "folder",
        "root": str(tmp_path),
        "layout": "train-test-folders",
        "classes": ["bird", "cat", "dog"],
    }


def test_trees_without_class_folders_are_refused_in_one_line(tmp_path):
    with pytest.raises(SourceError, match=f"^{tmp_path} holds no images in class folders .*ROOT/<class>/<image>"):
        FolderSource(str(tmp_path)).list_items()  # empty
    with pytest.raises(SourceError, match="holds no images"):
        FolderSource(str(tmp_path / "missing")).list_items()
    write(tmp_path, "photo.jpg", b"x")
    write(tmp_path, "cat/notes.txt", b"x")
    with pytest.raises(SourceError, match=r"\(2 other files\)"):
        FolderSource(str(tmp_path)).list_items()
    write(tmp_path, "train/cat/a.jpg", b"x")
    with pytest.raises(SourceError, match="has a train/ folder but no test/ folder"):
        FolderSource(str(tmp_path)).list_items()
    with pytest.raises(ConfigError, match="test_fraction"):
        FolderSource(str(tmp_path), test_fraction=1.5)


def test_a_relative_root_is_shown_absolute(tmp_path, monkeypatch):
    write(tmp_path, "data/cat/a.jpg", b"x")
    monkeypatch.chdir(tmp_path)
    assert FolderSource("./data/../data/").list_items().identity["root"] == str(tmp_path / "data")


def test_the_seeded_split_keeps_every_image_in_its_split_as_the_tree_changes(tmp_path):
    for number in range(1000):
        write(tmp_path, f"class{number % 4}/{number:04d}.png", b"")
    before = FolderSource(str(tmp_path)).list_items()
    test_share = len(before.splits["test"]) / 1000
    assert 0.15 < test_share < 0.25

    for number in range(1000, 1300):
        write(tmp_path, f"class{number % 4}/{number:04d}.png", b"")
    for number in range(0, 1000, 10):
        (tmp_path / f"class{number % 4}/{number:04d}.png").unlink()
    after = FolderSource(str(tmp_path)).list_items()

    def split_of(listing):
        return {item.key: split for split, items in listing.splits.items() for item in items}

    kept = {key: split for key, split in split_of(before).items() if (tmp_path / key).exists()}
    assert len(kept) == 900 and kept.items() <= split_of(after).items()
    assert split_of(FolderSource(str(tmp_path), split_seed=1).list_items()) != split_of(after)
    assert len(FolderSource(str(tmp_path), test_fraction=0.0).list_items().splits["test"]) == 0


def test_versions_change_when_a_file_is_rewritten(tmp_path):
    write(tmp_path, "cat/a.png", encode(Image.new("RGB", (8, 8), RED), "PNG"))
    write(tmp_path, "cat/b.png", encode(Image.new("RGB", (8, 8), RED), "PNG"))

    def versions():
        return {item.key: item.version for item in FolderSource(str(tmp_path), test_fraction=0).list_items().splits["train"]}

    first = versions()
    assert first == versions()
    write(tmp_path, "cat/a.png", encode(Image.new("RGB", (9, 9), BLUE), "PNG"))  # other bytes, other size
    second = versions()
    assert second["cat/a.png"] != first["cat/a.png"] and second["cat/b.png"] == first["cat/b.png"]
    write(tmp_path, "cat/b.png", encode(Image.new("RGB", (8, 8), GREEN), "PNG"))  # same size, written later:
    later = os.stat(tmp_path / "cat/b.png").st_mtime_ns + 1_000_000  # a rewrite a millisecond on
    os.utime(tmp_path / "cat/b.png", ns=(later, later))
    assert versions()["cat/b.png"] != first["cat/b.png"]


def test_reads_keep_order_across_batches_and_report_files_gone_since_the_listing(tmp_path):
    for number in range(150):
        write(tmp_path, f"cat/{number:03d}.png", f"bytes of {number}".encode())
    source = FolderSource(str(tmp_path), test_fraction=0)
    items = source.list_items().splits["train"][::-1]  # any order the caller asks for
    for number in (0, 70, 149):
        (tmp_path / f"cat/{number:03d}.png").unlink()

    read = list(source.read_items(items))

    assert [item.key for item, _, _ in read] == [item.key for item in items]
    for item, data, reason in read:
        number = int(item.key[4:7])
        if number in (0, 70, 149):
            assert data is None and reason == "file not found: deleted or moved since the collection was listed"
        else:
            assert data == f"bytes of {number}".encode() and reason is None


def test_any_fsspec_url_is_a_root(class_tree):
    fs = fsspec.filesystem("memory")
    root = f"memory://folders-{uuid.uuid4().hex}"
    try:
        for path in class_tree.rglob("*"):
            if path.is_file():
                fs.pipe_file(f"{root}/{path.relative_to(class_tree).as_posix()}", path.read_bytes())
        source = FolderSource(root + "/")
        listing = source.list_items()
        local = FolderSource(str(class_tree)).list_items()

        assert listing.identity == {**local.identity, "root": root}
        assert listing.skipped == local.skipped
        assert {split: [(item.key, item.label) for item in items] for split, items in listing.splits.items()} == {
            split: [(item.key, item.label) for item in items] for split, items in local.splits.items()
        }
        assert all(item.version.startswith(f"{len(IMAGES[item.key][0])}-") for item in local.splits["train"])
        assert {key: data for key, (data, _) in read_all(source, listing).items()} == {key: data for key, (data, _) in IMAGES.items()}
    finally:
        fs.rm(root, recursive=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def s3_bucket(monkeypatch):
    """An empty bucket on a moto S3 server process (a real S3 API, reached through s3fs)."""
    pytest.importorskip("moto")
    from s3fs import S3FileSystem

    endpoint = f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", endpoint.rsplit(":", 1)[1]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.05)
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        S3FileSystem.clear_instance_cache()
        fs = S3FileSystem()
        fs.mkdir("bucket")
        yield fs
    finally:
        server.terminate()
        server.wait()
        S3FileSystem.clear_instance_cache()


def test_an_s3_tree_lists_with_etags_and_reads_in_concurrent_batches(s3_bucket):
    pixel = encode(Image.new("RGB", (8, 8), RED), "PNG")
    for number in range(70):  # more than one read batch
        s3_bucket.pipe_file(f"bucket/tree/{('cat', 'dog')[number % 2]}/{number:02d}.png", pixel + bytes([number]))
    s3_bucket.pipe_file("bucket/tree/dog/notes.txt", b"x")
    source = FolderSource("s3://bucket/tree")
    listing = source.list_items()

    assert listing.classes == ["cat", "dog"] and listing.skipped == ["dog/notes.txt: not an image file (extension)"]
    assert listing.identity["root"] == "s3://bucket/tree"
    items = listing.splits["train"] + listing.splits["test"]
    assert len(items) == 70 and all(len(item.version) > len(f"{len(pixel) + 1}-") for item in items)  # size-ETag
    s3_bucket.rm(f"bucket/tree/{items[5].key}")
    read = list(source.read_items(items))
    assert [item.key for item, _, _ in read] == [item.key for item in items]
    assert read[5][1:] == (None, "file not found: deleted or moved since the collection was listed")
    assert all(data == pixel + bytes([int(item.key[4:6])]) for item, data, _ in read[:5] + read[6:])

    s3_bucket.pipe_file(f"bucket/tree/{items[0].key}", pixel + b"other")
    relisted = {item.key: item.version for split in source.list_items().splits.values() for item in split}
    assert relisted[items[0].key] != items[0].version and relisted[items[1].key] == items[1].version
