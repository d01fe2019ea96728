"""One self-contained HTML page per run, so a run can be read offline and shared as a single file.

Everything is inline (CSS, vanilla JS, images as data URIs): the page makes no network request.
The t-SNE thumbnails travel as one JPEG sprite sheet, because PNG of 3,000 CIFAR images is ~9 MB
in base64 while JPEG at high quality is ~2 MB; thumbnails sit on a grid aligned to JPEG's blocks,
so none bleeds into its neighbour. The few gallery images stay lossless PNG.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cifar_transfer.evaluation import confusion_matrix, sample_rows

# matplotlib's tab10, the palette of the PNG scatter in cifar_transfer/plots.py, so both pictures agree.
TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
SUBSAMPLE_SEED = 0


def render_html_report(
    *,
    title: str,
    config: dict,
    fingerprint: str,
    classes: list[str],
    test_truth: np.ndarray,
    test_predicted: np.ndarray,
    test_confidence: np.ndarray,
    test_images: np.ndarray,
    map_points: np.ndarray | None,
    map_truth: np.ndarray | None,
    map_predicted: np.ndarray | None,
    map_images: np.ndarray | None,
    metrics: dict,
    timings: dict,
    max_map_points: int = 3000,
    gallery_size: int = 24,
    audit: AuditGalleries | None = None,
    explorer_href: str | None = None,
) -> str:
    """The whole page as a string; the caller writes it wherever the run keeps its outputs."""
    truth, predicted = np.asarray(test_truth, np.int64), np.asarray(test_predicted, np.int64)
    confidence = np.asarray(test_confidence, np.float64)
    _same_length("test", truth, predicted, confidence, test_images)
    map_inputs = (map_points, map_truth, map_predicted, map_images)
    if any(item is None for item in map_inputs) and not all(item is None for item in map_inputs):
        raise ValueError("map_points, map_truth, map_predicted and map_images are all given or all None")
    colours = palette(len(classes))
    body = "\n".join(
        [
            f"<h1>{_e(title)}</h1>",
            f'<p class="fingerprint">feature set <code id="fingerprint">{_e(fingerprint)}</code></p>',
            '<section class="tables">',
            _key_value_table("configuration", "run-config", config, _config_value),
            _key_value_table("metrics", "run-metrics", metrics, _metric_value),
            _key_value_table("timings", "run-timings", timings, _seconds),
            "</section>",
            _accuracy_section(classes, truth, predicted),
            _map_section(classes, colours, map_points, map_truth, map_predicted, map_images, max_map_points, explorer_href),
            _gallery_section(classes, truth, predicted, confidence, test_images, gallery_size),
            *([_audit_section(audit)] if audit is not None else []),
        ]
    )
    return html_page(title, _CSS, body)


def html_page(title: str, css: str, body: str, meta: dict[str, str] | None = None) -> str:
    """A whole page: its title, its inline style and its body (already HTML); `meta` becomes `<meta name content>`
    tags at the top of its head."""
    tags = "".join(f'<meta name="{_e(name)}" content="{_e(value)}">\n' for name, value in (meta or {}).items())
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
{tags}<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{css}</style>
</head>
<body>
{body}
</body>
</html>
"""


@dataclass(frozen=True)
class AuditTile:
    """One entry of an audit gallery: its pictures (one, or a pair side by side) and its lines of text."""

    pictures: list[np.ndarray]
    lines: list[str]
    names: list[str]  # each picture's `<split>/<index>` or image name


@dataclass(frozen=True)
class AuditGalleries:
    """What the report shows of a feature set's audit (`cifar_transfer.audit`): its summary and its top rows."""

    summary: str
    duplicates: list[AuditTile]
    label_issues: list[AuditTile]
    outliers: list[AuditTile]


