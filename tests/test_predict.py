"""`predict` with a real run's head: the same answers as the run gave its test split, from files, folders, globs
and tables; undecodable images reported, not fatal; JSON and Parquet output; top-k."""

from __future__ import annotations

import argparse
import io
import json
import logging
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cifar_transfer import extractors
from cifar_transfer.errors import ConfigError
from cifar_transfer.flows.cli import add_predict_arguments, predict_command
from cifar_transfer.predict import Predictor, predict
from cifar_transfer.sources.unlabelled import UnlabelledImages
from cifar_transfer.trained import find_head

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture(scope="module")
def run(ridge_run, tmp_path_factory):
    """The session's finished ridge run, its 100 test images as PNG files, and what the run predicted for them."""
    folder = tmp_path_factory.mktemp("predict")
    summary, config = ridge_run, ridge_run.config
    images = np.load(f"{config.storage}/datasets/cifar10-{config.md5}/test_images.npy")
    pictures = folder / "pictures"
    pictures.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(pictures / f"img_{index:03d}.png")  # lossless, at the native 32 px
    expected = pd.read_parquet(summary.head.files.predictions).query("split == 'test'").sort_values("index")
    return {"storage": config.storage, "images": images, "pictures": pictures, "expected": expected, "summary": summary, "folder": folder}


@pytest.fixture(scope="module")
def predictor(run):
    return Predictor(find_head(run["storage"]))


def agreement(rows, expected: pd.DataFrame, classes: list[str]) -> tuple[float, float]:
    """(share of rows with the run's class, max |confidence difference|), row i against test image i."""
    assert [row.error for row in rows] == [None] * len(expected)
    predicted = np.array([classes.index(row.class_name) for row in rows])
    confidence = np.array([row.confidence for row in rows])
    return float(np.mean(predicted == expected["predicted"].to_numpy())), float(
        np.max(np.abs(confidence - expected["confidence"].to_numpy()))
    )


def test_a_folder_of_the_test_images_gets_the_runs_answers(run, caplog):
    extractors.release_extractors()  # the extractor is rebuilt from the stored spec, not the run's own
    with caplog.at_level(logging.INFO, logger="cifar_transfer"):
        rows = list(predict(str(run["pictures"]), run["storage"], chunk=30))
    assert [row.path.rsplit("/", 1)[1] for row in rows] == [f"img_{index:03d}.png" for index in range(100)]
    same, difference = agreement(rows, run["expected"], run["summary"].features.classes)
    print(f"folder of PNGs: same class {same:.2%}, max |confidence difference| {difference:.2e}")
    assert same == 1.0 and difference < 1e-4
    assert extractors.built_extractors() == [run["summary"].features.fingerprint]
    progress = [record.getMessage() for record in caplog.records if "images/s" in record.getMessage()]
    assert progress[-1].startswith("predict: 100/100 images (0 undecodable)") and "ETA" in progress[-1]


def test_a_parquet_table_of_the_images_gets_the_same_answers(run, predictor):
    cells = []
    for index in range(100):
        encoded = io.BytesIO()
        Image.fromarray(run["images"][index]).save(encoded, format="PNG")
        cells.append({"bytes": encoded.getvalue(), "path": f"img_{index:03d}.png"})
    table = run["folder"] / "table.parquet"
    pd.DataFrame({"image": cells}).to_parquet(table, row_group_size=40)
    rows = list(predictor.predict(UnlabelledImages(str(table)), chunk=64))
    assert [row.path for row in rows] == [f"{table}#{index}" for index in range(100)]
    same, difference = agreement(rows, run["expected"], predictor.classes)
    print(f"Parquet table: same class {same:.2%}, max |confidence difference| {difference:.2e}")
    assert same == 1.0 and difference < 1e-4


def test_a_glob_and_a_single_file(run, predictor):
    expected = run["expected"]
    rows = list(predictor.predict(UnlabelledImages(str(run["pictures"] / "img_01*.png"))))
    assert [row.path.rsplit("/", 1)[1] for row in rows] == [f"img_{index:03d}.png" for index in range(10, 20)]
    assert [predictor.classes.index(row.class_name) for row in rows] == expected["predicted"].iloc[10:20].tolist()
    (single,) = predictor.predict(UnlabelledImages(str(run["pictures"] / "img_042.png")))
    assert predictor.classes.index(single.class_name) == expected["predicted"].iloc[42]
    assert single.confidence == pytest.approx(expected["confidence"].iloc[42], abs=1e-4)


