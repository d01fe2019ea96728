"""Extraction throughput against the engine's ceiling, both measured in one run, interleaved (issue #25, goal 1).

    .venv/bin/python bench/throughput.py --source ../shared/data/cifar-10-python.tar.gz \
        --md5 3fa5040838d1a02829aec1f95cc5c67f \
        --mobilenet-weights ../shared/data/weights/mobilenet_v2_1.00_224_imagenet_no_top.weights.h5 \
        [--baseline-python /tmp/before/.venv/bin/python]

Two configurations: the default job (InceptionV3 at 139 px, stages pooling, `--weights none` since its ImageNet
weights cannot be downloaded here: speed does not depend on their values) and the fast stand-in (MobileNetV2 at
64 px with the shared ImageNet weights, an engine about ten times faster). Engine and precision are what `auto`
chooses on this machine.

For each configuration, one long-lived process per code version (this checkout's interpreter, and with
`--baseline-python` another checkout's, e.g. `git worktree add /tmp/before main` with its own editable venv) builds
the engine once, then answers commands one at a time, so nothing else of the benchmark runs meanwhile:
- ceiling: the bare compiled extractor (`build_engine_extractor`, same backbone, input size, precision and batch)
  over preloaded images already resized to the input size;
- pipeline: the `extract-shards` flow over the first `--images` train images into an emptied feature folder
  (plan, read, resize, inference, Parquet, hash, commit of each shard, Prefect bookkeeping), its extractor built
  beforehand as a worker keeps it.
Each round measures, per version (their order alternating between rounds), ceiling, pipeline, ceiling; the
round's ratio is the pipeline's rate over the mean of the two ceilings around it. The machine is shared, so
rounds interleave and the summary gives medians and the load average seen. Appends one JSON line to
bench/results/throughput.jsonl and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = "@@bench "  # marks the child's answers on its stdout (Prefect and the engines log there too)


def configurations(arguments: argparse.Namespace) -> dict[str, dict]:
    common = {"source": arguments.source, "md5": arguments.md5}
    return {
        "default job": {**common, "backbone": "InceptionV3", "input_size": 139, "weights": "none"},
        "fast stand-in": {**common, "backbone": "MobileNetV2", "input_size": 64, "weights": arguments.mobilenet_weights},
    }


# ---- the child: one configuration on one checkout's code ----


def serve(options: dict, images: int, ceiling_images: int) -> None:
    """Build the engine, then answer `ceiling` / `pipeline` commands from stdin until it closes."""
    from prefect import flow

    from cifar_transfer.config import load_config
    from cifar_transfer.dataset import decode_archive, shard_images
    from cifar_transfer.download import fetch_archive
    from cifar_transfer.engines import choose_engine
    from cifar_transfer.extractors import INT8_CALIBRATION_IMAGES, build_engine_extractor, get_extractor
    from cifar_transfer.flows.pipeline import extract_shards, subflow
    from cifar_transfer.shard_files import features_folder
    from cifar_transfer.shards import Shard
    from cifar_transfer.storage import Storage

    flow(name="bench-warm-up")(lambda: None)()  # this process's Prefect API starts before anything is timed
    storage = tempfile.mkdtemp(prefix="throughput-")
    config = load_config(**options, storage=storage)
    archive = fetch_archive(config.source, config.expected_md5, config.storage)
    dataset = decode_archive(config.storage, archive.path, archive.md5)
    test_images, _ = shard_images(config.storage, dataset, Shard(split="test", number=0, start=0, stop=ceiling_images))
    settings = config.extraction_settings

    def first_train_rows(count: int):  # what a run calibrates and checks a reduced precision on
        return dataset.calibration_rows(config.storage, count, settings.resolved_input_size)

    choice = choose_engine(settings, config.storage, dataset.md5, first_train_rows)
    spec = config.feature_spec(dataset.md5, choice.engine, choice.precision)
    size, batch = spec.input_size, settings.resolved_batch_size
    import tensorflow as tf

    def resized_to_input(images):
        return tf.cast(tf.round(tf.image.resize(images, (size, size))), tf.uint8).numpy()

    resized = resized_to_input(test_images)
    # int8: the ceiling's model is quantized as the run's was (same recipe, the same training images, resized first)
    calibration = (lambda: resized_to_input(first_train_rows(INT8_CALIBRATION_IMAGES)[0])) if spec.precision == "int8" else None
    bare = build_engine_extractor(spec, (size, size, 3), calibration=calibration)
    bare(resized[:batch], batch)  # compilation and first allocations

    def warm_extractor() -> None:  # built and run once, as the engine choice leaves it before the shards
        get_extractor(spec, test_images.shape[1:], config.storage)(test_images[:batch], batch)

    warm_extractor()
    subset = dataset.model_copy(update={"sizes": {"train": images}})
    folder = Path(features_folder(Storage(config.storage), spec))
    answer({"engine": choice.engine, "precision": choice.precision, "batch": batch, "fingerprint": spec.fingerprint})
    for line in sys.stdin:
        command = line.strip()
        started = time.perf_counter()
        if command == "ceiling":
            bare(resized, batch)
            answer({"images_per_second": len(resized) / (time.perf_counter() - started), "load": os.getloadavg()[0]})
        elif command == "pipeline":
            for view in ("train", "test"):
                shutil.rmtree(folder / view, ignore_errors=True)
            warm_extractor()  # the flow before released it when its shards were done
            started = time.perf_counter()
            subflow(extract_shards, config.storage, settings, spec, subset)  # as the job runs it: no heartbeat of its own
            answer({"images_per_second": images / (time.perf_counter() - started), "load": os.getloadavg()[0]})
    shutil.rmtree(storage, ignore_errors=True)


def answer(message: dict) -> None:
    print(RESULT + json.dumps(message), flush=True)


# ---- the parent ----


class Child:
    """One configuration served by one checkout's interpreter."""

    def __init__(self, python: str, options: dict, images: int, ceiling_images: int, log: Path):
        self.log = log.open("w")
        command = [python, str(Path(__file__).resolve()), "--serve", json.dumps(options), str(images), str(ceiling_images)]
        environment = {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=tempfile.gettempdir(), env=environment
        )

    def receive(self) -> dict:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT) :])
            self.log.write(line)
        raise RuntimeError(f"the benchmark's child exited ({self.process.wait()}); its log: {self.log.name}")

    def ask(self, command: str) -> dict:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.receive()

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait()
        self.log.close()


