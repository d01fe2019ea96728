"""The map explorer: one self-contained offline page with every point of a t-SNE map, zoom and pan, a thumbnail on
hover, and a click for the image's nearest neighbours and its audit scores.

Hand-written canvas code (about 250 lines of JS, no library): a 2-D canvas draws 60,000 squares a frame in a few
milliseconds, a grid of cells finds the point under the mouse, and the page needs nothing else. Plotly's scattergl
would add ~3.5 MB of script and still need custom code for thumbnails and the panel; Bokeh would need its ~1 MB
runtime inlined and a custom callback for the same.

The data travel as little-endian typed arrays in base64 inside one JSON block (coordinates float32, labels uint16,
neighbours uint32, similarities int16 in 1/10,000ths). Thumbnails travel as JPEG sprite tiles of `TILE` images, each in
an inert `<script type="text/plain">` (the browser neither decodes nor lays it out): a tile becomes an image only when
a point of it is first shown. JPEG at quality 80 costs ~300 bytes a 32 px thumbnail (WebP the same size but 30x
slower to encode); thumbnails sit on a grid aligned to JPEG's 16 px chroma blocks, so none bleeds into its neighbour.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from cifar_transfer.html_report import html_page, image_grid, json_blob, palette, unit_square

TILE = 1024  # thumbnails in one sprite tile (32 x 32 of them)
TILE_COLUMNS = 32
JPEG_QUALITY = 80
MISSING = 0xFFFFFFFF  # a neighbour slot with no neighbour (fewer than k other points)


@dataclass(frozen=True)
class ExplorerAudit:
    """The audit's scores of each point (NaN, or -1 for `suggested`, where the audit has none) and its near-duplicates."""

    label_score: np.ndarray  # lower = more likely a wrong label
    suggested: np.ndarray  # the label the data suggests (class number)
    outlier_score: np.ndarray  # higher = more of an outlier
    duplicates: dict[int, list[tuple[str, int, float]]] = field(default_factory=dict)  # point -> (partner key, partner point or -1, score)
    summary: str = ""


def _b64(values: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).decode("ascii")


