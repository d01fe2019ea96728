"""Stored records carry a format version; records written before versions (or by the base code) are read and reused as
they are, and a record from a newer version fails in one line instead of being taken for damage and overwritten."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_head import CLASSES, SETTINGS, blobs, synthetic_spec, write_feature_set

from cifar_transfer import extractors, layout, records
from cifar_transfer.catalogue import describe_feature_set
from cifar_transfer.commit import commit_feature_set
from cifar_transfer.config import CollectionSettings, HeadSettings, TsneSettings, load_config
from cifar_transfer.dataset import DatasetInfo, read_marker
from cifar_transfer.download import read_source_record
from cifar_transfer.errors import NewerFormatError
from cifar_transfer.feature_records import FeatureSetDescription, Manifest, read_description, read_manifest
from cifar_transfer.head import HeadMetrics, finished_head, train_head
from cifar_transfer.shard_files import (
    METADATA_KEY,
    recorded_shard,
    shard_path,
    shard_problem,
    shard_size_conflict,
    shard_table,
    write_shard,
)
from cifar_transfer.shards import Shard, ShardRows
from cifar_transfer.sources.base import Item, UnreadableItem
from cifar_transfer.storage import Storage
from cifar_transfer.tsne import TsneResult
from conftest import copy_of_finished_run


def as_written_before(content: object, record: records.RecordFormat | None = None, root: Path | None = None) -> object:
    """A record as the code before format versions wrote it (commit 8ac3e8e): the same fields, no version, the
    places in its storage (`record.paths`) as full paths under `root`; `_skipped.json` a bare list."""
    if isinstance(content, dict) and set(content) == {records.FORMAT_VERSION, "skipped"}:
        return content["skipped"]
    paths = record.paths.fields if record is not None and record.paths is not None else ()
    return {
        name: str(root / value) if name in paths and root is not None else value
        for name, value in content.items()
        if name != records.FORMAT_VERSION
    }


def downgrade_json(path: Path, record: records.RecordFormat | None = None, root: Path | None = None) -> None:
    path.write_text(json.dumps(as_written_before(json.loads(path.read_text()), record, root), indent=2))


def downgrade_parquet_footer(path: Path, key: bytes, record: records.RecordFormat | None = None, root: Path | None = None) -> None:
    """Rewrite a Parquet file with its footer record as written before versions (same rows, same writer)."""
    table = pq.read_table(path)
    metadata = dict(table.schema.metadata)
    metadata[key] = json.dumps(as_written_before(json.loads(metadata[key]), record, root)).encode()
    pq.write_table(table.replace_schema_metadata(metadata), path)


def downgrade_feature_set(folder: Path) -> None:
    """Every record of a feature set, its maps and heads back to the unversioned form; the manifests list the
    rewritten shards' sizes and hashes, as the base code would have written them."""
    root = folder.parents[1]
    for view in [path for path in folder.iterdir() if (path / "_manifest.json").exists()]:
        manifest = json.loads((view / "_manifest.json").read_text())
        for shard in manifest["shards"]:
            downgrade_parquet_footer(view / shard["file"], METADATA_KEY)
            payload = (view / shard["file"]).read_bytes()
            shard |= {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        (view / "_manifest.json").write_text(json.dumps(as_written_before(manifest), indent=2))
        if (view / "_skipped.json").exists():
            downgrade_json(view / "_skipped.json")
    downgrade_json(folder / "feature_set.json")
    for settings in folder.glob("*/*/settings.json"):
        downgrade_json(settings)
    for metrics in folder.glob("heads/*/metrics.json"):
        downgrade_json(metrics, records.HEAD_METRICS, root)
    for embedding in folder.glob("tsne/*/embedding.parquet"):
        downgrade_parquet_footer(embedding, b"tsne", records.TSNE_RESULT, root)


def file_identities(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` (but the HTML reports and map explorers, which each run renders) with its inode and
    modification time."""
    return {
        str(path.relative_to(root)): (path.stat().st_ino, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file() and not path.name.startswith(("report-", "explorer-"))
    }


def test_every_record_format_reads_its_unversioned_form_refuses_a_newer_one_and_rejects_a_bad_version():
    for name, record in vars(records).items():
        if not isinstance(record, records.RecordFormat):
            continue
        assert record.version == (3 if record.paths else 2), name
        newer_version = record.version + 1
        written = json.loads(record.dump({"a": 1}, root="/storage"))
        assert list(written) == [records.FORMAT_VERSION, "a"]
        assert record.read(json.dumps(written), "x", "/storage") == {"a": 1}  # the current version as written
        assert record.read(json.dumps({"a": 1}), "x")["a"] == 1  # version 1: upgraded, its own fields kept
        with pytest.raises(NewerFormatError) as newer:
            record.read(json.dumps({records.FORMAT_VERSION: newer_version, "a": 1}), "storage/some/record.json", "/storage")
        message = str(newer.value)
        assert "\n" not in message and "storage/some/record.json" in message and f"format version {newer_version}" in message
        assert "upgrade cifar-transfer" in message
        for bad in ("2", 0, True, None):
            with pytest.raises(ValueError, match="is not a version"):
                record.read(json.dumps({records.FORMAT_VERSION: bad}), "x")
    with pytest.raises(ValueError, match="not an object"):
        records.MANIFEST.read("[1, 2]", "x")


@pytest.mark.parametrize("root", ["/data/storage", "bucket/prefix"])  # a local root, an object store's (fsspec strips s3://)
def test_paths_into_the_storage_are_written_relative_and_read_under_the_root_they_are_read_from(root):
    """A marker, a map's footer and a head's metrics name places in their storage: a copy of it reads its own places;
    a record written before version 3 holds full paths and reads them as written."""
    marker = {"folder": f"{root}/datasets/cifar10-{'0' * 32}", "md5": "0" * 32, "sizes": {}, "classes": ["a"]}
    embedding = f"{root}/features/f/tsne/k/embedding.parquet"
    footer = {"embedding": embedding, "picture": f"{root}/features/f/tsne/k/tsne.png", "points": 1}
    metrics = {"features": f"{root}/features/f", "test_accuracy": 0.5}
    for record, content in ((records.DATASET, marker), (records.TSNE_RESULT, footer), (records.HEAD_METRICS, metrics)):
        assert record.paths is not None
        written = json.loads(record.dump(content, root=root + "/"))
        assert written[records.FORMAT_VERSION] == 3
        for name in record.paths.fields:
            assert written[name] == content[name].removeprefix(root + "/") and not written[name].startswith(("/", "bucket"))
        assert record.read(json.dumps(written), "x", root) == content
        copied = {name: value.replace(root, "/copy") if name in record.paths.fields else value for name, value in content.items()}
        assert record.read(json.dumps(written), "x", "/copy") == copied
        for old in (2, None):  # an older record's full paths are read as written
            stamped = {**content, records.FORMAT_VERSION: old} if old else content
            read = record.read(json.dumps(stamped), "x", "/copy")
            assert {name: read[name] for name in record.paths.fields} == {name: content[name] for name in record.paths.fields}
        with pytest.raises(ValueError, match="is not under the storage root"):
            record.dump(content, root="/elsewhere")
        with pytest.raises(ValueError, match="read with its storage root"):
            record.read(json.dumps(written), "x")


def test_version_one_records_get_what_they_lacked_in_one_place():
    dataset = records.DATASET.load(DatasetInfo, json.dumps({"folder": "f", "md5": "0" * 32, "sizes": {}, "classes": ["a"]}), "x")
    assert (dataset.bytes, dataset.format, dataset.label_mode) == ({}, "cifar10", None)
    manifest = {"fingerprint": "f", "split": "train", "rows": 0, "feature_shape": [3], "shards": [], "created_at": "t"}
    assert records.MANIFEST.load(Manifest, json.dumps(manifest), "x").model_dump(include={"version", "retired"}) == {
        "version": 1,
        "retired": [],
    }
    description = {
        "fingerprint": "f",
        "spec": {},
        "feature_shape": [3],
        "classes": ["a"],
        "rebuild": {"weights": "imagenet", "seed": 0, "shard_size": 10},
        "versions": {},
    }
    read = records.FEATURE_SET.load(FeatureSetDescription, json.dumps(description), "x")
    assert (read.rebuild.flip, read.rebuild.collection, read.extraction, read.made_by) == (False, None, None, None)
    tsne = {"embedding": "e", "picture": "p", "points": 1, "test_points": 0, "seconds": 1.0, "map_knn_accuracy": 1.0}
    assert records.TSNE_RESULT.load(TsneResult, json.dumps({**tsne, "feature_knn_accuracy": 1.0}), "x").made_by is None
    assert records.SKIPPED.read(json.dumps([{"key": "a.png"}]), "x") == {"skipped": [{"key": "a.png"}]}


def test_a_record_from_a_newer_version_is_refused_never_taken_for_damage(tmp_path):
    storage, folder = (
        Storage(str(tmp_path)),
        write_feature_set(tmp_path, {"train": blobs(200, (8,), 1.0, 0), "test": blobs(100, (8,), 1.0, 1)}, (8,)),
    )
    result = train_head(storage.url, folder, "k", SETTINGS, CLASSES)
    for path in (Path(folder) / "train" / "_manifest.json", Path(folder) / "feature_set.json", Path(result.files.metrics)):
        content = json.loads(path.read_text())
        path.write_text(json.dumps({**content, records.FORMAT_VERSION: 9}))
    for read in (lambda: read_manifest(storage, folder, "train"), lambda: read_description(storage, folder)):
        with pytest.raises(NewerFormatError, match="format version 9"):
            read()
    before = os.stat(result.files.metrics).st_mtime_ns
    with pytest.raises(NewerFormatError, match="upgrade cifar-transfer"):
        train_head(storage.url, folder, "k", SETTINGS, CLASSES)  # not trained again over the newer head
    assert os.stat(result.files.metrics).st_mtime_ns == before


def test_a_shard_written_before_versions_is_still_a_finished_shard(tmp_path):
    storage = Storage(str(tmp_path))
    spec = synthetic_spec()
    shard = Shard(split="train", number=0, start=0, stop=4)
    path = shard_path(storage, spec, shard)
    write_shard(storage, path, shard, shard_table(spec, shard, ShardRows(np.arange(4), np.arange(4)), np.ones((4, 3), np.float32)))
    assert json.loads(pq.read_schema(path).metadata[METADATA_KEY])[records.FORMAT_VERSION] == 2
    downgrade_parquet_footer(Path(path), METADATA_KEY)
    assert records.FORMAT_VERSION not in json.loads(pq.read_schema(path).metadata[METADATA_KEY])
    assert shard_problem(storage, path, spec, shard) is None
    other = spec.model_copy(update={"input_size": 64})
    assert "another configuration" in shard_problem(storage, path, other, shard)


def test_a_collection_shard_is_stored_and_recognised_as_before_the_shard_plan_had_one_shape(tmp_path):
    """Plans (task parameters) keep their stored form; a collection shard's footer its keys, columns and digest (the
    digest below is what the code before `Shard.content` wrote), so finished shards are reused as they were."""
    storage = Storage(str(tmp_path))
    spec = synthetic_spec(dataset_md5="folder-0123")
    items = [Item(key=f"train/{number}.png", version="1", label=number % 2) for number in range(4)]
    shard = Shard(split="train", number=0, start=0, stop=4, items=items)
    rows = Shard(split="train", number=0, start=0, stop=4)
    assert list(shard.model_dump()) == ["split", "number", "start", "stop", "items"] and rows.model_dump()["items"] is None
    assert Shard.model_validate(json.loads(shard.model_dump_json())) == shard
    decoded = items[:3]  # the fourth did not decode: its id is unused and the file holds 3 rows
    skipped = [UnreadableItem(key=items[3].key, reason="not an image")]
    table = shard_table(spec, shard, ShardRows(np.array([0, 1, 0]), np.arange(3), decoded, skipped), np.ones((3, 3), np.float32))
    record = write_shard(storage, shard_path(storage, spec, shard), shard, table)
    path = shard_path(storage, spec, shard)
    footer = json.loads(pq.read_schema(path).metadata[METADATA_KEY])
    assert list(footer)[-3:] == ["items_digest", "items", "skipped"]
    assert footer["items_digest"] == "af98e0ca77e157c4d7fe04a5caac7f88" and footer["items"][3] == ["train/3.png", "1", 1]
    assert pq.read_schema(path).names == ["index", "label", "features", "key", "version"]
    assert shard_problem(storage, path, spec, shard) is None and shard_size_conflict(storage, path, spec, shard) is None
    changed = shard.model_copy(update={"items": [*items[:3], items[3].model_copy(update={"version": "2"})]})
    assert shard_problem(storage, path, spec, changed).startswith("holds other images than planned (the collection changed")
    assert shard_problem(storage, path, spec, rows) == "holds rows 0..4 (3), expected 0..4"
    assert recorded_shard(storage, path, record) == shard  # verify checks the file against what its own footer lists


def test_a_collection_set_keeps_its_content_version_and_keys_when_its_records_are_unversioned(tmp_path):
    """A collection's maps and heads are named by its content version: reading old records must give the same one."""
    storage = Storage(str(tmp_path))
    spec = synthetic_spec(dataset_md5="folder-0123")
    collection = CollectionSettings(
        source="/images", source_format="folder", test_fraction=0.2, image_column="image", label_column="label", classes=None, seed=0
    )
    shard_records = []
    for split in ("train", "test"):
        items = [Item(key=f"{split}/{number}.png", version="1", label=number % 2) for number in range(4)]
        shard = Shard(split=split, number=0, start=0, stop=4, items=items)
        decoded, unreadable = items[:3], [UnreadableItem(key=items[3].key, reason="not an image")]
        rows = ShardRows(np.array([item.label for item in decoded]), np.arange(3), decoded, unreadable)
        table = shard_table(spec, shard, rows, np.ones((3, 3), np.float32))
        shard_records.append(write_shard(storage, shard_path(storage, spec, shard), shard, table))
    info = commit_feature_set(storage.url, spec, shard_records, ["even", "odd"], collection=collection)
    config = load_config(storage=storage.url)
    keys = (info.content_version, config.head_key(info.fingerprint, info.content_version))
    folder = Path(info.folder)
    for path in [folder / "feature_set.json", *folder.glob("*/_manifest.json"), *folder.glob("*/_skipped.json")]:
        downgrade_json(path)
    assert isinstance(json.loads((folder / "train" / "_skipped.json").read_text()), list)
    again = describe_feature_set(storage, info.folder)
    assert again == info and (again.content_version, config.head_key(again.fingerprint, again.content_version)) == keys
    assert commit_feature_set(storage.url, spec, shard_records, ["even", "odd"], collection=collection) == info  # nothing to write
    assert records.MANIFEST.read((folder / "train" / "_manifest.json").read_bytes(), "x")["version"] == 1


@pytest.mark.slow  # openTSNE's first map takes half a minute; the whole run below reuses a map too
def test_a_map_written_before_versions_is_reused(tmp_path):
    from cifar_transfer.tsne import finished_tsne, tsne_map

    storage, folder = (
        Storage(str(tmp_path)),
        write_feature_set(tmp_path, {"train": blobs(120, (8,), 1.0, 0), "test": blobs(40, (8,), 1.0, 1)}, (8,)),
    )
    settings = TsneSettings(sample=100, perplexity=10.0, seed=0, test=False)
    made = tsne_map(storage.url, folder, "m", settings, CLASSES)
    downgrade_feature_set(Path(folder))
    before = file_identities(Path(folder))
    assert finished_tsne(storage, folder, "m") == made
    assert tsne_map(storage.url, folder, "m", settings, CLASSES) == made
    assert file_identities(Path(folder)) == before


WRITTEN_BY_BASE = Path(__file__).parent / "fixtures" / "written-by-8ac3e8e"  # `cifar-transfer run` of the code before versions


def test_records_written_by_the_code_before_versions_read_and_name_the_same_folders(tmp_path):
    """The JSON records and a map's footer as commit 8ac3e8e wrote them (a tiny MobileNetV2 run): each reads, and this
    code's fingerprint and keys for the same options name the folders that code made."""
    shutil.copytree(WRITTEN_BY_BASE, tmp_path / "storage")
    storage = Storage(str(tmp_path / "storage"))
    (folder,) = storage.fs.ls(storage.path("features"), detail=False)
    description = read_description(storage, folder)
    assert description.fingerprint == description.feature_spec().fingerprint == folder.rsplit("-", 1)[1]
    assert description.rebuild.flip is False and description.extraction.images == 300
    assert {view: read_manifest(storage, folder, view).rows for view in ("train", "test")} == {"train": 200, "test": 100}
    (archive_record,) = layout.source_records(storage)
    md5 = read_source_record(storage, archive_record)["md5"]
    marker = read_marker(storage, layout.dataset_files(storage, md5).marker)
    assert (marker.md5, marker.format, marker.sizes) == (md5, "cifar10", {"train": 200, "test": 100})
    config = load_config(
        source=layout.archive_of_record(archive_record),
        md5=md5,
        storage=storage.url,
        backbone="MobileNetV2",
        weights="none",
        input_size=32,
        shard_size=50,
        tsne_sample=150,
        epochs=3,
        head_batch_size=32,
        engine="tensorflow",
        precision="float32",
    )
    fingerprint = config.feature_spec(md5).fingerprint
    assert config.feature_spec(md5).folder_name == Path(folder).name
    (map_folder,) = (Path(folder) / "tsne").iterdir()
    (head_folder,) = (Path(folder) / "heads").iterdir()
    assert (config.tsne_key(fingerprint), config.head_key(fingerprint)) == (map_folder.name, head_folder.name)
    assert records.TSNE_SETTINGS.load(TsneSettings, (map_folder / "settings.json").read_bytes(), "x") == config.tsne_settings
    assert records.HEAD_SETTINGS.load(HeadSettings, (head_folder / "settings.json").read_bytes(), "x") == config.head_settings
    metrics = records.HEAD_METRICS.load(HeadMetrics, (head_folder / "metrics.json").read_bytes(), "x")
    assert metrics.settings == config.head_settings and metrics.test_accuracy == 0.67
    footer = pq.read_schema(map_folder / "embedding.parquet").metadata[b"tsne"]
    assert records.TSNE_RESULT.load(TsneResult, footer, "x").points == 150


def test_a_feature_set_map_and_head_written_before_versions_are_reused_with_the_same_keys(finished_run, tiny_archive, tmp_path):
    """The whole run again over records in the unversioned form: nothing is computed or rewritten, every key holds."""
    config = copy_of_finished_run(finished_run, tiny_archive, tmp_path / "storage")
    first = cifar_transfer_run(config)
    assert first.extraction.shards_computed == 0 and first.features.folder.startswith(config.storage)
    folder = Path(first.features.folder)
    downgrade_feature_set(folder)
    for marker in (tmp_path / "storage" / "datasets").glob("*/_SUCCESS.json"):
        downgrade_json(marker, records.DATASET, tmp_path / "storage")
    for source in (tmp_path / "storage" / "raw").glob("*.source.json"):
        source.write_text(json.dumps(as_written_before(json.loads(source.read_text()))))
    assert finished_head(Storage(config.storage), str(folder), Path(first.head.files.folder).name).metrics == first.head.metrics
    before = file_identities(tmp_path / "storage")
    assert not [
        path for path in before if path.endswith((".json", ".parquet")) and b"format_version" in (tmp_path / "storage" / path).read_bytes()
    ]
    extractors.release_extractors()

    second = cifar_transfer_run(config)
    assert second.features.fingerprint == first.features.fingerprint and second.features.folder == first.features.folder
    assert config.tsne_key(second.features.fingerprint, second.features.content_version) == Path(first.tsne.embedding).parent.name
    assert config.head_key(second.features.fingerprint, second.features.content_version) == Path(first.head.files.folder).name
    assert second.extraction.shards_computed == 0 and extractors.built_extractors() == []
    assert second.tsne == first.tsne and second.head.metrics == first.head.metrics
    assert file_identities(tmp_path / "storage") == before  # no record upgraded in place, no output made again


def cifar_transfer_run(config):
    from cifar_transfer.flows.pipeline import cifar_transfer

    return cifar_transfer(config)
