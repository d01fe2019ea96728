"""Benchmark: an image folder of JPEG files against the archive path, and an incremental run after it grew by 1%.

    .venv/bin/python bench/folders.py --source ../shared/data/cifar-10-python.tar.gz \
        --md5 3fa5040838d1a02829aec1f95cc5c67f --images 200000 --input-size 64 \
        [--photo-width 400] [--baseline-checkout /tmp/before]

Writes a folder of `--images` JPEG files (CIFAR-10's images, repeated under new names past 60,000) in the
`ROOT/train/<class>/`, `ROOT/test/<class>/` layout, then, each in a fresh process (`cifar-transfer extract`),
one after another on this machine: the archive path on its 60,000 images, the folder's full extraction, and
the folder's incremental run after 1% more images were added. Records listing time, images/s, wall time and
peak memory to bench/results/collections.jsonl (and prints them).

`--photo-width W` writes each image as a photo is stored instead of at 32 px: upscaled to W x 3W/4 with seeded
noise (a camera's grain), JPEG quality 90, so decoding costs what a real folder's does. The folder's decoding alone
is then measured too (`sources.images.decode_into` over the first shard's worth of files, on one thread and on
every core, alternating), and `--baseline-checkout DIR` (e.g. `git worktree add DIR <commit>`) runs the folder's
full extraction with that checkout's library as well, right after this checkout's, so before and after are one run.

The runs report to a real `prefect server` started for the benchmark, as a deployment's runs do (a worker
never starts Prefect's temporary server); `--ephemeral-api` gives each run its own temporary server instead,
as a bare `cifar-transfer extract` on a machine without PREFECT_API_URL does (a few seconds more per run).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_log import record  # noqa: E402

# The command line in a process that prints its own peak memory last (the ephemeral Prefect API, a child, not counted).
CLI = [
    sys.executable,
    "-c",
    "import resource, runpy, sys\nsys.argv[0] = 'cifar-transfer'\ntry:\n"
    "    runpy.run_module('cifar_transfer.flows.cli', run_name='__main__')\nfinally:\n"
    "    print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
]


PHOTO_NOISE = 6.0  # standard deviation of the grain added to an upscaled image, in 8-bit levels
DECODE_ROUNDS = 3


def write_jpegs(job: tuple[str, list[tuple[str, int]], str, int]) -> int:
    """Write one chunk of images (the archive's `index`-th image of `split`) as JPEG files under `root`, as they are
    or, with `photo_width`, as photos (see `--photo-width`)."""
    import numpy as np
    from PIL import Image

    root, names, arrays, photo_width = job
    images = {split: np.load(f"{arrays}/{split}_images.npy", mmap_mode="r") for split in ("train", "test")}
    for name, index in names:
        split = name.split("/", 1)[0]
        path = Path(root) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(np.asarray(images[split][index]))
        if photo_width:
            image = image.resize((photo_width, photo_width * 3 // 4), Image.Resampling.BICUBIC)
            grain = np.random.default_rng(index).normal(0.0, PHOTO_NOISE, (image.height, image.width, 3))
            image = Image.fromarray(np.clip(np.asarray(image) + grain, 0, 255).astype(np.uint8))
        image.save(path, "JPEG", quality=90)
    return len(names)


def image_names(dataset, total: int, start: int = 0) -> list[tuple[str, int]]:
    """Names for images [start, start + total) of a decoded archive (`DatasetInfo`), each with its index in its
    split: five in six train, one in six test, repeating the archive's images, in a folder per class."""
    import numpy as np

    labels = {split: np.load(f"{dataset.folder}/{split}_labels.npy") for split in ("train", "test")}
    names = []
    for number in range(start, start + total):
        split = "test" if number % 6 == 5 else "train"
        index = number % dataset.sizes[split]
        names.append((f"{split}/{dataset.classes[labels[split][index]]}/{number:07d}.jpg", index))
    return names


def write_folder(root: str, arrays: str, names: list[tuple[str, int]], photo_width: int) -> float:
    started = time.perf_counter()
    chunks = [names[start : start + 5000] for start in range(0, len(names), 5000)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        sum(pool.map(write_jpegs, [(root, chunk, arrays, photo_width) for chunk in chunks]))
    return time.perf_counter() - started


def decoding_rates(root: str, names: list[tuple[str, int]], size: int) -> dict:
    """Images/s of `decode_into` over the files of the first shard's worth of names, on one thread and on every core,
    alternating for `DECODE_ROUNDS` rounds (the files read beforehand: decoding alone)."""
    import numpy as np

    from cifar_transfer.config import PipelineConfig
    from cifar_transfer.hardware import usable_cores
    from cifar_transfer.sources.images import decode_into

    encoded = [((Path(root) / name).read_bytes(), None) for name, _ in names[: PipelineConfig().shard_size]]
    pixels = np.empty((len(encoded), size, size, 3), np.uint8)
    rates: dict[str, list[float]] = {"one_thread": [], "every_core": []}
    for _ in range(DECODE_ROUNDS):
        for name, threads in (("one_thread", 1), ("every_core", usable_cores())):
            started = time.perf_counter()
            decode_into(pixels, encoded, threads=threads)
            rates[name].append(round(len(encoded) / (time.perf_counter() - started)))
    return {
        "threads": usable_cores(),
        "images": len(encoded),
        "mean_jpeg_kib": round(sum(len(data) for data, _ in encoded) / len(encoded) / 1024, 1),
        "images_per_second": rates,
    }


@contextlib.contextmanager
def prefect_server(home: str) -> Iterator[dict[str, str]]:
    """A real `prefect server` (SQLite under `home`) for the runs to report to; yields the environment that points
    a process at it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = os.environ | {"PREFECT_HOME": home}
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:  # polled: the server says when it is ready, nothing else does
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("prefect server did not start") from None
                time.sleep(0.5)
        yield environment | {"PREFECT_API_URL": api}
    finally:
        server.terminate()
        server.wait(timeout=60)


def extract(options: list[str], storage: str, environment: dict[str, str] | None, library: str | None = None) -> dict:
    """One `cifar-transfer extract` in its own process: wall time, peak memory, and the extraction's own figures;
    with `library`, another checkout's `cifar_transfer` (first on PYTHONPATH; the Prefect layer stays this one's)."""
    if library is not None:
        environment = {**(environment or os.environ), "PYTHONPATH": library}
    started = time.perf_counter()
    done = subprocess.run([*CLI, "extract", *options, "--storage", storage], capture_output=True, text=True, env=environment)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    log = done.stdout + done.stderr
    rates = re.findall(r"extraction: \d+/\d+ shards, .*?, (\d+) images/s", log)
    peak = int(re.findall(r"peak_rss_kib (\d+)", log)[-1])
    return {
        "wall_seconds": round(wall, 1),
        "peak_rss_mib": round(peak / 1024),
        "extraction_images_per_second": int(rates[-1]) if rates else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--md5", required=True)
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--backbone", default="MobileNetV2")
    parser.add_argument("--ephemeral-api", action="store_true", help="each run starts its own temporary Prefect server")
    parser.add_argument("--photo-width", type=int, default=0, help="write the images as photos this wide (0: as they are, 32 px)")
    parser.add_argument("--baseline-checkout", help="also extract the folder with this checkout's library, after this checkout's")
    arguments = parser.parse_args()
    from cifar_transfer.collection import list_collection
    from cifar_transfer.config import load_config
    from cifar_transfer.dataset import decode_archive
    from cifar_transfer.download import fetch_archive

    common = [
        "--backbone",
        arguments.backbone,
        "--weights",
        "none",
        "--input-size",
        str(arguments.input_size),
        "--engine",
        "openvino",
        "--precision",
        "float32",
    ]
    with tempfile.TemporaryDirectory(prefix="collections-bench-") as scratch, contextlib.ExitStack() as stack:
        environment = None if arguments.ephemeral_api else stack.enter_context(prefect_server(f"{scratch}/prefect"))
        archive_storage = f"{scratch}/archive-storage"
        archive = fetch_archive(arguments.source, arguments.md5, archive_storage)
        dataset = decode_archive(archive_storage, archive.path, archive.md5)
        root = f"{scratch}/photos"
        names = image_names(dataset, arguments.images)
        write_seconds = write_folder(root, dataset.folder, names, arguments.photo_width)
        decoding = decoding_rates(root, names, arguments.input_size) if arguments.photo_width else None
        settings = load_config(source=root, storage=f"{scratch}/folder-storage").collection_settings
        started = time.perf_counter()
        listed, _ = list_collection(settings)
        listing_seconds = time.perf_counter() - started

        archive_run = extract(["--source", arguments.source, "--md5", arguments.md5, *common], archive_storage, environment)
        folder_run = extract(["--source", root, *common], f"{scratch}/folder-storage", environment)
        baseline_run = None
        if arguments.baseline_checkout:
            options = ["--source", root, *common]
            baseline_run = extract(options, f"{scratch}/baseline-storage", environment, library=arguments.baseline_checkout)
        grown = image_names(dataset, arguments.images // 100, arguments.images)
        write_folder(root, dataset.folder, grown, arguments.photo_width)
        incremental_run = extract(["--source", root, *common], f"{scratch}/folder-storage", environment)
        folder_rate, archive_rate = folder_run["extraction_images_per_second"], archive_run["extraction_images_per_second"]
        record(
            "collections",
            {
                "images": arguments.images,
                "input_size": arguments.input_size,
                "backbone": f"{arguments.backbone} (seeded weights)",
                "engine": "openvino float32",
                "prefect_api": "ephemeral" if arguments.ephemeral_api else "prefect server",
                "photo_width": arguments.photo_width or None,
                "jpeg_write_seconds": round(write_seconds, 1),
                "decoding": decoding,
                "listing_seconds": round(listing_seconds, 2),
                "listed": listed.sizes,
                "archive_run": archive_run | {"images": sum(dataset.sizes.values())},
                "folder_run": folder_run,
                "baseline_folder_run": baseline_run,
                "folder_vs_archive_images_per_second": round(folder_rate / archive_rate, 3),
                "incremental_run": incremental_run | {"images_added": len(grown)},
                "incremental_vs_full_wall": round(incremental_run["wall_seconds"] / folder_run["wall_seconds"], 3),
            },
        )


if __name__ == "__main__":
    main()
