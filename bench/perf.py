"""Performance benchmark: engines and precisions, pipeline vs ceiling, the whole job, the 2017 notebook's method, scaling.

    .venv/bin/python bench/perf.py --source ../shared/data/cifar-10-python.tar.gz --md5 3fa5040838d1a02829aec1f95cc5c67f

Defaults measure the job's defaults (InceptionV3 at 139px; `--weights none` because ImageNet weights cannot be
downloaded here: speed does not depend on the weights' values). Every measurement runs in a fresh process, one
after another, so ratios come from one run on one machine. Writes bench/results/perf.jsonl (one JSON line),
bench/results/perf.md (the tables) and bench/results/scaling.png. `--quick` shrinks every part for a smoke test.

- ceiling: the engine's extractor on 2,048 preloaded images already resized to the input size (no pipeline at all),
  2 passes just before the pipeline measurement and 2 just after (this machine's speed drifts by +-10% within
  minutes); both the best pass and the median are reported, and efficiency against each;
- pipeline: the `extract-shards` flow over the whole test split (read, resize, preprocess, inference, Parquet write,
  Prefect bookkeeping), with the process's extractor built beforehand as every worker keeps one;
- cosine: mean cosine similarity of the test split's features to TensorFlow float32's;
- full run: `bench/full_run.py` with the defaults (all 60,000 images, t-SNE, heads, report), then again unchanged;
- t-SNE of all 50,000 train images of the full run's features (the whole stage: read, PCA, openTSNE, quality, plot);
- notebook: the post's method (resize the split in memory, one `predict`, scikit-learn Barnes-Hut t-SNE, the conv
  head for 50 epochs), measured on subsets and extrapolated linearly (t-SNE: n log n), as printed;
- scaling: the extraction stage on 1k, 5k, 20k train images plus the full run's 60k.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_log import RESULTS, record  # noqa: E402

ENGINES = [("tensorflow", "float32"), ("tensorflow", "bfloat16"), ("openvino", "float32"), ("openvino", "bfloat16")]
CEILING_IMAGES = 2048
CEILING_PASSES_EACH_SIDE = 2


def in_fresh_process(function, *arguments):
    """Run `function` in a new interpreter: a clean extractor cache and its own peak-memory figure."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *arguments).result()


def start_prefect() -> None:
    """Start this process's ephemeral Prefect API before anything is timed."""
    from prefect import flow

    flow(name="bench-warm-up")(lambda: None)()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepared(options: dict, storage: str):
    """Config, decoded dataset and the test images of a run into `storage`."""
    from cifar_transfer.config import load_config
    from cifar_transfer.dataset import decode_archive, shard_images
    from cifar_transfer.download import fetch_archive
    from cifar_transfer.shards import Shard

    config = load_config(**options, storage=storage)
    archive = fetch_archive(config.source, config.expected_md5, config.storage)
    dataset = decode_archive(config.storage, archive.path, archive.md5)
    images, _ = shard_images(config.storage, dataset, Shard(split="test", number=0, start=0, stop=dataset.sizes["test"]))
    return config, dataset, images


def ceiling_passes(extractor, images, batch_size: int) -> list[float]:
    """Images/s of `CEILING_PASSES_EACH_SIDE` timed passes of the bare extractor over preloaded, resized images."""
    rates = []
    for _ in range(CEILING_PASSES_EACH_SIDE):
        started = time.perf_counter()
        extractor(images, batch_size)
        rates.append(len(images) / (time.perf_counter() - started))
    return rates


