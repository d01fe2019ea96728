"""The audit reads real Parquet feature sets shard by shard: its index (exact and usearch), the neighbours, the
duplicates, label issues and outliers it finds in sets with injected near-copies and flipped labels (no Prefect)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_head import CLASSES, blobs, write_feature_set

from cifar_transfer import layout
from cifar_transfer.audit.index import Searcher, all_neighbours, exact_search, read_index_record, update_index
from cifar_transfer.audit.similar import similar, write_neighbours
from cifar_transfer.audit.stage import METHOD, audit_feature_set
from cifar_transfer.audit.tables import Rows, label_issues_table
from cifar_transfer.audit.vectors import SetRows
from cifar_transfer.catalogue import find_feature_set
from cifar_transfer.config import AuditSettings, HeadSettings
from cifar_transfer.errors import ConfigError
from cifar_transfer.head import train_head
from cifar_transfer.storage import Storage

HEAD = HeadSettings(
    head="ridge", seed=0, learning_rate=1e-3, epochs=30, batch_size=64, patience=5, validation_split=0.2, flip=False, refit=True
)


def faulty_set(tmp_path, train: int = 600, test: int = 200, width: int = 24):
    """Blobs with known faults: 6 train rows copied (a little noise) into other train rows, 4 into test rows, and
    12 train labels flipped. Returns (storage url, folder, duplicated (split, index) pairs, flipped train rows)."""
    rng = np.random.default_rng(3)
    train_x, train_y = blobs(train, (width,), 1.0, 0)
    test_x, test_y = blobs(test, (width,), 1.0, 1)
    pairs = []
    sources = rng.choice(train, 10, replace=False)
    for number, source in enumerate(sources):
        copy = train_x[source] * rng.uniform(0.97, 1.03) + rng.normal(0, 0.05, width).astype(np.float32)
        if number < 6:
            target = int((source + 97) % train)
            train_x[target], train_y[target] = copy, train_y[source]
            pairs.append((("train", int(source)), ("train", target)))
        else:
            target = int(number * 13)
            test_x[target], test_y[target] = copy, train_y[source]
            pairs.append((("train", int(source)), ("test", target)))
    copied = {index for pair in pairs for split, index in pair if split == "train"}
    flipped = rng.choice(sorted(set(range(train)) - copied), 12, replace=False)
    given = train_y.copy()
    given[flipped] = (train_y[flipped] + rng.integers(1, 10, len(flipped))) % 10
    folder = write_feature_set(tmp_path, {"train": (train_x, given), "test": (test_x, test_y)}, (width,), shard_size=100)
    return str(tmp_path), folder, pairs, set(flipped.tolist())


def test_exact_search_matches_brute_force_and_never_returns_the_query_itself(tmp_path):
    url, folder, _, _ = faulty_set(tmp_path)
    storage = Storage(url)
    rows = SetRows.open(storage, folder)
    everything = np.concatenate([block.vectors for block in rows.blocks()])
    positions, similarities = exact_search(rows, everything[:50], 5, exclude=np.arange(50))
    brute = everything[:50] @ everything.T
    brute[np.arange(50), np.arange(50)] = -np.inf
    expected = np.argsort(-brute, axis=1)[:, :5]
    assert np.array_equal(positions, expected)
    assert np.allclose(similarities, np.take_along_axis(brute, expected, axis=1), atol=1e-5)
    record = update_index(storage, folder, "fingerprint", exact_limit=10_000).record
    graph = all_neighbours(storage, folder, record, 5)
    assert np.array_equal(graph[0][:50], expected)
    assert not np.any(graph[0] == np.arange(rows.rows)[:, None])


def test_approximate_index_recalls_the_exact_neighbours_grows_without_a_rebuild_and_rebuilds_when_rows_change(tmp_path):
    train_x, train_y = blobs(800, (24,), 2.0, 0)
    test = blobs(200, (24,), 2.0, 1)
    folder = write_feature_set(tmp_path, {"train": (train_x[:500], train_y[:500]), "test": test}, (24,))
    storage = Storage(str(tmp_path))
    first = update_index(storage, folder, "fingerprint", exact_limit=0)
    assert (first.change, first.added, first.record.kind) == ("rebuilt", 700, "usearch")
    assert update_index(storage, folder, "fingerprint", exact_limit=0).change == "reused"
    assert recall_at_10(storage, folder, first.record) >= 0.95

    # The collection grows: 300 more train rows in new shards, every old shard unchanged: only they are added.
    write_feature_set(tmp_path, {"train": (train_x, train_y), "test": test}, (24,))
    grown = update_index(storage, folder, "fingerprint", exact_limit=0)
    assert (grown.change, grown.added, grown.record.rows) == ("added", 300, 1000)
    assert recall_at_10(storage, folder, grown.record) >= 0.95
    assert read_index_record(storage, folder) == grown.record

    # A shard it holds changed: the index is built again from every row.
    train_x[10] += 1.0
    write_feature_set(tmp_path, {"train": (train_x, train_y), "test": test}, (24,))
    rebuilt = update_index(storage, folder, "fingerprint", exact_limit=0)
    assert (rebuilt.change, rebuilt.added) == ("rebuilt", 1000)


def recall_at_10(storage: Storage, folder: str, record) -> float:
    rows = SetRows.open(storage, folder)
    queries = np.concatenate([block.vectors for block in rows.blocks()])[::5]
    exact = exact_search(rows, queries, 10)[0]
    searcher = Searcher(storage, folder, record)
    try:
        approximate = searcher.search(queries, 10)[0]
    finally:
        searcher.close()
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approximate, exact, strict=True)]))


@pytest.fixture
def audited(tmp_path):
    url, folder, pairs, flipped = faulty_set(tmp_path)
    features = find_feature_set(url)
    head = train_head(url, folder, "ridgehead", HEAD, CLASSES)
    settings = AuditSettings(neighbours=10, folds=4, exact_limit=100_000)
    return audit_feature_set(url, features, head, settings), pairs, flipped, (url, features, head, settings)


@pytest.mark.slow
def test_audit_finds_the_injected_near_copies_and_flipped_labels(audited):
    result, pairs, flipped, _ = audited
    duplicates = pq.read_table(result.files.duplicates).to_pandas()
    assert list(duplicates.columns[:7]) == ["split_a", "index_a", "key_a", "split_b", "index_b", "key_b", "score"]
    assert duplicates["score"].is_monotonic_decreasing
    top = {frozenset({(row.split_a, row.index_a), (row.split_b, row.index_b)}) for row in duplicates.head(len(pairs)).itertuples()}
    assert top == {frozenset(pair) for pair in pairs}
    near = duplicates[duplicates["near_duplicate"]]
    assert {frozenset({(row.split_a, row.index_a), (row.split_b, row.index_b)}) for row in near.itertuples()} == top
    assert result.summary.test_with_train_duplicate == 4
    assert result.summary.line().startswith("4 test images have a near-duplicate in train")

    issues = pq.read_table(result.files.label_issues).to_pandas()
    assert list(issues.columns[:6]) == ["split", "index", "key", "given", "suggested", "score"]
    assert len(issues) == 800 and issues["score"].is_monotonic_increasing
    found = set(issues.head(len(flipped)).query("split == 'train'")["index"])
    assert len(found & flipped) >= 0.8 * len(flipped)
    assert (issues.head(len(flipped))["given"] != issues.head(len(flipped))["suggested"]).all()
    assert set(issues["fold"][issues["split"] == "train"]) == {0, 1, 2, 3} and set(issues["fold"][issues["split"] == "test"]) == {-1}

    outliers = pq.read_table(result.files.outliers).to_pandas()
    assert len(outliers) == 800 and outliers["score"].is_monotonic_increasing


@pytest.mark.slow
def test_audit_is_read_back_while_its_inputs_are_unchanged_and_is_readable_by_duckdb(audited):
    import duckdb

    result, _, _, (url, features, head, settings) = audited
    stamps = {path: Storage(url).fs.info(path)["mtime"] for path in result.files.paths()}
    again = audit_feature_set(url, features, head, settings)
    assert again.record == result.record
    assert {path: Storage(url).fs.info(path)["mtime"] for path in result.files.paths()} == stamps
    assert json.loads(Storage(url).read_bytes(result.files.record))["format_version"] == 2
    count = duckdb.sql(f"select count(*) from '{result.files.label_issues}' where issue").fetchall()[0][0]
    assert count == result.summary.label_issues

    made_before = json.loads(Storage(url).read_bytes(result.files.record))
    assert made_before.pop("method") == METHOD
    Storage(url).write_atomic(result.files.record, json.dumps(made_before).encode())  # a record from before methods
    issues = pq.read_table(result.files.label_issues)
    remade = audit_feature_set(url, features, head, settings)
    assert remade.record.method == METHOD and pq.read_table(result.files.label_issues).equals(issues)  # made again, alike
    assert all(Storage(url).fs.info(path)["mtime"] > stamps[path] for path in result.files.paths())


def test_similar_finds_a_rows_near_copy_first_and_refuses_what_names_no_image(tmp_path):
    url, folder, pairs, _ = faulty_set(tmp_path)
    (source_split, source), (copy_split, copy) = sorted(pairs[-1], reverse=True)  # the copy in test, its source in train
    neighbours = similar(url, f"{source_split}:{source}", k=4)
    assert [neighbour.rank for neighbour in neighbours] == [1, 2, 3, 4]
    assert (neighbours[0].split, neighbours[0].index) == (copy_split, copy) and neighbours[0].similarity > 0.99
    assert (source_split, source) not in [(neighbour.split, neighbour.index) for neighbour in neighbours]
    assert not Storage(url).exists(layout.index_files(folder).record)  # an exact search writes nothing
    with pytest.raises(ConfigError, match="train has no row 5000 \\(it has 600 rows\\)"):
        similar(url, "train:5000")
    with pytest.raises(ConfigError, match="is neither an image file nor a row of the set"):
        similar(url, str(tmp_path / "missing.png"))
    write_neighbours(neighbours, str(tmp_path / "near.json"), "train:1")
    assert [row["key"] for row in json.loads((tmp_path / "near.json").read_text())["neighbours"]] == [n.key for n in neighbours]


def scored_rows(rows: int, flips: int, margin: float, seed: int = 0) -> tuple[pa.Table, set[int]]:
    """`label_issues_table` over rows whose out-of-fold probabilities and neighbours' votes come from a head and
    neighbours that know each row's true class (`margin`: how well; 2.0 is about two-thirds accurate, as the
    benchmark's head), with `flips` of the given labels changed to another class. Returns the table and the flips."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 10, rows)

    def guesses() -> np.ndarray:
        logits = rng.normal(0, 1, (rows, 10))
        logits[np.arange(rows), truth] += margin
        odds = np.exp(2 * logits)
        return odds / odds.sum(axis=1, keepdims=True)

    votes = np.zeros((rows, 10))
    for _ in range(10):  # ten neighbours, each with a label drawn from what it resembles
        np.add.at(votes, (np.arange(rows), (guesses().cumsum(axis=1) < rng.random((rows, 1))).sum(axis=1)), 0.1)
    given = truth.copy()
    flipped = rng.choice(rows, flips, replace=False)
    given[flipped] = (truth[flipped] + rng.integers(1, 10, flips)) % 10
    names = Rows(np.full(rows, "train", object), np.arange(rows), np.arange(rows).astype(str).astype(object), given, CLASSES)
    return label_issues_table(names, guesses().astype(np.float32), votes, np.zeros(rows, np.int64)), set(flipped.tolist())


