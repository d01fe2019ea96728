"""Benchmark: the head stage alone on a real feature set, at several train sizes, in fresh processes.

    .venv/bin/python bench/heads.py --features storage/features/mobilenetv2-224px-stages-<fingerprint> \
        [--sizes 10000,25000,50000] [--head auto] [--flip] [--baseline-checkout /tmp/old]

For each size, a feature set holding the first `size` train rows (whole shards, hard-linked) and the whole
test split is made beside the given one; each checkout's `train_head` then runs on it in its own process with
that version's default head settings (plus `--head`/`--flip`), and its wall time, peak memory (the process's
maximum resident set) and validation and test accuracy are recorded in bench/results/heads.jsonl.
`--baseline-checkout` also runs an older checkout of this repository (e.g. `git worktree add /tmp/old <commit>`)
on the same subsets, so before and after are measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_log import record  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Runs in the child: the checkout's own default head settings, with the options asked for.
CHILD = """
import json, resource, sys, time
from cifar_transfer.config import PipelineConfig
from cifar_transfer.head import train_head
storage, folder, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
settings = PipelineConfig(**options).head_settings
started = time.perf_counter()
result = train_head(storage, folder, "bench-" + str(abs(hash(json.dumps(options, sort_keys=True)))), settings, [str(n) for n in range(10)])
seconds = time.perf_counter() - started
print("RESULT " + json.dumps({"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "validation_accuracy": result.validation_accuracy, "test_accuracy": result.test_accuracy, "chosen": result.kind,
      "candidates": {c.head: c.validation_accuracy for c in result.metrics.candidates}}))
"""


def subset(features: str, rows: int, scratch: str, flip: bool) -> str:
    """A feature set of the first `rows` train rows (whole shards) and the whole test split, files hard-linked."""
    from cifar_transfer import layout
    from cifar_transfer.feature_records import Manifest, read_manifest
    from cifar_transfer.storage import Storage

    storage = Storage(str(Path(features).parent))
    folder = os.path.join(scratch, f"rows-{rows}", "features", os.path.basename(features))
    views = ["train", "test"] + (["train-flipped", "test-flipped"] if flip else [])
    for view in views:
        manifest = read_manifest(storage, features, view)
        kept, total = [], 0
        for shard in manifest.shards:
            if view.startswith("train") and total >= rows:
                break
            kept.append(shard)
            total += shard.rows
        os.makedirs(os.path.join(folder, view), exist_ok=True)
        for shard in kept:
            os.link(os.path.join(features, view, shard.file), os.path.join(folder, view, shard.file))
        trimmed = Manifest.model_validate({**manifest.model_dump(), "shards": [shard.model_dump() for shard in kept], "rows": total})
        with open(layout.manifest(folder, view), "w") as stream:
            stream.write(trimmed.model_dump_json())
    return folder


def run_child(checkout: Path, code: str, *arguments: str) -> dict:
    """`code` run by a fresh Python on `checkout`'s library; what it printed after "RESULT ", with the process's time."""
    environment = {**os.environ, "PYTHONPATH": str(checkout), "TF_CPP_MIN_LOG_LEVEL": "3"}
    started = time.perf_counter()
    finished = subprocess.run([sys.executable, "-c", code, *arguments], env=environment, capture_output=True, text=True, cwd=checkout)
    if finished.returncode:
        raise SystemExit(finished.stderr[-3000:])
    result = json.loads(next(line for line in finished.stdout.splitlines() if line.startswith("RESULT "))[7:])
    return result | {"process_seconds": round(time.perf_counter() - started, 1)}


def run_head(checkout: Path, folder: str, options: dict) -> dict:
    return run_child(checkout, CHILD, str(Path(folder).parents[1]), folder, json.dumps(options))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", required=True, help="a complete feature set folder")
    parser.add_argument("--sizes", default="10000,25000,50000", help="train rows of each subset")
    parser.add_argument("--head", default=None, help="head kind (default: each checkout's default)")
    parser.add_argument("--flip", action="store_true", help="heads use the mirrored views too")
    parser.add_argument("--baseline-checkout", default=None, help="an older checkout to measure on the same subsets")
    arguments = parser.parse_args()
    options = {"flip": arguments.flip} | ({"head": arguments.head} if arguments.head else {})
    checkouts = {"current": REPO} | ({"baseline": Path(arguments.baseline_checkout)} if arguments.baseline_checkout else {})
    with tempfile.TemporaryDirectory(dir=Path(arguments.features).parents[2]) as scratch:
        for rows in (int(size) for size in arguments.sizes.split(",")):
            folder = subset(arguments.features, rows, scratch, arguments.flip)
            for name, checkout in checkouts.items():
                result = run_head(checkout, folder, options)
                record(
                    "heads",
                    {
                        "checkout": name,
                        "train_rows": rows,
                        "features": os.path.basename(arguments.features),
                        **options,
                        **{key: round(value, 4) if isinstance(value, float) else value for key, value in result.items()},
                    },
                )


if __name__ == "__main__":
    main()