def engine_point(options: dict, engine: str, precision: str, storage: str, test_images: int) -> dict:
    """Ceiling and pipeline throughput of one engine and precision; the test features stay in `storage`."""
    import tensorflow as tf

    from cifar_transfer.extractors import build_engine_extractor, get_extractor
    from cifar_transfer.flows.pipeline import extract_shards, subflow

    start_prefect()
    config, dataset, images = prepared({**options, "engine": engine, "precision": precision}, storage)
    spec = config.feature_spec(dataset.md5, engine, precision)
    size = spec.input_size
    resized = tf.cast(tf.round(tf.image.resize(images[:CEILING_IMAGES], (size, size))), tf.uint8).numpy()
    bare = build_engine_extractor(spec, (size, size, 3))
    batch = config.extraction_settings.resolved_batch_size
    bare(resized[:batch], batch)  # warm-up: compilation and first allocations
    get_extractor(spec, images.shape[1:])(images[:batch], batch)
    test_only = dataset.model_copy(update={"sizes": {"test": test_images}})
    rates = ceiling_passes(bare, resized, batch)
    started = time.perf_counter()
    subflow(extract_shards, config.storage, config.extraction_settings, spec, test_only)  # as the job runs it
    pipeline = test_images / (time.perf_counter() - started)
    rates += ceiling_passes(bare, resized, batch)
    ceiling, typical = max(rates), statistics.median(rates)
    return {
        "engine": engine,
        "precision": precision,
        "ceiling_images_per_second": round(ceiling, 1),
        "ceiling_median_images_per_second": round(typical, 1),
        "ceiling_passes": [round(rate, 1) for rate in rates],
        "pipeline_images_per_second": round(pipeline, 1),
        "efficiency": round(pipeline / ceiling, 3),
        "efficiency_to_median": round(pipeline / typical, 3),
        "fingerprint": spec.fingerprint,
        "peak_rss_mib": round(peak_rss_mib()),
    }


def test_features(storage: str, fingerprint: str):
    import numpy as np
    import pyarrow.dataset as ds

    folder = next(Path(storage, "features").glob(f"*-{fingerprint}"))
    table = ds.dataset(folder / "test", format="parquet").to_table().sort_by("index")
    return np.stack(table.column("features").to_numpy(zero_copy_only=False))


def scaling_point(options: dict, storage: str, images: int) -> dict:
    """The extraction stage over the first `images` train images with the default engine, model build included."""
    from cifar_transfer.engines import choose_engine
    from cifar_transfer.flows.pipeline import extract_shards, subflow

    start_prefect()
    config, dataset, test_images = prepared(options, storage)
    choice = choose_engine(
        config.extraction_settings,
        config.storage,
        dataset.md5,
        lambda count: dataset.calibration_rows(config.storage, count, config.resolved_input_size),
    )
    spec = config.feature_spec(dataset.md5, choice.engine, choice.precision)
    started = time.perf_counter()
    subflow(extract_shards, config.storage, config.extraction_settings, spec, dataset.model_copy(update={"sizes": {"train": images}}))
    seconds = time.perf_counter() - started
    return {
        "images": images,
        "seconds": round(seconds, 1),
        "images_per_second": round(images / seconds, 1),
        "peak_rss_mib": round(peak_rss_mib()),
        "engine": f"{choice.engine} {choice.precision}",
    }


def tsne_point(storage: str, points: int) -> dict:
    """The t-SNE stage (read, PCA, openTSNE, 10-NN quality, plot, write) on `points` train images of the full run."""
    from cifar_transfer.catalogue import find_feature_set
    from cifar_transfer.config import TsneSettings
    from cifar_transfer.tsne import tsne_map

    features = find_feature_set(storage)
    started = time.perf_counter()
    result = tsne_map(
        storage, features.folder, f"bench-{points}", TsneSettings(sample=points, perplexity=30.0, seed=0, test=False), features.classes
    )
    return {
        "points": result.points,
        "seconds": round(time.perf_counter() - started, 1),
        "map_knn_accuracy": round(result.map_knn_accuracy, 4),
        "feature_knn_accuracy": round(result.feature_knn_accuracy, 4),
        "peak_rss_mib": round(peak_rss_mib()),
    }