def _audit_gallery(element_id: str, title: str, note: str, tiles: list[AuditTile]) -> str:
    if not tiles:
        return f'<h3>{_e(title)}</h3><p id="{element_id}">None.</p>'
    items = "".join(
        '<li class="audit-item">'
        + '<span class="audit-pictures">'
        + "".join(
            f'<img src="{_png_data_uri(picture)}" alt="{_e(name)}" title="{_e(name)}">'
            for picture, name in zip(tile.pictures, tile.names, strict=True)
        )
        + "</span>"
        + "".join(f"<span>{_e(line)}</span>" for line in tile.lines)
        + "</li>"
        for tile in tiles
    )
    return f'<h3>{_e(title)}</h3><p>{_e(note)}</p><ol id="{element_id}" class="audit-gallery">{items}</ol>'


def _audit_section(audit: AuditGalleries) -> str:
    return "\n".join(
        [
            '<section id="audit">',
            "<h2>Audit</h2>",
            f'<p id="audit-summary">{_e(audit.summary)}</p>',
            _audit_gallery("audit-duplicates", "Near-duplicate pairs", "Most alike first (score: features and pixels).", audit.duplicates),
            _audit_gallery(
                "audit-label-issues",
                "Likely label errors",
                "Most doubtful first: the given label, and the one the data suggests.",
                audit.label_issues,
            ),
            _audit_gallery("audit-outliers", "Outliers", "Farthest from their nearest neighbours first.", audit.outliers),
            "</section>",
        ]
    )


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _same_length(what: str, *arrays) -> None:
    lengths = {len(array) for array in arrays}
    if len(lengths) > 1:
        raise ValueError(f"the {what} arrays differ in length: {sorted(lengths)}")


def palette(count: int) -> list[str]:
    """tab10 while it suffices; evenly spaced hues for larger label sets."""
    if count <= len(TAB10):
        return TAB10[:count]
    return [f"hsl({round(360 * number / count)}, 65%, 48%)" for number in range(count)]


def _config_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def _metric_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _seconds(value) -> str:
    return f"{value:,.1f} s" if isinstance(value, int | float) else str(value)


def _key_value_table(caption: str, element_id: str, values: dict, show) -> str:
    rows = "".join(f'<tr><th scope="row">{_e(key)}</th><td>{_e(show(value))}</td></tr>' for key, value in values.items())
    return f'<table id="{element_id}" class="key-value"><caption>{_e(caption)}</caption><tbody>{rows}</tbody></table>'