def test_label_issues_flag_about_as_many_rows_as_are_wrongly_labelled_and_none_in_a_set_labelled_right():
    flagged = {}
    for flips in (0, 200, 600):
        table, flipped = scored_rows(20_000, flips, margin=2.0)
        issue = np.asarray(table.column("issue"))
        found = set(np.asarray(table.column("index"))[issue].tolist())
        flagged[flips] = len(found)
        assert len(found & flipped) >= 0.6 * len(found)  # mostly the flipped rows
        assert np.array_equal(issue, issue & (np.asarray(table.column("given")) != np.asarray(table.column("suggested"))))
        assert not issue[np.argmax(~issue) :].any()  # the lowest scores, in the table's order
        doubted = np.sum(np.asarray(table.column("given")) != np.asarray(table.column("suggested")))
        assert doubted > 1_500  # every row the head takes for another class: what was flagged before
    assert flagged[0] == 0
    assert 0.6 * 200 <= flagged[200] <= 1.4 * 200 and 0.6 * 600 <= flagged[600] <= 1.4 * 600
    table, _ = scored_rows(2_000, 0, margin=3.0)  # a confident head (about 90% accurate), every label right
    assert (np.asarray(table.column("given")) != np.asarray(table.column("suggested"))).any()  # some taken for another class
    assert not np.asarray(table.column("issue")).any()  # and none flagged