def sprite_tile(images: np.ndarray) -> str:
    """Up to TILE thumbnails on a grid TILE_COLUMNS wide, as base64 JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(image_grid(images, TILE_COLUMNS)).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render_explorer(
    *,
    title: str,
    note: str,
    classes: list[str],
    points: np.ndarray,
    labels: np.ndarray,
    keys: list[str],
    tiles: Iterable[np.ndarray],
    neighbours: np.ndarray,
    similarities: np.ndarray,
    predicted: np.ndarray | None = None,
    audit: ExplorerAudit | None = None,
    report_href: str | None = None,
    meta: dict[str, str] | None = None,
) -> str:
    """The explorer page. `tiles` gives the points' thumbnails in order, TILE at a time (the last may hold fewer), so the
    caller reads the pictures a tile at a time; `neighbours` holds each point's nearest other points (-1: none);
    `meta` is `html_page`'s."""
    points = np.asarray(points, np.float64)
    count = len(points)
    labels = np.asarray(labels, np.int64)
    neighbours = np.asarray(neighbours, np.int64).reshape(count, -1)
    similarities = np.asarray(similarities, np.float64).reshape(count, -1)
    lengths = {count, len(labels), len(keys), len(neighbours), len(similarities)} | ({len(predicted)} if predicted is not None else set())
    if len(lengths) > 1:
        raise ValueError(f"the explorer's arrays differ in length: {sorted(lengths)}")
    sprites, thumb = [], None
    for tile in tiles:
        tile = np.asarray(tile, np.uint8)
        thumb = thumb or {"width": int(tile.shape[2]), "height": int(tile.shape[1]), "columns": TILE_COLUMNS, "tile": TILE}
        sprites.append(sprite_tile(tile))
    if len(sprites) != math.ceil(count / TILE):
        raise ValueError(f"{count} points need {math.ceil(count / TILE)} thumbnail tiles of {TILE}, got {len(sprites)}")
    scaled = unit_square(points)
    colours = palette(len(classes))
    data = {
        "classes": list(classes),
        "colours": colours,
        "count": count,
        "k": int(neighbours.shape[1]),
        "x": _b64(scaled[:, 0], "f4"),
        "y": _b64(scaled[:, 1], "f4"),
        "label": _b64(labels, "u2"),
        "keys": list(keys),
        "neighbours": _b64(np.where(neighbours < 0, MISSING, neighbours), "u4"),
        "similarity": _b64(np.round(np.nan_to_num(similarities, nan=0.0) * 10_000), "i2"),
        "predicted": None if predicted is None else _b64(predicted, "i2"),
        "thumb": thumb or {"width": 32, "height": 32, "columns": TILE_COLUMNS, "tile": TILE},
        "audit": None
        if audit is None
        else {
            "summary": audit.summary,
            "labelScore": _b64(audit.label_score, "f4"),
            "suggested": _b64(audit.suggested, "i2"),
            "outlierScore": _b64(audit.outlier_score, "f4"),
            "duplicates": {
                str(point): [[key, int(partner), round(float(score), 4)] for key, partner, score in pairs]
                for point, pairs in audit.duplicates.items()
            },
        },
    }
    counts = np.bincount(labels, minlength=len(classes)) if count else np.zeros(len(classes), np.int64)
    legend = "".join(
        f'<li><span class="swatch" style="background:{colour}"></span>{_e(name)} <small>({counts[number]:,})</small></li>'
        for number, (name, colour) in enumerate(zip(classes, colours, strict=True))
    )
    back = f' · <a id="explorer-report" href="{_e(report_href)}">the report</a>' if report_href else ""
    sprite_blocks = "\n".join(
        f'<script type="text/plain" class="explorer-sprite" data-tile="{number}">{sprite}</script>' for number, sprite in enumerate(sprites)
    )
    body = f"""<header>
<h1>{_e(title)}</h1>
<p id="explorer-note">{_e(note)}{back}</p>
<div class="controls">
<button id="zoom-in" type="button" title="zoom in">+</button>
<button id="zoom-out" type="button" title="zoom out">&minus;</button>
<button id="zoom-reset" type="button" title="show the whole map">reset</button>
<span class="help">wheel: zoom · drag: pan · hover: image · click: neighbours and audit</span>
</div>
<ul class="legend">{legend}</ul>
</header>
<main>
<canvas id="explorer-canvas"></canvas>
<aside id="explorer-panel">
<p id="explorer-hint">Click a point to see its nearest neighbours{" and its audit scores" if audit else ""}.</p>
<div id="explorer-selected" hidden>
<canvas id="explorer-selected-thumb" class="thumb-large"></canvas>
<div id="explorer-selected-key"></div>
<div id="explorer-selected-label"></div>
<h2>Audit</h2>
<dl id="explorer-audit"></dl>
<h2>Nearest neighbours</h2>
<ol id="explorer-neighbours"></ol>
</div>
</aside>
</main>
<div id="explorer-tooltip" hidden>
<canvas id="explorer-thumb" class="thumb-large"></canvas>
<div id="explorer-tip-key"></div>
<div id="explorer-tip-label"></div>
</div>
<script type="application/json" id="explorer-data">{json_blob(data)}</script>
{sprite_blocks}
<script>{_JS}</script>"""
    return html_page(title, _CSS, body, meta)


def _e(text) -> str:
    return html.escape(str(text), quote=True)


_CSS = """
[hidden] { display: none !important; }
html, body { height: 100%; margin: 0; }
body { font: 14px/1.4 system-ui, sans-serif; color: #111; display: flex; flex-direction: column; }
header { padding: 8px 16px 4px; border-bottom: 1px solid #ddd; }
h1 { font-size: 18px; margin: 0 0 2px; }
h2 { font-size: 14px; margin: 12px 0 4px; border-bottom: 1px solid #ddd; }
#explorer-note { margin: 0 0 4px; color: #444; }
.controls { display: flex; gap: 6px; align-items: center; }
.controls button { min-width: 32px; }
.help { color: #666; font-size: 12px; }
.legend { list-style: none; padding: 0; margin: 4px 0 0; display: flex; flex-wrap: wrap; gap: 4px 14px; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 5px; margin-right: 5px; }
main { flex: 1; display: flex; min-height: 0; }
#explorer-canvas { flex: 1; min-width: 0; display: block; cursor: crosshair; touch-action: none; }
#explorer-panel { width: 320px; overflow-y: auto; border-left: 1px solid #ddd; padding: 8px 12px; }
.thumb-large { display: block; width: 96px; height: 96px; image-rendering: pixelated; }
#explorer-audit { display: grid; grid-template-columns: auto 1fr; gap: 2px 8px; margin: 0; }
#explorer-audit dt { color: #555; }
#explorer-audit dd { margin: 0; }
#explorer-neighbours { list-style: none; padding: 0; display: grid; grid-template-columns: repeat(2, 1fr); gap: 8px; }
#explorer-neighbours li { font-size: 12px; cursor: pointer; }
#explorer-neighbours canvas { display: block; width: 64px; height: 64px; image-rendering: pixelated; }
#explorer-tooltip { position: fixed; z-index: 10; pointer-events: none; background: #fff; border: 1px solid #999;
  border-radius: 4px; padding: 6px; box-shadow: 0 2px 8px rgba(0, 0, 0, .25); font-size: 12px; }
.wrong { color: #c00; font-weight: 600; }
"""

