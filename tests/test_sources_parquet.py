"""ParquetSource on real Parquet files: a table written by Hugging Face `datasets`, and tables written by pyarrow
with the layouts other tools produce (a plain binary column, no class names, several row groups)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image as PILImage

from cifar_transfer.errors import ConfigError, SourceError
from cifar_transfer.sources.base import Item
from cifar_transfer.sources.parquet import HF_METADATA_KEY, ParquetSource

CLASSES = ["cat", "dog", "frog"]


def pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(pixels(seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(PILImage.open(io.BytesIO(data)).convert("RGB"))


def write_table(
    path,
    seeds: list[int | None],
    labels: list[int | None],
    *,
    struct: bool = True,
    image_column: str = "image",
    label_column: str = "label",
    names: list[str] | None = None,
    row_group_size: int | None = None,
) -> None:
    """A table as `datasets` lays it out (struct image column, class names in the schema metadata) or as a plain
    binary column; a None seed is a row without an image."""
    images = [None if seed is None else png(seed) for seed in seeds]
    if struct:
        image_array = pa.array(
            [None if data is None else {"bytes": data, "path": None} for data in images],
            pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
    else:
        image_array = pa.array(images, pa.binary())
    table = pa.table({image_column: image_array, label_column: pa.array(labels, pa.int64())})
    if names is not None:
        features = {label_column: {"names": names, "_type": "ClassLabel"}, image_column: {"_type": "Image"}}
        table = table.replace_schema_metadata({HF_METADATA_KEY: json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)


def read_all(source: ParquetSource, items: list[Item]) -> list[tuple[str, bytes | None, str | None]]:
    return [(item.key, data, reason) for item, data, reason in source.read_items(items)]


def test_hub_dataset_written_by_datasets(tmp_path):
    """The layout the real `datasets` library writes: splits from Hub file names, class names from the metadata."""
    import datasets

    datasets.disable_progress_bars()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    written = {"train": ([0, 1, 2, 3, 4], [0, 1, 2, 0, 1]), "test": ([10, 11, 12], [2, 2, 0])}
    for split, (seeds, labels) in written.items():
        images = [PILImage.fromarray(pixels(seed)) for seed in seeds]
        dataset = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        dataset.to_parquet(str(tmp_path / "data" / f"{split}-00000-of-00001.parquet"))

    stored = pq.ParquetFile(tmp_path / "data" / "train-00000-of-00001.parquet").schema_arrow
    assert stored.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert json.loads(stored.metadata[HF_METADATA_KEY])["info"]["features"]["label"] == {"names": CLASSES, "_type": "ClassLabel"}

    source = ParquetSource(str(tmp_path))
    listing = source.list_items()
    assert listing.classes == CLASSES
    assert listing.skipped == []
    assert listing.identity == {
        "format": "parquet",
        "source": str(tmp_path),
        "image_column": "image",
        "label_column": "label",
        "split": "files",
        "classes": CLASSES,
    }
    for split, (seeds, labels) in written.items():
        items = listing.splits[split]
        assert [item.key for item in items] == [f"data/{split}-00000-of-00001.parquet#{row}" for row in range(len(seeds))]
        assert [item.label for item in items] == labels
        read = read_all(source, items)
        assert [reason for _, _, reason in read] == [None] * len(seeds)
        for (_, data, _), seed in zip(read, seeds, strict=True):
            assert np.array_equal(decoded(data), pixels(seed))


def test_validation_is_the_test_split_only_without_test_files(tmp_path):
    write_table(tmp_path / "train" / "0000.parquet", [0, 1], [0, 1], names=CLASSES)
    write_table(tmp_path / "validation.parquet", [2], [2], names=CLASSES)
    listing = ParquetSource(str(tmp_path)).list_items()
    assert [item.key for item in listing.splits["train"]] == ["train/0000.parquet#0", "train/0000.parquet#1"]
    assert [item.key for item in listing.splits["test"]] == ["validation.parquet#0"]

    write_table(tmp_path / "test-00000-of-00001.parquet", [3], [0], names=CLASSES)
    write_table(tmp_path / "notes.parquet", [4], [0], names=CLASSES)
    listing = ParquetSource(str(tmp_path)).list_items()
    assert [item.key for item in listing.splits["test"]] == ["test-00000-of-00001.parquet#0"]
    assert [entry.split(":")[0] for entry in listing.skipped] == ["notes.parquet", "validation.parquet"]


def test_seeded_split_is_stable_when_a_file_is_added(tmp_path):
    write_table(tmp_path / "part-0.parquet", list(range(200)), [row % 3 for row in range(200)], names=CLASSES)
    source = ParquetSource(str(tmp_path), test_fraction=0.25, split_seed=7)
    first = source.list_items()
    assert first.identity["split"] == {"test_fraction": 0.25, "split_seed": 7}
    assert 30 < len(first.splits["test"]) < 70
    assert sum(len(items) for items in first.splits.values()) == 200
    assert all(items == sorted(items, key=lambda item: item.key) for items in first.splits.values())
    for item in first.splits["test"]:  # the documented rule, so other tools can reproduce the split
        assert int(hashlib.sha256(f"7:{item.key}".encode()).hexdigest()[:8], 16) / 2**32 < 0.25

    write_table(tmp_path / "part-1.parquet", list(range(200, 250)), [0] * 50, names=CLASSES)
    second = source.list_items()
    assert second.identity == first.identity
    for split in ("train", "test"):
        old = [item for item in second.splits[split] if item.key.startswith("part-0")]
        assert old == first.splits[split]  # same keys, labels and versions
    assert sum(len(items) for items in second.splits.values()) == 250

    other_seed = ParquetSource(str(tmp_path), test_fraction=0.25, split_seed=8).list_items()
    assert other_seed.splits["test"] != second.splits["test"]

    os.utime(tmp_path / "part-1.parquet", ns=(1, 1))  # a rewrite: new mtime
    third = source.list_items()
    versions = {item.key.split("#")[0]: item.version for items in third.splits.values() for item in items}
    assert versions["part-0.parquet"] == first.splits["train"][0].version
    assert versions["part-1.parquet"] != next(item.version for item in second.splits["train"] if item.key.startswith("part-1"))


def test_binary_column_with_a_classes_file(tmp_path):
    write_table(tmp_path / "table.parquet", [5, 6, 7], [2, 0, 1], struct=False, image_column="img", label_column="y")
    (tmp_path / "classes.txt").write_text("plane\ncar\n\nbird\n")
    source = ParquetSource(
        str(tmp_path / "table.parquet"), image_column="img", label_column="y", classes_file=str(tmp_path / "classes.txt"), test_fraction=0.5
    )
    listing = source.list_items()
    assert listing.classes == ["plane", "car", "bird"]
    items = sorted(listing.splits["train"] + listing.splits["test"], key=lambda item: item.key)
    assert [(item.key, item.label) for item in items] == [("table.parquet#0", 2), ("table.parquet#1", 0), ("table.parquet#2", 1)]
    for (_, data, reason), seed in zip(read_all(source, items), [5, 6, 7], strict=True):
        assert reason is None and np.array_equal(decoded(data), pixels(seed))

    (tmp_path / "classes.json").write_text(json.dumps(["a", "b", "c"]))
    assert ParquetSource(
        str(tmp_path), image_column="img", label_column="y", classes_file=str(tmp_path / "classes.json")
    ).list_items().classes == ["a", "b", "c"]
    (tmp_path / "twice.txt").write_text("a\na\n")
    with pytest.raises(ConfigError, match="each class once"):
        ParquetSource(str(tmp_path), image_column="img", label_column="y", classes_file=str(tmp_path / "twice.txt")).list_items()


def test_classes_default_to_label_numbers_with_a_warning(tmp_path, caplog):
    write_table(tmp_path / "table.parquet", [0, 1], [0, 4])
    with caplog.at_level(logging.WARNING, logger="cifar_transfer.sources.parquet"):
        listing = ParquetSource(str(tmp_path)).list_items()
    assert listing.classes == ["0", "1", "2", "3", "4"]
    assert "--classes FILE" in caplog.text


def test_unlabelled_rows_are_skipped_and_imageless_rows_unreadable(tmp_path):
    write_table(tmp_path / "train.parquet", [0, None, 2, 3, 4], [0, 1, 3, None, -1], names=CLASSES)
    write_table(tmp_path / "test.parquet", [5], [1], names=CLASSES)
    source = ParquetSource(str(tmp_path))
    listing = source.list_items()
    assert [item.key for item in listing.splits["train"]] == ["train.parquet#0", "train.parquet#1"]
    assert listing.skipped == [] and listing.unusable["test"] == []
    assert [f"{entry.key}: {entry.reason}" for entry in listing.unusable["train"]] == [
        "train.parquet#2: label 3 is not a class index 0..2",
        "train.parquet#3: no label",
        "train.parquet#4: label -1 is not a class index 0..2",
    ]
    (_, data, reason), (_, missing, why) = read_all(source, listing.splits["train"])
    assert reason is None and np.array_equal(decoded(data), pixels(0))
    assert missing is None and why == "no image"


def test_path_only_rows_say_so(tmp_path):
    image = pa.array([{"bytes": None, "path": "img/0.png"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": image, "label": pa.array([0])}), tmp_path / "t.parquet")
    source = ParquetSource(str(tmp_path / "t.parquet"))
    [(_, data, reason)] = read_all(source, [item for items in source.list_items().splits.values() for item in items])
    assert data is None and "img/0.png" in reason


@pytest.mark.parametrize(
    ("kwargs", "table", "message"),
    [
        ({"image_column": "picture"}, {}, "has no column 'picture'.*--image-column NAME"),
        ({"label_column": "class"}, {}, "has no column 'class'.*--label-column NAME"),
        ({"image_column": "label"}, {}, "not encoded images.*--image-column NAME"),
        ({}, {"label": pa.array(["cat"])}, "not integer class indices.*--label-column NAME"),
    ],
)
def test_unusable_tables_name_the_fix(tmp_path, kwargs, table, message):
    columns = {"image": pa.array([png(0)]), "label": pa.array([0])} | table
    pq.write_table(pa.table(columns), tmp_path / "t.parquet")
    with pytest.raises(SourceError, match=message):
        ParquetSource(str(tmp_path), **kwargs).list_items()


def test_no_parquet_files(tmp_path):
    (tmp_path / "readme.txt").write_text("no table here")
    write_table(tmp_path / ".hidden" / "train.parquet", [0], [0])
    with pytest.raises(SourceError, match="no Parquet files"):
        ParquetSource(str(tmp_path)).list_items()
    with pytest.raises(SourceError, match="no Parquet files"):
        ParquetSource(str(tmp_path / "missing.parquet")).list_items()
    (tmp_path / "readme.parquet").write_text("not a table")
    with pytest.raises(SourceError, match="readme.parquet is not a Parquet file"):
        ParquetSource(str(tmp_path)).list_items()


def test_reads_rows_from_the_middle_of_many_row_groups_in_the_order_given(tmp_path):
    write_table(tmp_path / "t.parquet", list(range(50)), [row % 3 for row in range(50)], row_group_size=5)
    assert pq.ParquetFile(tmp_path / "t.parquet").num_row_groups == 10
    source = ParquetSource(str(tmp_path / "t.parquet"))
    listing = source.list_items()
    by_key = {item.key: item for items in listing.splits.values() for item in items}
    wanted = [by_key[f"t.parquet#{row}"] for row in (31, 17, 19)]
    read = read_all(source, wanted)
    assert [key for key, _, _ in read] == ["t.parquet#31", "t.parquet#17", "t.parquet#19"]
    for (_, data, reason), seed in zip(read, (31, 17, 19), strict=True):
        assert reason is None and np.array_equal(decoded(data), pixels(seed))


def test_rows_of_a_shrunk_or_deleted_file_are_unreadable(tmp_path):
    write_table(tmp_path / "a.parquet", [0, 1, 2], [0, 1, 2])
    write_table(tmp_path / "b.parquet", [3], [0])
    source = ParquetSource(str(tmp_path))
    items = sorted((item for items in source.list_items().splits.values() for item in items), key=lambda item: item.key)
    write_table(tmp_path / "a.parquet", [0], [0])
    (tmp_path / "b.parquet").unlink()
    read = read_all(source, items)
    assert [key for key, _, _ in read] == ["a.parquet#0", "a.parquet#1", "a.parquet#2", "b.parquet#0"]
    assert read[0][2] is None
    assert "beyond the 1 rows of a.parquet" in read[1][2] and "beyond" in read[2][2]
    assert read[3][1] is None and "b.parquet is gone" in read[3][2]


def test_glob_and_fsspec_url(tmp_path):
    """A glob keeps keys relative to its fixed part; any fsspec filesystem works (here the in-memory one)."""
    write_table(tmp_path / "shards" / "train-0.parquet", [0], [0], names=CLASSES)
    write_table(tmp_path / "shards" / "test-0.parquet", [1], [1], names=CLASSES)
    write_table(tmp_path / "shards" / "extra.parquet", [2], [2], names=CLASSES)
    listing = ParquetSource(str(tmp_path / "shards" / "t*.parquet")).list_items()
    assert [item.key for item in listing.splits["train"] + listing.splits["test"]] == ["train-0.parquet#0", "test-0.parquet#0"]
    assert listing.skipped == []

    root = f"memory://parquet-source-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    try:
        for name in ("train-0.parquet", "test-0.parquet"):
            fs.pipe(f"{root}/data/{name}", (tmp_path / "shards" / name).read_bytes())
        source = ParquetSource(root)
        listing = source.list_items()
        assert listing.identity["source"] == root
        [(key, data, reason)] = read_all(source, listing.splits["test"])
        assert key == "data/test-0.parquet#0" and reason is None and np.array_equal(decoded(data), pixels(1))
    finally:
        fs.rm(root, recursive=True)


def test_invalid_test_fraction():
    with pytest.raises(ConfigError, match="test fraction"):
        ParquetSource("unused", test_fraction=1.0)


def test_identity_names_a_local_source_by_its_absolute_path(tmp_path, monkeypatch):
    write_table(tmp_path / "t.parquet", [0], [0], names=CLASSES)
    monkeypatch.chdir(tmp_path)
    assert ParquetSource("t.parquet").list_items().identity["source"] == str(tmp_path / "t.parquet")


def test_images_without_labels_are_read_by_the_format_that_reads_them(tmp_path, caplog):
    """predict's and similar's SOURCE goes to a collection format's reader (`UNLABELLED_FORMATS`, keyed as the
    collection formats): files found are images when any are, else tables; a file named on its own is a table when
    it is one, else decoded as an image whatever its name."""
    from cifar_transfer.collection import COLLECTION_FORMATS
    from cifar_transfer.sources import detect
    from cifar_transfer.sources.unlabelled import UNLABELLED_FORMATS, UnlabelledImages

    assert list(UNLABELLED_FORMATS) == list(COLLECTION_FORMATS) == list(detect.COLLECTION_FORMATS)

    def read(source) -> list[tuple[str, str | None]]:
        return [(os.path.basename(path), reason) for chunk in UnlabelledImages(str(source)).chunks(8) for path, _, reason in chunk]

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.png").write_bytes(png(0))
    write_table(mixed / "t.parquet", [1, 2], [0, 1], names=CLASSES)
    with caplog.at_level(logging.INFO, logger="cifar_transfer"):
        assert read(mixed) == [("a.png", None)]
    assert "ignored 1 files of" in caplog.text and "that are not images" in caplog.text
    os.remove(mixed / "a.png")
    assert read(mixed) == [("t.parquet#0", None), ("t.parquet#1", None)]
    assert read(mixed / "t.parquet") == [("t.parquet#0", None), ("t.parquet#1", None)]
    (mixed / "notes.txt").write_text("not an image")
    assert read(mixed / "notes.txt") == [("notes.txt", None)]  # named on its own: decoded (and reported) by predict
    os.mkfifo(mixed / "pipe.parquet")
    assert read(mixed / "pipe.parquet") == [("pipe.parquet", "not a regular file: a FIFO")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"^no image files \(bmp, gif, jpeg, jpg, png, tif, tiff, webp\) or Parquet tables at "):
        UnlabelledImages(str(tmp_path / "empty"))
