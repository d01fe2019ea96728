"""The map explorer: every point of a map, zoom and pan, a thumbnail on hover, neighbours and audit scores on a click,
in one offline page checked in headless Chromium; and its data made from a real run's features, map, head and audit."""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from test_html_report import CLASSES, offline_page

from cifar_transfer.audit.vectors import SetRows
from cifar_transfer.explorer import map_point_neighbours, point_vectors
from cifar_transfer.explorer_html import TILE, ExplorerAudit, render_explorer
from cifar_transfer.neighbours import NEIGHBOURS, map_neighbours, nearest_points
from cifar_transfer.tsne import NEIGHBOURS_COLUMN, SIMILARITIES_COLUMN

BLOB = re.compile(r'<script type="application/json" id="explorer-data">(.*?)</script>', re.S)
SPRITES = re.compile(r'<script type="text/plain" class="explorer-sprite" data-tile="(\d+)">(.*?)</script>', re.S)


def blocky_images(count: int, rng: np.random.Generator) -> np.ndarray:
    """Pictures of 4 x 4 random colour blocks (8 px each): JPEG keeps them within a few levels, and any two differ a lot."""
    return rng.integers(0, 256, (count, 4, 4, 3), dtype=np.uint8).repeat(8, axis=1).repeat(8, axis=2)


