"""The audit as a user reaches it: the `audit-features` flow on a finished run, and `cifar-transfer similar` with an
image file (through the set's own extractor) or a row of the set, printed or written as JSON and Parquet."""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cifar_transfer.flows.cli import add_similar_arguments, similar_command
from cifar_transfer.flows.pipeline import audit_features

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture(scope="module")
def run(ridge_run, tmp_path_factory):
    """A copy of the session's finished ridge run (the audit writes beside its features)."""
    folder = tmp_path_factory.mktemp("audit")
    shutil.copytree(ridge_run.config.storage, folder / "storage")
    config = ridge_run.config.model_copy(update={"storage": str(folder / "storage")})
    summary = ridge_run  # the copy's feature set and head keys are the original's
    images = np.load(folder / "storage" / "datasets" / f"cifar10-{config.md5}" / "train_images.npy")
    return {"config": config, "summary": summary, "images": images, "folder": folder}


def command(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_similar_arguments(parser)
    return parser.parse_args(argv)


def test_the_audit_flow_writes_every_table_for_every_image_and_a_rerun_rewrites_nothing(run):
    config = run["config"]
    result = audit_features(config)
    issues = pd.read_parquet(result.files.label_issues)
    assert len(issues) == 300 and set(issues["split"]) == {"train", "test"}
    assert result.summary.head_kinds == ["ridge"] and result.record.head_key == run["summary"].head.files.folder.rsplit("/", 1)[-1]
    assert len(pd.read_parquet(result.files.outliers)) == 300
    assert pd.read_parquet(result.files.duplicates)["score"].is_monotonic_decreasing
    stamps = {path: os.stat(path).st_mtime_ns for path in result.files.paths()}
    again = audit_features(config, run["summary"].features.fingerprint)
    assert again.record == result.record
    assert {path: os.stat(path).st_mtime_ns for path in result.files.paths()} == stamps


def test_similar_finds_a_train_image_given_as_a_file_through_the_sets_own_extractor(run, tmp_path, capsys):
    picture = tmp_path / "query.png"
    Image.fromarray(run["images"][7]).save(picture)  # lossless, at the archive's 32 px
    storage = run["config"].storage
    assert similar_command(command(str(picture), "--storage", storage, "--k", "3", "--output", str(tmp_path / "out.json"))) == 0
    written = json.loads((tmp_path / "out.json").read_text())
    first = written["neighbours"][0]
    assert (first["split"], first["index"], first["rank"]) == ("train", 7, 1) and first["similarity"] > 0.999
    assert len(written["neighbours"]) == 3
    capsys.readouterr()
    assert similar_command(command("test:3", "--storage", storage, "--k", "5")) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["rank", "key", "label", "similarity", "distance"] and len(lines) == 5
    assert "test/3" not in [line.split()[1] for line in lines]
    assert similar_command(command("test:3", "--storage", storage, "--k", "5", "--output", str(tmp_path / "out.parquet"))) == 0
    table = pd.read_parquet(tmp_path / "out.parquet")
    assert table["key"].tolist() == [line.split()[1] for line in lines]
    assert table["similarity"].is_monotonic_decreasing


def test_the_explorer_reads_every_images_audit_scores_and_near_duplicate_partners(run):
    from cifar_transfer.audit.stage import read_audit
    from cifar_transfer.audit.vectors import SetRows
    from cifar_transfer.explorer import explorer_inputs, map_audit
    from cifar_transfer.storage import Storage
    from cifar_transfer.tsne import TsneResult

    config, summary = run["config"], run["summary"]
    result = audit_features(config)  # made by the test above, or now
    storage = Storage(config.storage)
    features = summary.features.model_copy(update={"folder": storage.path("features", summary.features.folder.rsplit("/", 1)[-1])})
    splits, index, _ = SetRows.open(storage, features.folder).names()
    audit = read_audit(storage, features, result.record.head_key)
    assert audit is not None and read_audit(storage, features, "another-head") is None
    shown = map_audit(storage, features, audit, splits, index)
    assert shown.summary == result.summary.line()
    tsne = TsneResult(
        embedding="tsne/abc/embedding.parquet",
        picture="",
        points=0,
        test_points=0,
        seconds=0,
        map_knn_accuracy=0,
        feature_knn_accuracy=0,
        made_by=None,
    )
    remade = audit.model_copy(update={"record": audit.record.model_copy(update={"threshold": audit.record.threshold + 0.01})})
    pages = {explorer_inputs(features, tsne, summary.head, shown_audit, None) for shown_audit in (None, audit, remade)}
    assert len(pages) == 3, "an explorer page made before an audit, or before it was made again, would be kept"
    issues = pd.read_parquet(result.files.label_issues).set_index(["split", "index"])
    names = list(zip(splits, index.tolist(), strict=True))
    assert np.allclose(shown.label_score, issues.loc[names, "score"].to_numpy())
    assert [features.classes[number] for number in shown.suggested] == issues.loc[names, "suggested"].tolist()
    outliers = pd.read_parquet(result.files.outliers).set_index(["split", "index"])
    assert np.allclose(shown.outlier_score, outliers.loc[names, "score"].to_numpy())
    near = pd.read_parquet(result.files.duplicates).query("near_duplicate")
    partnered = {(row.split_a, row.index_a) for row in near.itertuples()} | {(row.split_b, row.index_b) for row in near.itertuples()}
    assert {names[point] for point in shown.duplicates} == partnered
