"""Benchmark: the head table per feature set: the default head and ridge against scikit-learn's logistic regression.

    .venv/bin/python bench/head_table.py storage/features/mobilenetv2-64px-stages-<fingerprint> [more feature sets] \
        [--heads auto,ridge] [--grid]

For each complete feature set: each head kind in `--heads` trained by `train_head` with this checkout's default
settings in a fresh process on a fresh hard-linked copy (nothing reused; `bench/heads.py`'s `run_head`), then the
baseline the default is held against: scikit-learn's `LogisticRegression(C=0.01)` on standardized features, fitted
on every train row like the refit heads, tested once (`--grid`: also C in `GRID` chosen on the heads' validation
rows, then refit on every train row). Each row goes to bench/results/heads.jsonl with the feature set's own
extraction time (its `feature_set.json`), so head time / extraction is on the same row. The baseline loads the
whole split in memory: it is a yardstick, not a head.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.heads import REPO, run_head, subset  # noqa: E402
from bench.results_log import record  # noqa: E402

BASELINE_C = 0.01
GRID = (0.001, 0.003, 0.01, 0.03, 0.1)


def logistic_baseline(features: str, grid: bool) -> dict:
    """scikit-learn's standardized logistic regression on the whole train split, its test accuracy and time."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from cifar_transfer.config import PipelineConfig
    from cifar_transfer.storage import Storage
    from cifar_transfer.store import read_split
    from cifar_transfer.streams import validation_mask

    storage = Storage(str(Path(features).parents[1]))
    (_, train_labels, train), (_, test_labels, test) = (read_split(storage, features, split) for split in ("train", "test"))

    def fitted(C: float, rows):
        return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000)).fit(train[rows], train_labels[rows])

    started = time.perf_counter()
    result = {"baseline_test_accuracy": fitted(BASELINE_C, slice(None)).score(test, test_labels)}
    result["baseline_seconds"] = time.perf_counter() - started
    if grid:
        settings = PipelineConfig().head_settings
        held_out = validation_mask(len(train_labels), settings.validation_split, settings.seed)
        scores = {C: fitted(C, ~held_out).score(train[held_out], train_labels[held_out]) for C in GRID}
        best = max(scores, key=scores.get)
        result |= {"grid_validation": scores, "grid_C": best, "grid_test_accuracy": fitted(best, slice(None)).score(test, test_labels)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("features", nargs="+", help="complete feature set folders")
    parser.add_argument("--heads", default="auto,ridge", help="head kinds to train, comma-separated (default: the default and ridge)")
    parser.add_argument("--grid", action="store_true", help=f"also the baseline with C in {GRID} chosen on validation (slow)")
    arguments = parser.parse_args()
    for features in arguments.features:
        extraction = json.loads((Path(features) / "feature_set.json").read_text())["extraction"]
        row = {"table": "heads per feature set", "features": os.path.basename(features), "extraction_seconds": extraction["seconds"]}
        with tempfile.TemporaryDirectory(dir=Path(features).parents[2]) as scratch:
            folder = subset(features, 10**9, scratch, flip=False)  # every train row: a fresh copy, so nothing stored is reused
            for kind in arguments.heads.split(","):
                result = run_head(REPO, folder, {"head": kind})
                row[kind] = {name: result[name] for name in ("chosen", "seconds", "validation_accuracy", "test_accuracy", "peak_rss_mib")}
                row[kind]["head_per_extraction"] = result["seconds"] / extraction["seconds"]
        row |= logistic_baseline(features, arguments.grid)
        record("heads", json.loads(json.dumps(row), parse_float=lambda text: round(float(text), 4)))


if __name__ == "__main__":
    main()