def explorer_inputs(count: int = 1500, k: int = 4, seed: int = 0) -> dict:
    """Ten clusters of points, their pictures, each point's k nearest points in the map, and an audit of every point."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 10
    points = rng.uniform(-50, 50, (10, 2))[labels] + rng.normal(0, 6, (count, 2))
    images = blocky_images(count, rng)
    distances = ((points[:, None] - points[None]) ** 2).sum(axis=2) + np.eye(count) * 1e12
    neighbours = np.argsort(distances, axis=1, kind="stable")[:, :k]
    audit = ExplorerAudit(
        label_score=rng.uniform(-1, 1, count).astype(np.float32),
        suggested=(labels + 1) % 10,
        outlier_score=rng.uniform(0, 1, count).astype(np.float32),
        duplicates={5: [("train/<b>9</b>", 9, 0.987)], 9: [("train/5", 5, 0.987)]},
        summary="1 near-duplicate pair",
    )
    return {
        "title": "Map explorer <test>",
        "note": "synthetic",
        "classes": list(CLASSES),
        "points": points,
        "labels": labels,
        "keys": [f"train/{number}" for number in range(count)],
        "tiles": [images[start : start + TILE] for start in range(0, count, TILE)],
        "neighbours": neighbours,
        "similarities": 1 / (1 + np.sqrt(np.take_along_axis(distances, neighbours, axis=1))),
        "predicted": np.where(rng.random(count) < 0.8, labels, (labels + 1) % 10),
        "audit": audit,
        "report_href": "report-abc.html",
    }


def decoded(blob: dict, name: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(blob[name]), np.dtype(dtype).newbyteorder("<"))


def test_the_page_carries_every_point_its_neighbours_and_a_sprite_tile_per_thousand_images():
    inputs = explorer_inputs()
    page = render_explorer(**inputs)
    blob = json.loads(BLOB.search(page).group(1))
    assert blob["count"] == 1500 and blob["k"] == 4 and len(blob["keys"]) == 1500
    assert np.array_equal(decoded(blob, "label", "u2"), inputs["labels"])
    assert np.array_equal(decoded(blob, "neighbours", "u4").reshape(1500, 4), inputs["neighbours"])
    assert decoded(blob, "x", "f4").min() >= 0 and decoded(blob, "y", "f4").max() <= 1
    assert [int(number) for number, _ in SPRITES.findall(page)] == [0, 1]  # 1,500 thumbnails: two tiles of up to 1,024
    assert "<b>9</b>" not in page and "<test>" not in page  # keys and title are escaped, in the JSON and the HTML
    assert blob["audit"]["duplicates"]["5"] == [["train/<b>9</b>", 9, 0.987]]
    assert "<script src" not in page and "http" not in page


def test_the_page_refuses_thumbnails_that_do_not_match_its_points():
    inputs = explorer_inputs(count=30)
    with pytest.raises(ValueError, match="30 points need 1 thumbnail tiles"):
        render_explorer(**inputs | {"tiles": []})
    with pytest.raises(ValueError, match="differ in length"):
        render_explorer(**inputs | {"keys": inputs["keys"][:-1]})


def test_nearest_points_are_the_exact_cosine_neighbours_and_never_the_point_itself():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(2500, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    positions, similarities = nearest_points(vectors, 5)
    full = vectors @ vectors.T
    np.fill_diagonal(full, -np.inf)
    assert np.array_equal(positions, np.argsort(-full, axis=1, kind="stable")[:, :5])
    assert np.allclose(similarities, np.take_along_axis(full, positions, axis=1), atol=1e-5)
    few, values = nearest_points(vectors[:3], 5)  # fewer points than k: the rest are marked missing
    assert (few[:, 2:] == -1).all() and np.isnan(values[:, 2:]).all() and (few[:, :2] != np.arange(3)[:, None]).all()


THUMB_PIXELS = """(id) => {
  const canvas = document.getElementById(id);
  return Array.from(canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data);
}"""
CANVAS_INK = """() => {
  const canvas = document.getElementById("explorer-canvas");
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let ink = 0;
  for (let i = 3; i < data.length; i += 4) if (data[i] > 0) ink++;
  return ink;
}"""


def screen_points(page, count: int) -> np.ndarray:
    found = page.evaluate(f"() => Array.from({{length: {count}}}, (_, i) => window.explorer.screenPosition(i))")
    return np.array([[point["x"], point["y"]] for point in found])


def isolated(positions: np.ndarray, gap: float) -> np.ndarray:
    """Points whose nearest other point is over `gap` px away (the mouse at whole pixels is then nearest to them)."""
    taken = np.full(len(positions), np.inf)
    for start in range(0, len(positions), 500):
        block = np.sqrt(((positions[start : start + 500, None] - positions[None]) ** 2).sum(axis=2))
        block[np.arange(len(block)), np.arange(start, start + len(block))] = np.inf
        taken[start : start + 500] = block.min(axis=1)
    return taken > gap


@pytest.mark.slow
def test_the_explorer_draws_zooms_shows_thumbnails_neighbours_and_audit_scores_offline_in_chromium(tmp_path):
    inputs = explorer_inputs()
    images = np.concatenate(inputs["tiles"])
    page_file = tmp_path / "explorer.html"
    page_file.write_text(render_explorer(**inputs), encoding="utf-8")
    with offline_page(page_file) as page:
        assert page.evaluate("window.explorer.count") == 1500 and page.evaluate("window.explorer.drawn()") == 1500
        assert page.evaluate(CANVAS_INK) > 5000  # the points are on the canvas
        assert page.locator("#explorer-tooltip").is_hidden() and page.locator("#explorer-selected").is_hidden()

        positions = screen_points(page, 1500)
        chosen = int(np.flatnonzero(isolated(positions, 7))[0])  # hover in the second tile too: 1,024 and up
        later = int(np.flatnonzero(isolated(positions, 7) & (np.arange(1500) >= TILE))[0])
        for point in (chosen, later):
            page.mouse.move(*positions[point])
            assert page.locator("#explorer-tooltip").is_visible()
            assert page.inner_text("#explorer-tip-key") == f"train/{point}"
            assert page.inner_text("#explorer-tip-label").startswith(f"label: {CLASSES[inputs['labels'][point]]}")
            page.wait_for_function(f"() => ({THUMB_PIXELS})('explorer-thumb').some((value, k) => k % 4 === 3 && value > 0)")
            shown = np.array(page.evaluate(THUMB_PIXELS, "explorer-thumb"), np.float64).reshape(32, 32, 4)[..., :3]
            assert np.abs(shown - images[point]).mean() < 12  # another picture differs by ~85 on average

        page.mouse.click(*positions[chosen])
        assert page.locator("#explorer-selected").is_visible()
        assert page.inner_text("#explorer-selected-key") == f"train/{chosen}"
        shown_neighbours = page.eval_on_selector_all("#explorer-neighbours li", "items => items.map(item => Number(item.dataset.point))")
        assert shown_neighbours == inputs["neighbours"][chosen].tolist()
        texts = page.eval_on_selector_all("#explorer-neighbours li", "items => items.map(item => item.innerText)")
        assert all(text.startswith(f"train/{other}") for text, other in zip(texts, shown_neighbours, strict=True))
        audit = inputs["audit"]
        assert page.inner_text("#explorer-label-score") == f"{audit.label_score[chosen]:.3f}"
        assert page.inner_text("#explorer-suggested") == CLASSES[audit.suggested[chosen]]
        assert page.inner_text("#explorer-outlier-score") == f"{audit.outlier_score[chosen]:.3f}"
        page.evaluate("window.explorer.select(5)")  # a point with a near-duplicate partner
        assert page.inner_text("#explorer-duplicates") == "train/<b>9</b> (0.987)"
        page.wait_for_function(f"() => ({THUMB_PIXELS})('explorer-selected-thumb').some((value, k) => k % 4 === 3 && value > 0)")
        if os.environ.get("CIFAR_TRANSFER_SCREENSHOT_DIR"):
            folder = Path(os.environ["CIFAR_TRANSFER_SCREENSHOT_DIR"])
            folder.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=folder / "explorer-test.png")

        before = page.evaluate("window.explorer.view()")
        box = page.locator("#explorer-canvas").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.wheel(0, -600)  # zoom in around the mouse
        zoomed = page.evaluate("window.explorer.view()")
        assert zoomed["scale"] > before["scale"] * 2
        assert page.evaluate("window.explorer.drawn()") < 1500  # points outside the view are not drawn
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] / 2 + 80, box["y"] + box["height"] / 2 + 40, steps=4)
        page.mouse.up()
        panned = page.evaluate("window.explorer.view()")
        assert (panned["tx"] - zoomed["tx"], panned["ty"] - zoomed["ty"]) == (80, 40) and panned["scale"] == zoomed["scale"]
        page.click("#zoom-reset")
        assert page.evaluate("window.explorer.view()") == {"scale": 1, "tx": 0, "ty": 0}
        page.click("#zoom-in")
        assert page.evaluate("window.explorer.view()")["scale"] == 2


def test_a_run_writes_the_explorer_of_its_map_next_to_its_report_with_neighbours_from_the_features(finished_run, tmp_path):
    """The session's whole run: its report links the explorer, which holds every point of the map, the head's
    predictions, and neighbours close to the exact full-width cosine ones."""
    import pandas as pd

    from cifar_transfer import layout
    from cifar_transfer.report import map_name
    from cifar_transfer.storage import Storage

    summary = finished_run
    path = Path(layout.explorer(summary.head.files.folder, map_name(summary.tsne)))
    report = Path(summary.html_report).read_text(encoding="utf-8")
    assert f'id="explorer-link" href="{path.name}"' in report
    page = path.read_text(encoding="utf-8")
    assert f'href="{Path(summary.html_report).name}"' in page
    blob = json.loads(BLOB.search(page).group(1))
    embedding = pd.read_parquet(summary.tsne.embedding)
    assert blob["count"] == len(embedding) == summary.tsne.points + summary.tsne.test_points and blob["k"] == NEIGHBOURS
    assert blob["keys"] == [f"{split}/{number}" for split, number in zip(embedding["split"], embedding["index"], strict=True)]
    predictions = pd.read_parquet(summary.head.files.predictions).set_index(["split", "index"])["predicted"]
    expected = predictions.loc[list(zip(embedding["split"], embedding["index"], strict=True))].to_numpy()
    assert np.array_equal(decoded(blob, "predicted", "i2"), expected)
    assert blob["audit"] is None and len(SPRITES.findall(page)) == -(-blob["count"] // TILE)

    storage = Storage(summary.config.storage)
    splits, index = embedding["split"].to_numpy(dtype=object), embedding["index"].to_numpy()
    rows = SetRows.open(storage, summary.features.folder)
    every = {
        (block.split, int(number)): vector for block in rows.blocks() for number, vector in zip(block.index, block.vectors, strict=True)
    }
    full = np.stack([every[(split, int(number))] for split, number in zip(splits, index, strict=True)])
    exact, _ = nearest_points(full, NEIGHBOURS)
    shown = decoded(blob, "neighbours", "u4").reshape(-1, NEIGHBOURS)
    recall = np.mean([len(set(a) & set(b)) / NEIGHBOURS for a, b in zip(shown.tolist(), exact.tolist(), strict=True)])
    assert recall > 0.9, recall
    vectors = point_vectors(storage, summary.features.folder, splits, index)
    assert np.allclose(np.linalg.norm(vectors.projected, axis=1), 1, atol=1e-5) and np.array_equal(vectors.full, full)

    # The map kept them (the t-SNE stage searched the features it held): the explorer reads no features, and a
    # map made before maps kept them has them searched from the features.
    kept = np.stack(embedding[NEIGHBOURS_COLUMN].to_numpy())
    assert np.array_equal(shown, kept)
    nowhere = Storage(str(tmp_path / "nothing-here"))
    assert np.array_equal(map_point_neighbours(nowhere, summary.features, embedding, splits, index)[0], kept)
    old_map = embedding.drop(columns=[NEIGHBOURS_COLUMN, SIMILARITIES_COLUMN])
    searched, _ = map_point_neighbours(storage, summary.features, old_map, splits, index)
    assert np.mean([len(set(a) & set(b)) / NEIGHBOURS for a, b in zip(searched.tolist(), kept.tolist(), strict=True)]) > 0.9
    with pytest.raises(ValueError, match="1 of the map's points are not in the feature set any more: make the map again"):
        point_vectors(storage, summary.features.folder, np.array(["train", "train"], dtype=object), np.array([0, 10**9]))


def test_map_neighbours_rank_the_projections_candidates_by_the_full_vectors():
    """Vectors whose nearest neighbours differ only outside the projection's components: ranking by the full vectors
    finds them, and points with fewer than k others are marked missing."""
    from cifar_transfer.neighbours import PointVectors

    rng = np.random.default_rng(2)
    full = rng.normal(size=(400, 64)).astype(np.float32)
    full /= np.linalg.norm(full, axis=1, keepdims=True)
    projected = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    positions, similarities = map_neighbours(PointVectors(projected, full), 3)
    candidates, _ = nearest_points(projected, 32)
    for point in range(400):  # the best 3 of the 32 candidates, by the full vectors
        ranked = candidates[point][np.argsort(-(full[candidates[point]] @ full[point]), kind="stable")][:3]
        assert positions[point].tolist() == ranked.tolist()
    assert (positions != nearest_points(projected, 3)[0]).any(axis=1).mean() > 0.5  # the projection alone finds others
    assert np.allclose(similarities, np.take_along_axis(full @ full.T, positions, axis=1), atol=1e-5)
    few, values = map_neighbours(PointVectors(projected[:3], full[:3]), 4)
    assert (few[:, 2:] == -1).all() and np.isnan(values[:, 2:]).all()


def test_the_explorer_of_a_collection_names_its_images_and_shows_their_own_pictures(prefect_api, tmp_path):
    """A folder of images: the explorer's keys are the image names, each thumbnail is the image's own picture, and
    `similar` takes an image's name as its query."""
    import io
    import zlib

    from PIL import Image
    from test_collections import CLASSES as FOLDER_CLASSES
    from test_collections import folder_config, picture, write_tree

    from cifar_transfer.audit.similar import similar
    from cifar_transfer.explorer import write_explorer
    from cifar_transfer.flows.pipeline import extract_features
    from cifar_transfer.storage import Storage
    from cifar_transfer.tsne import tsne_map

    root = tmp_path / "photos"
    keys = write_tree(root, {"train": 8, "test": 3})
    config = folder_config(root, tmp_path / "storage", tsne_sample=1000, tsne_test=True)
    features, _ = extract_features(config)
    key = config.tsne_key(features.fingerprint, features.content_version)
    tsne = tsne_map(config.storage, features.folder, key, config.tsne_settings, features.classes)
    build = write_explorer(Storage(config.storage), features, tsne, None, str(tmp_path / "explorer.html"), None)
    page = Path(build.path).read_text(encoding="utf-8")
    again = write_explorer(Storage(config.storage), features, tsne, None, build.path, None)  # a rerun: the same inputs
    assert not build.reused and again.reused and Path(build.path).read_text(encoding="utf-8") == page
    linked = write_explorer(Storage(config.storage), features, tsne, None, build.path, "report.html")  # other inputs
    assert not linked.reused and 'href="report.html"' in Path(build.path).read_text(encoding="utf-8")
    blob = json.loads(BLOB.search(page).group(1))
    assert build.points == blob["count"] == len(keys) and sorted(blob["keys"]) == sorted(keys)
    ((_, tile),) = SPRITES.findall(page)
    sheet = np.asarray(Image.open(io.BytesIO(base64.b64decode(tile))).convert("RGB"), np.float64)
    shown = [sheet[(n // 32) * 32 : (n // 32 + 1) * 32, (n % 32) * 32 : (n % 32 + 1) * 32] for n in range(len(keys))]
    pictures = [
        np.asarray(picture(FOLDER_CLASSES.index(name.split("/")[1]), zlib.crc32(name.encode()) % 10_000), np.float64)
        for name in blob["keys"]
    ]
    differences = np.array([[np.abs(thumb - other).mean() for other in pictures] for thumb in shown])
    assert (differences.argmin(axis=1) == np.arange(len(keys))).all()
    neighbours = similar(config.storage, keys[0], k=3)  # a row named by its image's name, its neighbours by theirs
    assert len(neighbours) == 3 and {neighbour.key for neighbour in neighbours} <= set(keys) - {keys[0]}