def notebook_method(options: dict, storage: str, sample: int, tsne_sample: int, epochs_measured: int) -> dict:
    """The post's method on subsets: in-memory resize + one predict, sklearn t-SNE, the conv head; extrapolated."""
    import keras
    import numpy as np
    import tensorflow as tf
    from sklearn.manifold import TSNE

    from cifar_transfer.backbones import get_backbone
    from cifar_transfer.heads.conv import NETWORK as CONV_HEAD

    config, dataset, images = prepared(options, storage)
    backbone = get_backbone(config.backbone)
    size = config.extraction_settings.resolved_input_size
    keras.utils.set_random_seed(config.seed)
    model = backbone.build(weights="none", input_size=size, pooling="none")
    started = time.perf_counter()
    resized = backbone.preprocess_input(tf.image.resize(images[:sample].astype("float32"), (size, size)).numpy())
    resize_seconds = time.perf_counter() - started
    model.predict(resized[:32], verbose=0)
    started = time.perf_counter()
    maps = model.predict(resized, batch_size=config.extraction_settings.resolved_batch_size, verbose=0)
    predict_seconds = time.perf_counter() - started
    total_images = sum(dataset.sizes.values())
    train_images = dataset.sizes["train"]

    pooled = maps.mean(axis=(1, 2))
    points = np.concatenate([pooled] * math.ceil(tsne_sample / len(pooled)))[:tsne_sample]
    points = points + np.random.default_rng(0).normal(scale=1e-3, size=points.shape).astype("float32")
    started = time.perf_counter()
    TSNE(n_components=2, method="barnes_hut", random_state=config.seed).fit_transform(points)
    tsne_seconds = time.perf_counter() - started
    tsne_target = 25_000

    head = CONV_HEAD.build(list(maps.shape[1:]), 10, None, 1e-3)
    flat = maps.reshape(len(maps), -1)
    labels = np.random.default_rng(0).integers(0, 10, len(maps))
    head.fit(flat[:50], labels[:50], batch_size=50, epochs=1, verbose=0)
    started = time.perf_counter()
    head.fit(flat, labels, batch_size=50, epochs=epochs_measured, verbose=0)
    epoch_image_seconds = (time.perf_counter() - started) / (epochs_measured * len(flat))
    head_train_images = int(train_images * 0.8)

    extrapolated = {
        "resize_and_predict": (resize_seconds + predict_seconds) / sample * total_images,
        "tsne_25000": tsne_seconds * (tsne_target * math.log(tsne_target)) / (tsne_sample * math.log(tsne_sample)),
        "conv_head_50_epochs": epoch_image_seconds * head_train_images * 50,
    }
    return {
        "measured_on": {"images": sample, "tsne_points": tsne_sample, "head_epochs": epochs_measured},
        "measured_seconds": {"resize": round(resize_seconds, 1), "predict": round(predict_seconds, 1), "tsne": round(tsne_seconds, 1)},
        "extrapolated_seconds": {name: round(value) for name, value in extrapolated.items()},
        "extrapolated_total_seconds": round(sum(extrapolated.values())),
        "resized_train_split_gib": round(train_images * size * size * 3 * 4 / 2**30, 1),
        "peak_rss_mib_on_subset": round(peak_rss_mib()),
    }


def full_run(options: dict, storage: str) -> dict:
    """bench/full_run.py in its own process; returns the JSON line it recorded."""
    command = [sys.executable, str(ROOT / "bench" / "full_run.py"), "--storage", storage]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    with (RESULTS / "full_run.jsonl").open() as lines:
        return json.loads(lines.readlines()[-1])


def mean_cosine_to_reference(storage: str, points: list[dict]) -> None:
    from cifar_transfer.engines import mean_cosine

    reference = test_features(storage + "-tensorflow-float32", points[0]["fingerprint"])
    for point in points:
        features = test_features(f"{storage}-{point['engine']}-{point['precision']}", point["fingerprint"])
        point["cosine_to_tensorflow_float32"] = round(mean_cosine(features, reference), 6)