def test_a_foreign_photo_is_answered_and_a_corrupt_file_is_reported(run, predictor, tmp_path, caplog):
    x, y = np.meshgrid(np.linspace(0, 255, 300), np.linspace(0, 255, 200))
    Image.fromarray(np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)).save(tmp_path / "gradient.jpg", quality=90)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (tmp_path / "notes.txt").write_text("not an image: ignored in a folder")
    Image.fromarray(run["images"][7]).save(tmp_path / "seven.png")
    with caplog.at_level(logging.WARNING, logger="cifar_transfer"):
        rows = {row.path.rsplit("/", 1)[1]: row for row in predictor.predict(UnlabelledImages(str(tmp_path)))}
    assert set(rows) == {"broken.jpg", "gradient.jpg", "seven.png"}
    assert rows["gradient.jpg"].class_name in predictor.classes and 0 < rows["gradient.jpg"].confidence <= 1
    assert rows["seven.png"].class_index == run["expected"]["predicted"].iloc[7]
    broken = rows["broken.jpg"]
    assert broken.class_name is None and broken.confidence is None and broken.error.startswith("cannot decode the image")
    assert any("broken.jpg" in record.getMessage() for record in caplog.records if record.levelno == logging.WARNING)


def command(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_predict_arguments(parser)
    return parser.parse_args(argv)


def test_json_and_parquet_output_read_back_and_the_printed_table(run, tmp_path, capsys):
    pictures, storage = str(run["pictures"] / "img_00*.png"), run["storage"]
    (tmp_path / "broken.png").write_bytes(b"garbage")
    assert predict_command(command(pictures, "--storage", storage, "--output", str(tmp_path / "out.json"))) == 0
    assert predict_command(command(pictures, "--storage", storage, "--output", str(tmp_path / "out.parquet"), "--top-k", "2")) == 0
    written = json.loads((tmp_path / "out.json").read_text())
    table = pd.read_parquet(tmp_path / "out.parquet")
    assert len(written) == len(table) == 10
    assert list(table.columns) == ["path", "class", "class_index", "confidence", "top_classes", "top_probabilities", "error"]
    assert [row["class"] for row in written] == table["class"].tolist()
    assert table["class_index"].tolist() == run["expected"]["predicted"].iloc[:10].tolist()
    assert np.allclose([row["confidence"] for row in written], table["confidence"], atol=1e-6)
    assert all(len(classes) == 2 for classes in table["top_classes"]) and table["error"].isna().all()
    capsys.readouterr()

    assert predict_command(command(str(tmp_path / "broken.png"), "--storage", storage)) == 0
    header, line = capsys.readouterr().out.splitlines()
    assert header.split() == ["path", "class", "confidence"] and line[header.index("class")] == "-"
    assert "undecodable: not an image" in line


def test_top_k_gives_classes_in_decreasing_probability(run, predictor):
    rows = list(predictor.predict(UnlabelledImages(str(run["pictures"] / "img_00*.png")), top_k=3))
    for row in rows:
        probabilities = [probability for _, probability in row.top]
        assert len(row.top) == 3 and len({name for name, _ in row.top}) == 3
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6
        assert row.top[0] == (row.class_name, row.confidence)


def test_the_predict_images_flow_writes_a_table_under_the_head(run):
    """The flow the `predict-new-head` deployment runs: a real Prefect run, its table in storage by head key."""
    from cifar_transfer.flows.pipeline import predict_images

    folder = run["folder"] / "incoming"
    folder.mkdir()
    for index in range(5):
        Image.fromarray(run["images"][index]).save(folder / f"new_{index}.png")
    written = predict_images(storage=run["storage"], source=str(folder), head_key=run["summary"].head.files.folder.rsplit("/", 1)[1])
    table = pd.read_parquet(written)
    assert written.startswith(f"{run['storage']}/predictions/") and len(table) == 5 and table["error"].isna().all()
    assert list(table["class"]) == [run["summary"].features.classes[i] for i in run["expected"]["predicted"][:5]]


def test_an_existing_output_is_kept_unless_overwrite_and_a_bad_place_fails_before_any_work(run, tmp_path, capsys):
    pictures, storage = str(run["pictures"] / "img_00*.png"), run["storage"]
    theirs = tmp_path / "theirs.json"
    theirs.write_text("someone's file")
    with pytest.raises(ConfigError, match=r"theirs.json already exists: choose another name, or pass --overwrite"):
        predict_command(command(pictures, "--storage", storage, "--output", str(theirs)))
    assert theirs.read_text() == "someone's file"
    assert predict_command(command(pictures, "--storage", storage, "--output", str(theirs), "--overwrite")) == 0
    assert len(json.loads(theirs.read_text())) == 10
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(ConfigError, match=r"folder.json is a folder: name a .json or .parquet file in it"):
        predict_command(command(pictures, "--storage", storage, "--output", str(tmp_path / "folder.json")))
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"cannot write the predictions to /proc/cifar-transfer-test \(.*\): choose a place"):
        predict_command(command(pictures, "--storage", "/nonexistent-storage", "--output", "/proc/cifar-transfer-test/out.json"))
    assert time.perf_counter() - started < 5, "the place was checked after the work (no head exists under that storage)"
    capsys.readouterr()


def test_control_characters_in_file_names_are_shown_escaped(run, tmp_path, capsys):
    hostile = tmp_path / "clear\x1b[2J\x07bell.png"
    hostile.write_bytes((run["pictures"] / "img_000.png").read_bytes())
    assert predict_command(command(str(hostile), "--storage", run["storage"])) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "clear\\x1b[2J\\x07bell.png" in out
