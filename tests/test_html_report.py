"""The HTML report: one offline page whose map, tables and gallery work in a real (headless) Chromium."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from cifar_transfer.html_report import render_html_report

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MAP_BLOB = re.compile(r'<script type="application/json" id="tsne-data">(.*?)</script>', re.S)


def report_inputs(map_count: int = 200, test_count: int = 300, seed: int = 0) -> dict:
    """Ten well-separated t-SNE clusters and a test split that is right about 70% of the time."""
    rng = np.random.default_rng(seed)
    test_truth = rng.integers(0, 10, test_count)
    test_predicted = np.where(rng.random(test_count) < 0.7, test_truth, rng.integers(0, 10, test_count))
    map_truth = np.repeat(np.arange(10), map_count // 10)
    centres = rng.uniform(-50, 50, (10, 2))
    return {
        "title": "cifar-transfer: MobileNetV2 224px avg",
        "config": {"backbone": "MobileNetV2", "input_size": 224, "pooling": "avg", "tsne": {"perplexity": 30}},
        "fingerprint": "0123456789abcdef",
        "classes": list(CLASSES),
        "test_truth": test_truth,
        "test_predicted": test_predicted,
        "test_confidence": rng.uniform(0.1, 1.0, test_count),
        "test_images": rng.integers(0, 256, (test_count, 32, 32, 3), dtype=np.uint8),
        "map_points": centres[map_truth] + rng.normal(0, 4, (map_count, 2)),
        "map_truth": map_truth,
        "map_predicted": np.where(rng.random(map_count) < 0.8, map_truth, (map_truth + 1) % 10),
        "map_images": rng.integers(0, 256, (map_count, 32, 32, 3), dtype=np.uint8),
        "metrics": {"test accuracy": 0.7682, "validation accuracy": 0.77, "head": "logistic (C=0.1)"},
        "timings": {"extraction": 870.2, "t-SNE": 85.9, "head": 111.0},
    }


def map_data(page_html: str) -> dict:
    return json.loads(MAP_BLOB.search(page_html).group(1))


def test_a_skipped_map_is_said_so():
    inputs = report_inputs() | {"map_points": None, "map_truth": None, "map_predicted": None, "map_images": None}
    page_html = render_html_report(**inputs)
    assert '<p id="tsne-skipped">The t-SNE map was skipped for this run.</p>' in page_html
    assert 'id="tsne-canvas"' not in page_html and 'id="tsne-data"' not in page_html


def test_text_is_escaped_in_html_and_in_the_json_blob():
    hostile = "<script>alert(1)</script>"
    inputs = report_inputs()
    inputs["classes"][3] = hostile
    inputs["title"] = f"run {hostile}"
    inputs["config"]["note"] = f"a & b {hostile}"
    page_html = render_html_report(**inputs)
    assert hostile not in page_html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page_html
    assert page_html.count("</script>") == 2  # the JSON blob and the map's code, nothing injected
    blob = MAP_BLOB.search(page_html).group(1)
    assert "<" not in blob and ">" not in blob and "&" not in blob
    assert json.loads(blob)["classes"][3] == hostile


def test_a_large_map_is_subsampled_to_the_cap_the_same_way_each_time():
    inputs = report_inputs(map_count=500)
    first = render_html_report(**inputs, max_map_points=123)
    data = map_data(first)
    assert len(data["x"]) == len(data["y"]) == len(data["truth"]) == len(data["predicted"]) == 123
    assert set(data["truth"]) == set(range(10))
    assert first == render_html_report(**inputs, max_map_points=123)
    assert len(map_data(render_html_report(**inputs))["x"]) == 500


def test_map_inputs_come_all_or_none():
    with pytest.raises(ValueError, match="all given or all None"):
        render_html_report(**report_inputs() | {"map_images": None})


def chromium_executable() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@contextlib.contextmanager
def chromium_page(problems: list[str], requests: list[str] | None = None):
    """A headless Chromium page (1280x900) whose page errors land in `problems`, and with `requests` its console
    errors too and the URL of every request it makes; the test opens its report in it."""
    executable = chromium_executable()
    if executable is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set CHROMIUM to its path)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            if requests is not None:
                page.on("console", lambda message: problems.append(f"console: {message.text}") if message.type == "error" else None)
                page.on("request", lambda request: requests.append(request.url))
            yield page
        finally:
            browser.close()


@contextlib.contextmanager
def offline_page(path: Path):
    """`path` opened in a `chromium_page`; once the test is done with it, it must have raised no error and requested
    nothing but itself and data: URLs (it works offline)."""
    problems: list[str] = []
    requests: list[str] = []
    with chromium_page(problems, requests) as page:
        page.goto(path.as_uri(), wait_until="load")
        yield page
    assert problems == []
    assert requests and all(url == path.as_uri() or url.startswith("data:") for url in requests), requests


THUMB_PIXELS = """() => {
  const canvas = document.getElementById("tsne-thumb");
  return Array.from(canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data);
}"""


@pytest.mark.slow
def test_the_page_works_offline_in_chromium(tmp_path):
    inputs = report_inputs()
    report = tmp_path / "report.html"
    report.write_text(render_html_report(**inputs), encoding="utf-8")
    with offline_page(report) as page:
        assert page.evaluate("window.reportMap.count") == 200
        assert page.locator("#tsne-tooltip").is_hidden()
        page.locator("#tsne-canvas").scroll_into_view_if_needed()
        positions = np.array(
            [
                [point["x"], point["y"]]
                for point in page.evaluate(
                    "() => Array.from({length: window.reportMap.count}, (_, i) => window.reportMap.screenPosition(i))"
                )
            ]
        )
        gaps = np.sqrt(((positions[:, None] - positions[None]) ** 2).sum(axis=2)) + np.eye(200) * 1e9
        isolated = gaps.min(axis=1) > 4  # so the mouse, at whole pixels, is nearest to that point and no other
        right = inputs["map_truth"] == inputs["map_predicted"]
        for index in (np.flatnonzero(isolated & right)[0], np.flatnonzero(isolated & ~right)[0]):
            scroll = page.evaluate("() => ({x: window.scrollX, y: window.scrollY})")
            page.mouse.move(positions[index, 0] - scroll["x"], positions[index, 1] - scroll["y"])
            assert page.locator("#tsne-tooltip").is_visible()
            assert page.inner_text("#tsne-tip-true") == f"true: {CLASSES[inputs['map_truth'][index]]}"
            assert page.inner_text("#tsne-tip-predicted") == f"predicted: {CLASSES[inputs['map_predicted'][index]]}"
            marked_wrong = page.evaluate("() => document.getElementById('tsne-tip-predicted').classList.contains('wrong')")
            assert marked_wrong == (not right[index])
            page.wait_for_function(f"() => ({THUMB_PIXELS})().some((value, k) => k % 4 === 3 && value > 0)")
            shown = np.array(page.evaluate(THUMB_PIXELS), np.float64).reshape(32, 32, 4)[..., :3]
            # JPEG keeps random noise within a few levels; another point's image would differ by ~85 on average.
            assert np.abs(shown - inputs["map_images"][index]).mean() < 20
        if os.environ.get("CIFAR_TRANSFER_SCREENSHOT_DIR"):
            folder = Path(os.environ["CIFAR_TRANSFER_SCREENSHOT_DIR"])
            folder.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=folder / "report-screenshot.png")
        page.mouse.move(1, 1)
        assert page.locator("#tsne-tooltip").is_hidden()

        matrix = np.array(
            page.eval_on_selector_all(
                "#confusion-matrix tbody tr",
                "rows => rows.map(row => Array.from(row.querySelectorAll('td'), cell => Number(cell.textContent)))",
            )
        )
        expected = np.zeros((10, 10), int)
        np.add.at(expected, (inputs["test_truth"], inputs["test_predicted"]), 1)
        assert matrix.shape == (10, 10) and matrix.sum() == 300
        assert (matrix == expected).all()

        gallery = page.eval_on_selector_all(
            "#wrong-gallery .wrong-item",
            """items => items.map(item => ({
            index: Number(item.dataset.index), confidence: Number(item.dataset.confidence),
            width: item.querySelector('img').naturalWidth, text: item.innerText}))""",
        )
        wrong = np.flatnonzero(inputs["test_truth"] != inputs["test_predicted"])
        assert len(wrong) > 24 and len(gallery) == 24
        assert [item["index"] for item in gallery] == list(wrong[np.argsort(-inputs["test_confidence"][wrong], kind="stable")][:24])
        assert all(first["confidence"] >= second["confidence"] for first, second in zip(gallery, gallery[1:], strict=False))
        assert all(item["width"] == 32 for item in gallery)
        first = gallery[0]["index"]
        assert f"predicted: {CLASSES[inputs['test_predicted'][first]]}" in gallery[0]["text"]