def _png_data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _accuracy_section(classes: list[str], truth: np.ndarray, predicted: np.ndarray) -> str:
    size = len(classes)
    matrix = confusion_matrix(truth, predicted, size)
    per_class_total = matrix.sum(axis=1)
    per_class_correct = np.diag(matrix)
    overall = per_class_correct.sum() / max(len(truth), 1)
    header = "".join(f'<th scope="col">{_e(name)}</th>' for name in classes)
    rows = []
    for row, name in enumerate(classes):
        cells = []
        for column in range(size):
            share = matrix[row, column] / max(per_class_total[row], 1)
            ink = "#fff" if share > 0.5 else "#111"
            cells.append(
                f'<td style="background:rgba(31,119,180,{share:.3f});color:{ink}" title="{share:.1%} of {_e(name)}">'
                f"{matrix[row, column]}</td>"
            )
        rows.append(f'<tr><th scope="row">{_e(name)}</th>{"".join(cells)}</tr>')
    per_class = "".join(
        f'<tr><th scope="row">{_e(name)}</th><td>{per_class_correct[number]}</td><td>{per_class_total[number]}</td>'
        f"<td>{_share(per_class_correct[number], per_class_total[number])}</td></tr>"
        for number, name in enumerate(classes)
    )
    return f"""<section>
<h2>Test accuracy</h2>
<p id="overall-accuracy">{overall:.2%} of {len(truth):,} test images are classified correctly.</p>
<div class="tables">
<table id="per-class-accuracy"><caption>per class</caption>
<thead><tr><th scope="col">true class</th><th scope="col">correct</th><th scope="col">images</th><th scope="col">accuracy</th></tr></thead>
<tbody>{per_class}</tbody></table>
<table id="confusion-matrix"><caption>confusion matrix: rows are the true class, columns the predicted one;
shading is the share of the true class</caption>
<thead><tr><th scope="col">true \\ predicted</th>{header}</tr></thead>
<tbody>{"".join(rows)}</tbody></table>
</div>
</section>"""


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def _map_section(classes, colours, points, truth, predicted, images, max_points: int, explorer_href: str | None) -> str:
    if points is None:
        return '<section><h2>t-SNE map</h2><p id="tsne-skipped">The t-SNE map was skipped for this run.</p></section>'
    points = np.asarray(points, np.float64)
    truth, predicted = np.asarray(truth, np.int64), np.asarray(predicted, np.int64)
    _same_length("map", points, truth, predicted, images)
    if len(points) > max_points:
        # A seeded random subsample keeps the classes' proportions and gives the same page for the same run.
        keep = sample_rows(len(points), max_points, SUBSAMPLE_SEED)
        points, truth, predicted, images = points[keep], truth[keep], predicted[keep], images[keep]
    scaled = unit_square(points)
    sprite, columns = _sprite_sheet(images)
    data = {
        "classes": list(classes),
        "colours": colours,
        "x": np.round(scaled[:, 0], 4).tolist(),
        "y": np.round(scaled[:, 1], 4).tolist(),
        "truth": truth.tolist(),
        "predicted": predicted.tolist(),
        "thumb": {"width": int(images.shape[2]), "height": int(images.shape[1]), "columns": columns},
        "sprite": sprite,
    }
    blob = json_blob(data)
    counts = np.bincount(truth, minlength=len(classes))
    explore = (
        f' <a id="explorer-link" href="{_e(explorer_href)}">Explore every point of the map</a> (zoom, neighbours, audit scores).'
        if explorer_href
        else ""
    )
    legend = "".join(
        f'<li><span class="swatch" style="background:{colour}"></span>{_e(name)} <small>({counts[number]})</small></li>'
        for number, (name, colour) in enumerate(zip(classes, colours, strict=True))
    )
    return f"""<section>
<h2>t-SNE map</h2>
<p>{len(points):,} points coloured by true class; hover a point to see its image and prediction.{explore}</p>
<div class="map">
<canvas id="tsne-canvas"></canvas>
<ul class="legend">{legend}</ul>
</div>
<div id="tsne-tooltip" hidden>
<canvas id="tsne-thumb" width="{images.shape[2]}" height="{images.shape[1]}"></canvas>
<div id="tsne-tip-true"></div>
<div id="tsne-tip-predicted"></div>
</div>
<script type="application/json" id="tsne-data">{blob}</script>
<script>{_MAP_JS}</script>
</section>"""


def json_blob(data: dict) -> str:
    """JSON that is safe inside a `<script>` element: no `<`, `>` or `&` left to end it early."""
    return json.dumps(data, separators=(",", ":")).replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def unit_square(points: np.ndarray) -> np.ndarray:
    """Points scaled into [0, 1]² with one scale for both axes (t-SNE distances mean the same in every direction), centred."""
    if not len(points):
        return points.reshape(0, 2)
    scaled = (points - points.min(axis=0)) / max(float(np.ptp(points, axis=0).max()), 1e-12)
    return scaled + (1 - scaled.max(axis=0)) / 2


def image_grid(images: np.ndarray, columns: int) -> np.ndarray:
    """Same-sized images on a grid `columns` wide, in rows (black where the last row ends)."""
    count, height, width = images.shape[:3]
    rows = max(1, math.ceil(count / columns))
    sheet = np.zeros((rows * height, columns * width, 3), np.uint8)
    for number, image in enumerate(np.asarray(images, np.uint8)):
        row, column = divmod(number, columns)
        sheet[row * height : (row + 1) * height, column * width : (column + 1) * width] = image
    return sheet