def scaling_picture(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(10, 4))
    images = [point["images"] for point in points]
    time_axes.plot(images, [point["seconds"] for point in points], "o-")
    time_axes.set(xlabel="images", ylabel="extraction seconds", title="time is linear in images")
    memory_axes.plot(images, [point["peak_rss_mib"] for point in points], "o-")
    memory_axes.set(xlabel="images", ylabel="peak RSS (MiB)", title="memory stays flat", ylim=(0, None))
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def markdown(result: dict) -> str:
    lines = [
        "# Performance benchmark",
        "",
        f"Machine: {json.dumps(result['machine'])}",
        "",
        "| engine | precision | ceiling img/s: best / median of 4 passes around the pipeline | pipeline img/s | "
        "efficiency: to best / to median | x TF float32 ceiling (best) | cosine to TF f32 |",
        "|---|---|---|---|---|---|---|",
    ]
    base = result["engines"][0]["ceiling_images_per_second"]
    for point in result["engines"]:
        lines.append(
            f"| {point['engine']} | {point['precision']} | {point['ceiling_images_per_second']} / "
            f"{point['ceiling_median_images_per_second']} | {point['pipeline_images_per_second']} | "
            f"{point['efficiency']} / {point['efficiency_to_median']} | "
            f"{point['pipeline_images_per_second'] / base:.2f} | {point.get('cosine_to_tensorflow_float32')} |"
        )
    full, rerun, notebook, tsne = result["full_run"], result["rerun"], result["notebook"], result["tsne_all_train"]
    lines += [
        "",
        "| whole job | value |",
        "|---|---|",
        f"| full run wall (s) | {full['seconds']['total']} |",
        f"| extraction / t-SNE / head (s) | {full['seconds']['extraction']} / {full['seconds']['tsne']} / {full['seconds']['head']} |",
        f"| engine | {full.get('engine')} |",
        f"| peak RSS (MiB) | {full['peak_rss_mib']} |",
        f"| rerun wall (s) | {rerun['seconds']['total']} |",
        f"| t-SNE of all {tsne['points']:,} train images (s) | {tsne['seconds']} (10-NN class accuracy: map "
        f"{tsne['map_knn_accuracy']:.1%}, PCA space {tsne['feature_knn_accuracy']:.1%}; peak RSS {tsne['peak_rss_mib']} MiB) |",
        f"| notebook method, extrapolated (s) | {notebook['extrapolated_total_seconds']} ({notebook['extrapolated_seconds']}) |",
        f"| notebook / pipeline | {notebook['extrapolated_total_seconds'] / full['seconds']['total']:.1f}x |",
        f"| notebook's resized train split (GiB) | {notebook['resized_train_split_gib']} |",
        "",
        "| scaling: images | seconds | images/s | peak RSS MiB |",
        "|---|---|---|---|",
    ]
    lines += [f"| {p['images']} | {p['seconds']} | {p['images_per_second']} | {p['peak_rss_mib']} |" for p in result["scaling"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--md5", required=True)
    parser.add_argument("--backbone", default="InceptionV3")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script end to end")
    arguments = parser.parse_args()
    options = {"source": arguments.source, "md5": arguments.md5, "backbone": arguments.backbone, "weights": arguments.weights}
    quick = arguments.quick
    # Each measurement's process starts its own ephemeral API; on a busy 2-core machine that takes a while.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if quick:
        options |= {"input_size": 75, "tsne_sample": 500, "epochs": 2}
    from cifar_transfer.feature_records import library_versions
    from cifar_transfer.hardware import machine_description

    result = {"options": options, "machine": machine_description() | {"versions": library_versions()}}
    with tempfile.TemporaryDirectory(prefix="perf-") as scratch:
        storage = os.path.join(scratch, "storage")
        result["engines"] = [
            in_fresh_process(engine_point, options, engine, precision, f"{storage}-{engine}-{precision}", 500 if quick else 10_000)
            for engine, precision in ENGINES
        ]
        mean_cosine_to_reference(storage, result["engines"])
        for point in result["engines"]:
            print(json.dumps(point), flush=True)
        sizes = [200, 500] if quick else [1_000, 5_000, 20_000]
        result["scaling"] = [in_fresh_process(scaling_point, options, f"{storage}-scaling-{n}", n) for n in sizes]
        full_options = {**options, **({"shard_size": 500} if quick else {})}
        result["full_run"] = full_run(full_options, f"{storage}-full")
        result["rerun"] = full_run(full_options, f"{storage}-full")
        result["tsne_all_train"] = in_fresh_process(tsne_point, f"{storage}-full", 1_000 if quick else 50_000)
        extraction = result["full_run"]["seconds"]["extraction"]
        images = sum(result["full_run"]["images"].values())
        result["scaling"].append(
            {
                "images": images,
                "seconds": extraction,
                "images_per_second": round(images / extraction, 1),
                "peak_rss_mib": result["full_run"]["peak_rss_mib"],
                "engine": result["full_run"]["engine"],
            }
        )
        result["notebook"] = in_fresh_process(
            notebook_method, options, f"{storage}-notebook", 200 if quick else 2_000, 500 if quick else 5_000, 1 if quick else 2
        )
    RESULTS.mkdir(exist_ok=True)
    scaling_picture(result["scaling"], RESULTS / "scaling.png")
    (RESULTS / "perf.md").write_text(markdown(result))
    record("perf", result)
    print(markdown(result))


if __name__ == "__main__":
    main()