def measure(name: str, options: dict, pythons: dict[str, str], arguments: argparse.Namespace, logs: Path) -> dict:
    images = arguments.images[name]
    children = {
        version: Child(python, options, images, arguments.ceiling_images, logs / f"{name}-{version}.log")
        for version, python in pythons.items()
    }
    engines = {version: child.receive() for version, child in children.items()}  # built at the same time, measured one at a time
    rounds: dict[str, list[dict]] = {version: [] for version in pythons}
    order = list(pythons)
    for number in range(arguments.repeats):
        for version in order if number % 2 == 0 else order[::-1]:
            child = children[version]
            before, pipeline, after = child.ask("ceiling"), child.ask("pipeline"), child.ask("ceiling")
            ceiling = (before["images_per_second"] + after["images_per_second"]) / 2
            rounds[version].append(
                {
                    "ceiling": [round(before["images_per_second"], 1), round(after["images_per_second"], 1)],
                    "pipeline": round(pipeline["images_per_second"], 1),
                    "ratio": round(pipeline["images_per_second"] / ceiling, 3),
                    "load": [round(before["load"], 2), round(pipeline["load"], 2), round(after["load"], 2)],
                }
            )
            print(f"{name} {version} round {number + 1}: {json.dumps(rounds[version][-1])}", flush=True)
    for child in children.values():
        child.close()
    return {
        version: {
            "options": options,
            "images": images,
            "ceiling_images": arguments.ceiling_images,
            **engines[version],
            "rounds": rounds[version],
            "ceiling_median": round(statistics.median(rate for one in rounds[version] for rate in one["ceiling"]), 1),
            "pipeline_median": round(statistics.median(one["pipeline"] for one in rounds[version]), 1),
            "ratio_median": round(statistics.median(one["ratio"] for one in rounds[version]), 3),
            "load_median": round(statistics.median(load for one in rounds[version] for load in one["load"]), 2),
        }
        for version in pythons
    }


def markdown(results: dict) -> str:
    lines = [
        "| configuration | code | engine | ceiling img/s (median) | pipeline img/s (median) | ratio (median of rounds) "
        "| rounds' ratios | load (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, versions in results.items():
        for version, point in versions.items():
            ratios = ", ".join(str(one["ratio"]) for one in point["rounds"])
            lines.append(
                f"| {name} | {version} | {point['engine']} {point['precision']}, batch {point['batch']} | {point['ceiling_median']} | "
                f"{point['pipeline_median']} | **{point['ratio_median']}** | {ratios} | {point['load_median']} |"
            )
    return "\n".join(lines)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True)
    parser.add_argument("--md5", required=True)
    parser.add_argument("--mobilenet-weights", required=True, help="MobileNetV2 ImageNet weights (.weights.h5)")
    parser.add_argument("--baseline-python", help="another checkout's interpreter, measured interleaved with this one's")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per configuration")
    parser.add_argument("--default-images", type=int, default=4000, help="train images per pipeline run of the default job")
    parser.add_argument("--fast-images", type=int, default=10000, help="train images per pipeline run of the fast stand-in")
    parser.add_argument("--ceiling-images", type=int, default=1024, help="preloaded images per ceiling pass")
    parser.add_argument("--only", choices=["default job", "fast stand-in"], help="measure one configuration")
    arguments = parser.parse_args()
    arguments.images = {"default job": arguments.default_images, "fast stand-in": arguments.fast_images}
    return arguments


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        serve(json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    sys.path.insert(0, str(ROOT))
    from bench.results_log import record

    arguments = parse_arguments()
    for name in ("source", "mobilenet_weights"):  # the measuring processes run in another folder
        if Path(getattr(arguments, name)).exists():
            setattr(arguments, name, str(Path(getattr(arguments, name)).resolve()))
    pythons = {"this checkout": sys.executable}
    if arguments.baseline_python:
        pythons = {"baseline": arguments.baseline_python, **pythons}
    logs = Path(tempfile.mkdtemp(prefix="throughput-logs-"))
    results = {
        name: measure(name, options, pythons, arguments, logs)
        for name, options in configurations(arguments).items()
        if arguments.only in (None, name)
    }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    record("throughput", {"commit": commit, "cpu": cpu_name(), "pythons": pythons, "results": results})
    print(markdown(results))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