def _sprite_sheet(images: np.ndarray) -> tuple[str, int]:
    """All thumbnails on one near-square grid, as a JPEG data URI, and the grid's column count."""
    columns = max(1, math.ceil(math.sqrt(len(images))))
    buffer = io.BytesIO()
    Image.fromarray(image_grid(images, columns)).save(buffer, "JPEG", quality=92, subsampling=0)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), columns


def _gallery_section(classes, truth, predicted, confidence, images, size: int) -> str:
    wrong = np.flatnonzero(truth != predicted)
    chosen = wrong[np.argsort(-confidence[wrong], kind="stable")][:size]
    if not len(chosen):
        return '<section><h2>Most confidently wrong</h2><p id="wrong-gallery">No test image is misclassified.</p></section>'
    items = "".join(
        f'<li class="wrong-item" data-index="{index}" data-confidence="{confidence[index]:.6f}">'
        f'<img src="{_png_data_uri(images[index])}" alt="test image {index}">'
        f'<span class="truth">true: {_e(classes[truth[index]])}</span>'
        f'<span class="predicted">predicted: {_e(classes[predicted[index]])}</span>'
        f'<span class="confidence">{confidence[index]:.1%}</span></li>'
        for index in chosen
    )
    return f"""<section>
<h2>Most confidently wrong</h2>
<p>The {len(chosen)} misclassified test images the model was surest about, of {len(wrong):,} misclassified.</p>
<ol id="wrong-gallery">{items}</ol>
</section>"""


_CSS = """
[hidden] { display: none !important; }
body { font: 14px/1.45 system-ui, sans-serif; color: #111; margin: 24px auto; max-width: 1200px; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; }
h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
code { font-size: 15px; background: #f3f3f3; padding: 2px 6px; border-radius: 3px; }
.tables { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
table { border-collapse: collapse; }
caption { text-align: left; font-weight: 600; padding-bottom: 4px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
#confusion-matrix td { text-align: right; min-width: 36px; }
#per-class-accuracy td { text-align: right; }
.map { display: flex; gap: 16px; align-items: flex-start; }
#tsne-canvas { display: block; flex: 1; min-width: 0; height: 680px; border: 1px solid #ddd; cursor: crosshair; }
.legend { list-style: none; padding: 0; margin: 0; }
.legend li { white-space: nowrap; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 6px; margin-right: 6px; vertical-align: -1px; }
#tsne-tooltip { position: fixed; z-index: 10; pointer-events: none; background: #fff; border: 1px solid #999;
  border-radius: 4px; padding: 6px; box-shadow: 0 2px 8px rgba(0, 0, 0, .25); }
#tsne-thumb, #wrong-gallery img { display: block; width: 96px; height: 96px; image-rendering: pixelated; }
#tsne-tip-predicted.wrong { color: #c00; font-weight: 600; }
#wrong-gallery { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 12px; }
.wrong-item { display: flex; flex-direction: column; width: 110px; font-size: 12px; }
.wrong-item .predicted { color: #c00; }
.audit-gallery { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 12px; }
.audit-item { display: flex; flex-direction: column; font-size: 12px; }
.audit-pictures { display: flex; gap: 2px; }
.audit-gallery img { display: block; width: 96px; height: 96px; image-rendering: pixelated; }
"""

