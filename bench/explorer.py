"""Benchmark: the map explorer of a whole CIFAR-10 map (60,000 points) — build time, file size, neighbour recall and
the page's open time in headless Chromium; with `--screenshots FOLDER`, the pictures in the docs.

    .venv/bin/python bench/explorer.py --storage /path/to/storage [--fingerprint F] [--map KEY] [--screenshots docs/images]

It renders the explorer of an existing map of a feature set (`--map`, default the map with the most points) exactly as
the report stage does, without a head (so no predictions nor audit scores), to `<storage>/explorer-bench.html`. A map
made by this version kept its points' neighbours (the t-SNE stage searched them); an older map has them searched here,
in the build time. The neighbours shown (cosine in the top principal components, ranked by the full features) are
compared with the exact full-width cosine
neighbours (`audit.index.exact_search`) of `--queries` sampled points: recall at k. Results: bench/results/explorer.jsonl.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench.results_log import record  # noqa: E402


def neighbour_recall(storage, features, page: str, queries: int, seed: int) -> float:
    """Share of the exact full-width neighbours (among the map's points) the page shows, over sampled points."""
    import pandas as pd

    from cifar_transfer.audit.index import exact_search
    from cifar_transfer.audit.vectors import SetRows

    blob = json.loads(re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', page, re.S).group(1))
    k = blob["k"]
    shown = np.frombuffer(base64.b64decode(blob["neighbours"]), "<u4").reshape(-1, k).astype(np.int64)
    rows = SetRows.open(storage, features.folder)
    splits, index, _ = rows.names()
    position = {(split, int(number)): place for place, (split, number) in enumerate(zip(splits, index, strict=True))}
    keys = pd.Series(blob["keys"])
    points = np.array([position[(key.split("/")[0], int(key.split("/")[1]))] for key in keys])
    if len(points) != rows.rows:
        raise SystemExit(f"the map has {len(points)} of the set's {rows.rows} rows: the recall here needs a map of every row")
    chosen = np.random.default_rng(seed).choice(len(points), size=min(queries, len(points)), replace=False)
    vectors = np.zeros((len(chosen), rows.width), np.float32)
    wanted = {int(points[point]): number for number, point in enumerate(chosen)}
    for block in rows.blocks():
        for place in range(block.start, block.stop):
            if place in wanted:
                vectors[wanted[place]] = block.vectors[place - block.start]
    exact, _ = exact_search(rows, vectors, k, exclude=points[chosen])
    at = {int(place): point for point, place in enumerate(points)}
    truth = [{at[int(place)] for place in row} for row in exact]
    return float(np.mean([len(set(shown[point].tolist()) & found) / k for point, found in zip(chosen, truth, strict=True)]))


def small_png(path: Path) -> None:
    """A screenshot for the docs: 256 colours, a third of the bytes."""
    from PIL import Image

    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)


def in_chromium(path: Path, screenshots: Path | None) -> dict:
    """Open time (navigation to the first drawn frame), points drawn; screenshots of the full map, a hover and a click."""
    from test_html_report import chromium_page

    problems: list[str] = []
    with chromium_page(problems) as page:
        page.set_viewport_size({"width": 1280, "height": 800})
        started = time.perf_counter()
        page.goto(path.as_uri(), wait_until="load")
        page.wait_for_function("window.explorer && window.explorer.drawn() > 0")
        opened = time.perf_counter() - started
        result = {"open_seconds": round(opened, 2), "drawn": page.evaluate("window.explorer.drawn()")}
        if screenshots is not None:
            screenshots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=screenshots / "explorer-map.png")
            box = page.locator("#explorer-canvas").bounding_box()
            centre = (box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.55)
            page.mouse.move(*centre)
            for _ in range(2):
                page.mouse.wheel(0, -400)
            count = page.evaluate("window.explorer.count")
            found = page.evaluate(f"() => Array.from({{length: {count}}}, (_, i) => window.explorer.screenPosition(i))")
            positions = np.array([[point["x"], point["y"]] for point in found])
            inside = np.flatnonzero(
                (positions[:, 0] > box["x"] + 200)
                & (positions[:, 0] < box["x"] + box["width"] - 300)
                & (positions[:, 1] > box["y"] + 150)
                & (positions[:, 1] < box["y"] + box["height"] - 200)
            )
            point = int(inside[0])
            page.mouse.move(*positions[point])
            page.wait_for_timeout(300)  # the sprite tile decodes (a screenshot, not a check)
            page.screenshot(path=screenshots / "explorer-hover.png")
            page.mouse.click(*positions[point])
            page.mouse.move(box["x"] + 5, box["y"] + 5)
            page.wait_for_timeout(300)
            page.screenshot(path=screenshots / "explorer-click.png")
            for name in ("explorer-map.png", "explorer-hover.png", "explorer-click.png"):
                small_png(screenshots / name)
    if problems:
        raise SystemExit(f"the page reported errors: {problems}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True)
    parser.add_argument("--fingerprint")
    parser.add_argument("--map", help="the t-SNE map's key (default: the one with the most points)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--screenshots", type=Path)
    args = parser.parse_args()

    from cifar_transfer import layout
    from cifar_transfer.catalogue import find_feature_set
    from cifar_transfer.explorer import write_explorer
    from cifar_transfer.storage import Storage
    from cifar_transfer.tsne import finished_tsne

    storage = Storage(args.storage)
    features = find_feature_set(args.storage, args.fingerprint)
    maps = [
        tsne
        for key in ([args.map] if args.map else [path.rsplit("/", 1)[-1] for path in storage.fs.ls(layout.maps_folder(features.folder))])
        if (tsne := finished_tsne(storage, features.folder, key)) is not None
    ]
    if not maps:
        raise SystemExit(f"the feature set {features.fingerprint} has no finished t-SNE map: run `cifar-transfer` with a map first")
    tsne = max(maps, key=lambda found: found.points + found.test_points)
    cpu = time.process_time()
    build = write_explorer(storage, features, tsne, None, storage.path("explorer-bench.html"), None)
    cpu = time.process_time() - cpu
    page = Path(build.path).read_text(encoding="utf-8")
    sprites = sum(len(block) for block in re.findall(r'class="explorer-sprite" data-tile="\d+">(.*?)</script>', page, re.S))
    result = {
        "benchmark": "map explorer",
        "feature_set": features.fingerprint,
        "feature_shape": features.feature_shape,
        "points": build.points,
        "map": {"train": tsne.points, "test": tsne.test_points, "seconds": round(tsne.seconds, 1)},
        "build_seconds": build.seconds,
        "build_cpu_seconds": round(cpu, 1),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "file_mib": round(build.bytes / 2**20, 2),
        "sprite_mib": round(sprites / 2**20, 2),
        "neighbour_recall_at_k": round(neighbour_recall(storage, features, page, args.queries, 0), 4),
        "queries": args.queries,
    }
    result |= in_chromium(Path(build.path), args.screenshots)
    record("explorer", result)


if __name__ == "__main__":
    main()
