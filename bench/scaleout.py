"""Benchmark: the same shards on the thread runner, then on local Dask clusters of 1..N worker processes.

    .venv/bin/python bench/scaleout.py --source ../shared/data/cifar-10-python.tar.gz \
        --md5 3fa5040838d1a02829aec1f95cc5c67f --backbone MobileNetV2 --weights none --input-size 96 --workers 1 2

Each configuration extracts into its own fresh storage folder (so nothing is reused) in one run on
the same machine; the shard phase's wall time and images/s are appended as one JSON line to
bench/results/scaleout.jsonl (and printed). On a GPU machine, run it with as many workers as GPUs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_log import record  # noqa: E402
from cifar_transfer.config import load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for option in ("source", "md5", "backbone", "weights"):
        parser.add_argument(f"--{option}", required=option in ("source", "md5"))
    parser.add_argument("--input-size", type=int)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    arguments = parser.parse_args()
    from cifar_transfer.flows.pipeline import extract_features

    options = {k: v for k, v in vars(arguments).items() if k != "workers" and v is not None}
    runs = [("thread", {"task_runner": "thread"})] + [(f"dask x{n}", {"task_runner": "dask", "workers": n}) for n in arguments.workers]
    measured = []
    with tempfile.TemporaryDirectory(prefix="scaleout-") as scratch:
        for name, runner in runs:
            config = load_config(**options, **runner, storage=os.path.join(scratch, name.replace(" ", "")))
            started = time.perf_counter()
            _, stats = extract_features(config)
            measured.append(
                {
                    "runner": name,
                    "total_seconds": round(time.perf_counter() - started, 1),
                    "shard_phase_seconds": round(stats.seconds, 1),  # cluster start and one backbone build per worker included
                    "images_per_second": round(stats.images_per_second, 1),
                    "processes": len(stats.processes),
                }
            )
    result = {
        "options": options,
        "runs": measured,
        "speedup_vs_first_dask": {
            run["runner"]: round(measured[1]["shard_phase_seconds"] / run["shard_phase_seconds"], 2) for run in measured[1:]
        },
    }
    record("scaleout", result)


if __name__ == "__main__":
    main()
