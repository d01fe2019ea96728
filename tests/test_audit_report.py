"""The report's audit section: galleries of duplicate pairs, label issues and outliers, checked in headless Chromium."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from test_html_report import chromium_page, report_inputs

from cifar_transfer.html_report import AuditGalleries, AuditTile, render_html_report

IMAGE_PIXELS = """(selector) => Array.from(document.querySelectorAll(selector), image => {
  const canvas = document.createElement("canvas");
  canvas.width = image.naturalWidth; canvas.height = image.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0);
  return Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data);
})"""


def galleries(seed: int = 0) -> AuditGalleries:
    rng = np.random.default_rng(seed)

    def picture() -> np.ndarray:
        return rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)

    twin = picture()
    return AuditGalleries(
        summary="1 test images have a near-duplicate in train; 1 near-duplicate pairs in 1 clusters; 2 images whose label the data doubts",
        duplicates=[AuditTile([twin, twin], ["score 0.990 (near-duplicate)"], ["train/3", "test/<b>4</b>"])],
        label_issues=[
            AuditTile([picture()], ["given: cat", "suggested: dog", "score -0.700"], ["train/9"]),
            AuditTile([picture()], ["given: ship", "suggested: airplane", "score -0.200"], ["train/12"]),
        ],
        outliers=[],
    )


def test_the_audit_section_is_left_out_without_an_audit_and_escapes_its_text():
    assert 'id="audit"' not in render_html_report(**report_inputs())
    page = render_html_report(**report_inputs(), audit=galleries())
    assert 'id="audit-summary"' in page and "test/&lt;b&gt;4&lt;/b&gt;" in page and "<b>4</b>" not in page


@pytest.mark.slow
def test_the_audit_galleries_show_their_pictures_in_chromium(tmp_path):
    shown = galleries()
    report = tmp_path / "report.html"
    report.write_text(render_html_report(**report_inputs(), audit=shown), encoding="utf-8")
    problems: list[str] = []
    with chromium_page(problems) as page:
        page.goto(report.as_uri(), wait_until="load")
        assert page.inner_text("#audit-summary").startswith("1 test images have a near-duplicate in train")
        pair = np.array(page.evaluate(IMAGE_PIXELS, "#audit-duplicates img"), np.uint8).reshape(2, 32, 32, 4)[..., :3]
        assert np.array_equal(pair[0], shown.duplicates[0].pictures[0]) and np.array_equal(pair[1], pair[0])  # lossless PNG
        items = page.eval_on_selector_all("#audit-label-issues li", "items => items.map(item => item.innerText)")
        assert ["given: cat" in items[0], "suggested: dog" in items[0], "suggested: airplane" in items[1]] == [True, True, True]
        assert page.inner_text("#audit-outliers") == "None."
        assert page.locator("#audit-duplicates img").first.bounding_box()["width"] == 96
        if os.environ.get("CIFAR_TRANSFER_SCREENSHOT_DIR"):
            folder = Path(os.environ["CIFAR_TRANSFER_SCREENSHOT_DIR"])
            folder.mkdir(parents=True, exist_ok=True)
            page.locator("#audit").screenshot(path=folder / "audit-screenshot.png")
    assert not problems
