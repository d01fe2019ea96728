"""The PNG pictures: drawn at once from threads, as the map and the head draw them in one flow run."""

from __future__ import annotations

import json
import subprocess
import sys

# Run in a fresh interpreter: what matters is matplotlib's first load, which this test process may have done already.
DRAW_AT_ONCE = """
import io, json, sys, threading
import numpy as np
from PIL import Image
from cifar_transfer.plots import confusion_figure, save_png, scatter_figure

classes = [str(number) for number in range(10)]
start = threading.Barrier(6)
sizes, failures = [], []

def draw(number):
    start.wait()  # every thread loads matplotlib and draws at the same moment
    try:
        if number % 2:
            points = np.random.default_rng(number).normal(size=(300, 2))
            figure = scatter_figure(points, np.arange(300) % 10, classes, "map")
        else:
            figure = confusion_figure(np.eye(10, dtype=int) * (number + 1), classes, "confusion")
        sizes.append(Image.open(io.BytesIO(save_png(figure))).size)
    except Exception as error:
        failures.append(repr(error))

threads = [threading.Thread(target=draw, args=(number,)) for number in range(6)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({"sizes": sizes, "failures": failures, "pyplot": "matplotlib.pyplot" in sys.modules}))
"""


def test_pictures_drawn_at_once_from_threads_never_touch_pyplot():
    """Six threads make their first pictures at the same moment in a fresh process: every one is a whole PNG, and
    pyplot, whose global state is not safe across threads, is never loaded."""
    finished = subprocess.run([sys.executable, "-c", DRAW_AT_ONCE], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    drawn = json.loads(finished.stdout.strip().splitlines()[-1])
    assert drawn["failures"] == []
    assert len(drawn["sizes"]) == 6 and all(width > 500 and height > 500 for width, height in drawn["sizes"])
    assert drawn["pyplot"] is False