# The view maps a point's unit-square coordinates to CSS pixels: base (fit the square into the canvas) then zoom and pan
# (scale, tx, ty). Hover and click search a 128 x 128 grid of the unit square for the nearest point within PICK px.
_JS = """
(() => {
  const PICK = 6, MARGIN = 12, GRID = 128, CLICK_SLOP = 4;
  const data = JSON.parse(document.getElementById("explorer-data").textContent);
  const decode = (text) => {
    const raw = atob(text), out = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
    return out.buffer;
  };
  const n = data.count, k = data.k;
  const X = new Float32Array(decode(data.x)), Y = new Float32Array(decode(data.y));
  const label = new Uint16Array(decode(data.label));
  const near = new Uint32Array(decode(data.neighbours)), similarity = new Int16Array(decode(data.similarity));
  const predicted = data.predicted ? new Int16Array(decode(data.predicted)) : null;
  const audit = data.audit && {
    labelScore: new Float32Array(decode(data.audit.labelScore)), suggested: new Int16Array(decode(data.audit.suggested)),
    outlierScore: new Float32Array(decode(data.audit.outlierScore)), duplicates: data.audit.duplicates,
  };
  const $ = (id) => document.getElementById(id);
  const canvas = $("explorer-canvas"), tooltip = $("explorer-tooltip");

  const byClass = data.classes.map(() => []);
  for (let i = 0; i < n; i++) byClass[label[i]].push(i);
  const cellOf = (u) => Math.min(GRID - 1, Math.max(0, Math.floor(u * GRID)));
  const cellStart = new Int32Array(GRID * GRID + 1), cellPoints = new Int32Array(n);
  for (let i = 0; i < n; i++) cellStart[cellOf(Y[i]) * GRID + cellOf(X[i]) + 1]++;
  for (let c = 0; c < GRID * GRID; c++) cellStart[c + 1] += cellStart[c];
  const filled = cellStart.slice(0, GRID * GRID);
  for (let i = 0; i < n; i++) cellPoints[filled[cellOf(Y[i]) * GRID + cellOf(X[i])]++] = i;

  let side = 1, left = 0, top = 0, scale = 1, tx = 0, ty = 0, hovered = -1, selected = -1, drawn = 0;
  const screenX = (i) => (left + X[i] * side) * scale + tx;
  const screenY = (i) => (top + (1 - Y[i]) * side) * scale + ty;

  function layout() {
    const width = canvas.clientWidth, height = canvas.clientHeight;
    side = Math.max(1, Math.min(width, height) - 2 * MARGIN);
    left = (width - side) / 2; top = (height - side) / 2;
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * ratio); canvas.height = Math.round(height * ratio);
    draw();
  }

  function ring(context, i, radius, colour, width) {
    context.beginPath();
    context.arc(screenX(i), screenY(i), radius, 0, 2 * Math.PI);
    context.lineWidth = width; context.strokeStyle = colour; context.stroke();
  }

  function draw() {
    const context = canvas.getContext("2d");
    const width = canvas.clientWidth, height = canvas.clientHeight;
    context.setTransform(canvas.width / Math.max(1, width), 0, 0, canvas.height / Math.max(1, height), 0, 0);
    context.clearRect(0, 0, width, height);
    const r = Math.min(4, Math.max(1.2, 1.2 * Math.sqrt(scale) * Math.sqrt(side / 800) * Math.min(3, Math.sqrt(20000 / Math.max(n, 1)))));
    context.globalAlpha = 0.75;
    drawn = 0;
    byClass.forEach((members, c) => {
      context.beginPath();
      for (const i of members) {
        const x = screenX(i), y = screenY(i);
        if (x < -r || y < -r || x > width + r || y > height + r) continue;
        context.rect(x - r, y - r, 2 * r, 2 * r);
        drawn++;
      }
      context.fillStyle = data.colours[c];
      context.fill();
    });
    context.globalAlpha = 1;
    if (selected >= 0) {
      for (let j = 0; j < k; j++) if (near[selected * k + j] !== 0xFFFFFFFF) ring(context, near[selected * k + j], r + 3, "#555", 1.5);
      ring(context, selected, r + 5, "#000", 3);
    }
    if (hovered >= 0) ring(context, hovered, r + 3, "#000", 2);
  }

  function nearest(mx, my) {
    const u = ((mx - tx) / scale - left) / side, v = 1 - ((my - ty) / scale - top) / side;
    const reach = PICK / (scale * side);
    let best = -1, bestDistance = PICK * PICK;
    for (let row = cellOf(v - reach); row <= cellOf(v + reach); row++) {
      for (let column = cellOf(u - reach); column <= cellOf(u + reach); column++) {
        const cell = row * GRID + column;
        for (let p = cellStart[cell]; p < cellStart[cell + 1]; p++) {
          const i = cellPoints[p], distance = (screenX(i) - mx) ** 2 + (screenY(i) - my) ** 2;
          if (distance <= bestDistance) { best = i; bestDistance = distance; }
        }
      }
    }
    return best;
  }

  const sprites = [], waiting = [];
  function drawThumb(target, i) {
    const { width, height, columns, tile } = data.thumb;
    target.width = width; target.height = height;
    target.dataset.point = i;
    const number = Math.floor(i / tile);
    if (!sprites[number]) {
      const text = document.querySelector(`script.explorer-sprite[data-tile="${number}"]`).textContent;
      const image = new Image();
      image.addEventListener("load", () => waiting.splice(0).forEach(([canvas, point]) => drawThumb(canvas, point)));
      image.src = "data:image/jpeg;base64," + text.trim();
      sprites[number] = image;
    }
    const image = sprites[number];
    if (!image.complete) { waiting.push([target, i]); return; }
    if (Number(target.dataset.point) !== i) return;
    const place = i % tile, column = place % columns, row = Math.floor(place / columns);
    const context = target.getContext("2d");
    context.clearRect(0, 0, width, height);
    context.drawImage(image, column * width, row * height, width, height, 0, 0, width, height);
  }

  const className = (c) => (c >= 0 && c < data.classes.length ? data.classes[c] : "?");
  function labelText(i, element) {
    element.textContent = "label: " + className(label[i]);
    if (predicted) {
      const wrong = predicted[i] >= 0 && predicted[i] !== label[i];
      const span = document.createElement("span");
      span.textContent = predicted[i] >= 0 ? " · predicted: " + className(predicted[i]) : "";
      span.classList.toggle("wrong", wrong);
      element.append(span);
    }
  }

  function hover(i, clientX, clientY) {
    if (i !== hovered) {
      hovered = i;
      draw();
      if (i < 0) { tooltip.hidden = true; return; }
      $("explorer-tip-key").textContent = data.keys[i];
      labelText(i, $("explorer-tip-label"));
      drawThumb($("explorer-thumb"), i);
      tooltip.hidden = false;
    }
    if (i < 0) return;
    const box = tooltip.getBoundingClientRect();
    const x = clientX + 16 + box.width > window.innerWidth ? clientX - 16 - box.width : clientX + 16;
    const y = clientY + 16 + box.height > window.innerHeight ? clientY - 16 - box.height : clientY + 16;
    tooltip.style.left = Math.max(0, x) + "px"; tooltip.style.top = Math.max(0, y) + "px";
  }

  function auditRows(i) {
    const list = $("explorer-audit");
    list.replaceChildren();
    const add = (name, value, id) => {
      const term = document.createElement("dt"), detail = document.createElement("dd");
      term.textContent = name; detail.textContent = value; if (id) detail.id = id;
      list.append(term, detail);
    };
    if (!audit) { add("audit", "none for this feature set yet (cifar-transfer audit)", "explorer-no-audit"); return; }
    const score = audit.labelScore[i], outlier = audit.outlierScore[i];
    add("label-issue score", Number.isNaN(score) ? "-" : score.toFixed(3), "explorer-label-score");
    add("suggested label", audit.suggested[i] >= 0 ? className(audit.suggested[i]) : "-", "explorer-suggested");
    add("outlier score", Number.isNaN(outlier) ? "-" : outlier.toFixed(3), "explorer-outlier-score");
    const pairs = audit.duplicates[i] || [];
    const partners = pairs.map(([key, _, s]) => `${key} (${s.toFixed(3)})`).join(", ");
    add("near-duplicates", partners || "none", "explorer-duplicates");
  }

  function select(i) {
    selected = i;
    draw();
    $("explorer-selected").hidden = i < 0;
    $("explorer-hint").hidden = i >= 0;
    if (i < 0) return;
    drawThumb($("explorer-selected-thumb"), i);
    $("explorer-selected-key").textContent = data.keys[i];
    labelText(i, $("explorer-selected-label"));
    auditRows(i);
    const list = $("explorer-neighbours");
    list.replaceChildren();
    for (let j = 0; j < k; j++) {
      const other = near[i * k + j];
      if (other === 0xFFFFFFFF) continue;
      const item = document.createElement("li"), thumb = document.createElement("canvas"), text = document.createElement("div");
      item.dataset.point = other;
      text.textContent = `${data.keys[other]} · ${className(label[other])} · ${(similarity[i * k + j] / 10000).toFixed(3)}`;
      item.append(thumb, text);
      item.addEventListener("click", () => select(other));
      list.append(item);
      drawThumb(thumb, other);
    }
  }

  function zoomAt(factor, clientX, clientY) {
    const rect = canvas.getBoundingClientRect();
    const mx = clientX - rect.left, my = clientY - rect.top;
    const next = Math.min(400, Math.max(0.5, scale * factor));
    tx = mx - (mx - tx) * (next / scale); ty = my - (my - ty) * (next / scale);
    scale = next;
    hovered = -1; tooltip.hidden = true;
    draw();
  }
  const centre = () => { const rect = canvas.getBoundingClientRect(); return [rect.left + rect.width / 2, rect.top + rect.height / 2]; };

  let dragging = null;
  canvas.addEventListener("wheel", (event) => {
    event.preventDefault();
    zoomAt(Math.exp(-event.deltaY * 0.002), event.clientX, event.clientY);
  }, { passive: false });
  canvas.addEventListener("mousedown", (event) => { dragging = { x: event.clientX, y: event.clientY, tx, ty, moved: false }; });
  window.addEventListener("mouseup", (event) => {
    if (!dragging) return;
    const click = !dragging.moved;
    dragging = null;
    if (click && event.target === canvas) {
      const rect = canvas.getBoundingClientRect();
      select(nearest(event.clientX - rect.left, event.clientY - rect.top));
    }
  });
  canvas.addEventListener("mousemove", (event) => {
    if (dragging) {
      const dx = event.clientX - dragging.x, dy = event.clientY - dragging.y;
      if (dragging.moved || Math.abs(dx) + Math.abs(dy) > CLICK_SLOP) {
        dragging.moved = true; tx = dragging.tx + dx; ty = dragging.ty + dy;
        hover(-1); draw();
        return;
      }
    }
    const rect = canvas.getBoundingClientRect();
    hover(nearest(event.clientX - rect.left, event.clientY - rect.top), event.clientX, event.clientY);
  });
  canvas.addEventListener("mouseleave", () => hover(-1));
  $("zoom-in").addEventListener("click", () => zoomAt(2, ...centre()));
  $("zoom-out").addEventListener("click", () => zoomAt(0.5, ...centre()));
  $("zoom-reset").addEventListener("click", () => { scale = 1; tx = 0; ty = 0; draw(); });
  new ResizeObserver(layout).observe(canvas);
  layout();

  window.explorer = {
    count: n, k,
    drawn: () => drawn,
    view: () => ({ scale, tx, ty }),
    screenPosition(i) {
      const rect = canvas.getBoundingClientRect();
      return { x: rect.left + screenX(i), y: rect.top + screenY(i) };
    },
    select,
  };
})();
"""
