"""The pictures people look at: the t-SNE scatter and the confusion matrix, as PNG bytes.

Figures are made with matplotlib's object API (`Figure`), never pyplot: the map and the head draw at once, in threads
of one process, and pyplot's global state is not safe across threads (`matplotlib.use` beside pyplot's first import
in another thread fails on a partially initialized `matplotlib.pyplot`).
"""

from __future__ import annotations

import io

import numpy as np


def _figure(width: float, height: float):
    """A figure of its own, drawn off screen (Agg) when saved; matplotlib is loaded on the first picture, so a run that
    draws none, such as `extract`, never pays for it."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def scatter_figure(points: np.ndarray, labels: np.ndarray, classes: list[str], title: str):
    from matplotlib import colormaps

    figure = _figure(9, 8)
    axes = figure.subplots()
    colours = colormaps["tab10"]
    for number, name in enumerate(classes):
        chosen = labels == number
        axes.scatter(points[chosen, 0], points[chosen, 1], s=2, alpha=0.6, color=colours(number), label=name, rasterized=True)
    axes.set_title(title)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(markerscale=6, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return figure


def confusion_figure(matrix: np.ndarray, classes: list[str], title: str):
    figure = _figure(8, 7)
    axes = figure.subplots()
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    for row in range(len(classes)):
        for column in range(len(classes)):
            axes.text(
                column,
                row,
                int(matrix[row, column]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if shares[row, column] > 0.5 else "black",
            )
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of the true class")
    axes.set_title(title)
    return figure