# Points are drawn one path per class (fast for thousands); hover picks the nearest point within PICK pixels,
# preferring the later-drawn (visible) one on ties.
_MAP_JS = """
(() => {
  const RADIUS = 3, PICK = 6, MARGIN = 12;
  const data = JSON.parse(document.getElementById("tsne-data").textContent);
  const canvas = document.getElementById("tsne-canvas");
  const tooltip = document.getElementById("tsne-tooltip");
  const thumb = document.getElementById("tsne-thumb");
  const tipTrue = document.getElementById("tsne-tip-true");
  const tipPredicted = document.getElementById("tsne-tip-predicted");
  const sprite = new Image();
  let positions = [];
  let hovered = -1;

  function layout() {
    const width = canvas.clientWidth, height = canvas.clientHeight;
    const side = Math.max(1, Math.min(width, height) - 2 * MARGIN);
    const left = (width - side) / 2, top = (height - side) / 2;
    positions = data.x.map((x, i) => [left + x * side, top + (1 - data.y[i]) * side]);
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    draw();
  }

  function draw() {
    const context = canvas.getContext("2d");
    const ratio = canvas.width / Math.max(1, canvas.clientWidth);
    context.setTransform(ratio, 0, 0, ratio, 0, 0);
    context.clearRect(0, 0, canvas.clientWidth, canvas.clientHeight);
    context.globalAlpha = 0.8;
    data.classes.forEach((_, label) => {
      context.beginPath();
      positions.forEach(([x, y], i) => {
        if (data.truth[i] === label) { context.moveTo(x + RADIUS, y); context.arc(x, y, RADIUS, 0, 2 * Math.PI); }
      });
      context.fillStyle = data.colours[label];
      context.fill();
    });
    context.globalAlpha = 1;
    if (hovered >= 0) {
      const [x, y] = positions[hovered];
      context.beginPath();
      context.arc(x, y, RADIUS + 3, 0, 2 * Math.PI);
      context.lineWidth = 2;
      context.strokeStyle = "#000";
      context.stroke();
    }
  }

  function nearest(x, y) {
    let best = -1, bestDistance = PICK * PICK;
    positions.forEach(([px, py], i) => {
      const distance = (px - x) ** 2 + (py - y) ** 2;
      if (distance <= bestDistance) { best = i; bestDistance = distance; }
    });
    return best;
  }

  function drawThumb() {
    const context = thumb.getContext("2d");
    const { width, height, columns } = data.thumb;
    context.clearRect(0, 0, width, height);
    if (hovered < 0 || !sprite.complete) return;
    const column = hovered % columns, row = Math.floor(hovered / columns);
    context.drawImage(sprite, column * width, row * height, width, height, 0, 0, width, height);
  }

  function show(i, clientX, clientY) {
    if (i !== hovered) {
      hovered = i;
      draw();
      if (i < 0) { tooltip.hidden = true; return; }
      tipTrue.textContent = "true: " + data.classes[data.truth[i]];
      tipPredicted.textContent = "predicted: " + data.classes[data.predicted[i]];
      tipPredicted.classList.toggle("wrong", data.truth[i] !== data.predicted[i]);
      drawThumb();
      tooltip.hidden = false;
    }
    if (i < 0) return;
    const box = tooltip.getBoundingClientRect();
    const left = clientX + 16 + box.width > window.innerWidth ? clientX - 16 - box.width : clientX + 16;
    const top = clientY + 16 + box.height > window.innerHeight ? clientY - 16 - box.height : clientY + 16;
    tooltip.style.left = Math.max(0, left) + "px";
    tooltip.style.top = Math.max(0, top) + "px";
  }

  canvas.addEventListener("mousemove", (event) => {
    const rect = canvas.getBoundingClientRect();
    show(nearest(event.clientX - rect.left, event.clientY - rect.top), event.clientX, event.clientY);
  });
  canvas.addEventListener("mouseleave", () => show(-1));
  sprite.addEventListener("load", drawThumb);
  sprite.src = data.sprite;
  new ResizeObserver(layout).observe(canvas);
  layout();

  window.reportMap = {
    count: positions.length,
    screenPosition(i) {
      const rect = canvas.getBoundingClientRect();
      return { x: rect.left + window.scrollX + positions[i][0], y: rect.top + window.scrollY + positions[i][1] };
    },
  };
})();
"""
