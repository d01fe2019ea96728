"""Benchmark: the pipeline's own ceiling, the `extract-shards` flow's rate with an engine that costs nothing.

    .venv/bin/python bench/pipeline_ceiling.py --source ../shared/data/cifar-10-python.tar.gz \
        --md5 3fa5040838d1a02829aec1f95cc5c67f --photos /tmp/photos [--photo-width 400 --images 20000] \
        [--baseline-checkout /tmp/before] [--rounds 3]

An engine as fast as the pipeline feeds it shows what the pipeline itself can carry: above that rate, a faster engine
(a GPU's thousands of images a second) waits for the pipeline (issue 25: per-shard costs would set the pace). Here
the backbone (MobileNetV2, seeded weights, `--input-size`) computes one shard's features once; then every shard
gets a copy of them, at once, from a stand-in extractor, so that each shard's Parquet encoding, hashing and commit
cost what real features cost. What is timed is the rest: the plan, each shard's claim and read (the archive's rows,
or a folder's files read and decoded), the write, hash and commit, and Prefect's task runs, as `extract-features`
runs them (thread runner, task runs sized by time).

Two sources: the archive (`--source`, `--md5`) and a folder of photos (`--photos`; written first when missing, as
`bench/folders.py --photo-width` writes them, `--images` of them). Each source and checkout runs in a fresh
process (`--baseline-checkout DIR`: that checkout's library first on PYTHONPATH, this checkout's Prefect layer),
alternating, `--rounds` times each over fresh feature folders. Appends to bench/results/pipeline_ceiling.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import heads  # noqa: E402
from bench.results_log import record  # noqa: E402

# Runs in the child: the source prepared and the backbone built as a run does, then `rounds` timed shard flows.
CHILD = """
import json, shutil, sys, time
import numpy as np
from prefect import flow
from cifar_transfer.config import load_config
from cifar_transfer.extractors import ComputedFeatures, _extractors, get_extractor
from cifar_transfer.flows.pipeline import extract_shards, subflow
from cifar_transfer.shard_files import features_folder
from cifar_transfer.storage import Storage
from cifar_transfer.tasks.sources import prepare_source

options, storage, rounds = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
config = load_config(**options, storage=storage)
settings = config.extraction_settings
dataset = flow(name="bench-prepare")(prepare_source)(config)
spec = config.feature_spec(dataset.id, "tensorflow", "float32")  # any engine: it only makes the features copied
shards, _ = dataset.plan_shards(Storage(storage), features_folder(Storage(storage), spec), config.shard_size, False)
images, _ = dataset.shard_rows(storage, shards[0], spec.input_size)
key = (spec.fingerprint, tuple(images.shape[1:]))
template = get_extractor(spec, images.shape[1:], storage)(images, settings.resolved_batch_size)


class Instant:
    # The stand-in engine: one shard's real features, copied into each shard's array at once.
    def submit(self, batch, batch_size, into=None):
        shape = (len(batch), *template.shape[1:])
        features = into if into is not None and into.shape == shape else np.empty(shape, np.float32)
        features[:] = np.resize(template, shape)
        done = ComputedFeatures()
        done.engine_seconds = 0.0
        done.set_result(features)
        return done


rates = []
for _ in range(rounds):
    shutil.rmtree(features_folder(Storage(storage), spec), ignore_errors=True)
    _extractors[key] = Instant()
    started = time.perf_counter()
    subflow(extract_shards, storage, settings, spec, dataset)
    rates.append(sum(dataset.sizes.values()) / (time.perf_counter() - started))
print("RESULT " + json.dumps({"images": sum(dataset.sizes.values()), "width": int(np.prod(template.shape[1:])), "rates": rates}))
"""


def run_child(checkout: Path, options: dict, rounds: int) -> dict:
    """`CHILD` on `checkout`'s library, into a storage folder of its own."""
    with tempfile.TemporaryDirectory(prefix="ceiling-") as storage:
        return heads.run_child(checkout, CHILD, json.dumps(options), storage, str(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="the CIFAR archive")
    parser.add_argument("--md5", required=True)
    parser.add_argument("--photos", required=True, help="a folder of photos; written first when missing")
    parser.add_argument("--photo-width", type=int, default=400, help="width of the photos written (see bench/folders.py)")
    parser.add_argument("--images", type=int, default=20_000, help="photos written when the folder is missing")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--baseline-checkout", help="also run another checkout's library (git worktree add DIR <commit>)")
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    if not Path(arguments.photos).exists():
        write_photos(arguments)
    common = {"backbone": "MobileNetV2", "weights": "none", "input_size": arguments.input_size}
    sources = {"archive": {"source": arguments.source, "md5": arguments.md5}, "photos": {"source": arguments.photos}}
    checkouts = {"this checkout": heads.REPO}
    if arguments.baseline_checkout:
        checkouts["baseline"] = Path(arguments.baseline_checkout)
    for name, source in sources.items():
        order = list(checkouts.items())
        rows = {}
        for round_number in range(arguments.rounds):  # one process a round, the checkouts alternating
            for checkout, path in order if round_number % 2 == 0 else order[::-1]:
                measured = run_child(path, {**common, **source}, 1)
                rows.setdefault(checkout, {"images": measured["images"], "width": measured["width"], "rates": []})
                rows[checkout]["rates"].append(round(measured["rates"][0]))
        for checkout, row in rows.items():
            record("pipeline_ceiling", {"source": name, "checkout": checkout, "input_size": arguments.input_size, **row})


def write_photos(arguments: argparse.Namespace) -> None:
    from bench.folders import image_names, write_folder
    from cifar_transfer.dataset import decode_archive
    from cifar_transfer.download import fetch_archive

    with tempfile.TemporaryDirectory(prefix="ceiling-archive-") as storage:
        archive = fetch_archive(arguments.source, arguments.md5, storage)
        dataset = decode_archive(storage, archive.path, archive.md5)
        write_folder(arguments.photos, dataset.folder, image_names(dataset, arguments.images), arguments.photo_width)


if __name__ == "__main__":
    main()
