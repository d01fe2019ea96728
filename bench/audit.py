"""Benchmark: the audit on real CIFAR-10 with MobileNetV2 and the shared ImageNet weights, against injected faults.

    .venv/bin/python bench/audit.py [--train 10000] [--test 2000] [--input-size 96] [--storage /tmp/audit-bench]

A subset of the shared CIFAR-10 (the first `--train` train and `--test` test images) gets known faults in its
training images: about 1% label flips, and about 1% near-copies of other images (one edit: a crop resized back, a
shift or colour jitter; then JPEG re-encoding), a fifth of them put in the test split (leakage). It is written as an archive in the official
layout and run through the pipeline's stages as plain library calls (download, decode, engine, extraction, the head
'auto' chooses; no Prefect server, whose start alone can time out on a loaded machine), then audited. Reported against the injected
truth: precision and recall at the top of each list (as many rows as there are faults) and of what the audit flags;
side by side, on the same out-of-fold probabilities, cleanlab's `find_label_issues` (AGPL-3.0: a benchmark-only
tool, never a dependency of the package; install it with `pip install cleanlab`), and imagehash's perceptual hash
(pHash, what imagededup's hashing methods compute) over every pair of images for duplicates. Also the time of each
stage against the extraction's. Results: bench/results/audit.jsonl.

The index at scale (up to 1,000,000 vectors) has its own benchmark: `bench/audit_index.py`.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench.results_log import record  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ARCHIVE = SHARED / "cifar-10-python.tar.gz"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.00_224_imagenet_no_top.weights.h5"
BATCH_DIR = "cifar-10-batches-py"


def read_cifar() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bytes]:
    """(train images, train labels, test images, test labels) as HWC uint8, and the meta member."""
    parts: dict[str, dict] = {}
    with tarfile.open(ARCHIVE) as tar:
        for member in tar.getmembers():
            if member.isfile():
                parts[member.name.rsplit("/", 1)[-1]] = tar.extractfile(member).read()  # type: ignore[union-attr]
    batches = [pickle.loads(parts[f"data_batch_{n}"], encoding="bytes") for n in range(1, 6)]
    test = pickle.loads(parts["test_batch"], encoding="bytes")

    def images(rows: np.ndarray) -> np.ndarray:
        return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

    train_x = np.concatenate([images(batch[b"data"]) for batch in batches])
    train_y = np.concatenate([batch[b"labels"] for batch in batches])
    return train_x, train_y, images(test[b"data"]), np.array(test[b"labels"]), parts["batches.meta"]


def near_copy(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same photo edited once (a crop resized back, a shift, or colour jitter), then re-encoded as JPEG: what a
    collection gets when a photo is exported twice, cropped or edited."""
    from PIL import Image, ImageEnhance

    picture = Image.fromarray(image)
    edit = rng.integers(0, 3)
    if edit == 0:
        size = int(rng.integers(27, 31))
        left, top = rng.integers(0, 32 - size + 1, 2)
        picture = picture.crop((int(left), int(top), int(left) + size, int(top) + size)).resize((32, 32), Image.BICUBIC)
    elif edit == 1:
        shift = tuple(int(value) for value in rng.choice([-2, -1, 1, 2], 2))
        picture = Image.fromarray(np.roll(np.asarray(picture), shift, axis=(0, 1)))
    else:
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            picture = enhancer(picture).enhance(float(rng.uniform(0.85, 1.15)))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=int(rng.integers(60, 91)))
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def inject(train_x, train_y, test_x, test_y, seed: int = 0):
    """Faults in place: ~1% near-copies (a fifth into test), ~1% label flips. Returns the truth."""
    rng = np.random.default_rng(seed)
    copies = len(train_y) // 100
    order = rng.permutation(len(train_y))
    sources, targets = order[:copies], order[copies : 2 * copies]
    into_test = rng.choice(len(test_y), copies // 5, replace=False)
    pairs = []
    for number, source in enumerate(sources):
        copy = near_copy(train_x[source], rng)
        if number < len(into_test):
            test_x[into_test[number]], test_y[into_test[number]] = copy, train_y[source]
            pairs.append(frozenset({("train", int(source)), ("test", int(into_test[number]))}))
        else:
            train_x[targets[number]], train_y[targets[number]] = copy, train_y[source]
            pairs.append(frozenset({("train", int(source)), ("train", int(targets[number]))}))
    untouched = order[2 * copies :]
    flipped = rng.choice(untouched, len(train_y) // 100, replace=False)
    train_y[flipped] = (train_y[flipped] + rng.integers(1, 10, len(flipped))) % 10
    return pairs, {int(row) for row in flipped}


def write_archive(path: Path, train_x, train_y, test_x, test_y, meta: bytes) -> str:
    from conftest import batch_pickle
    from conftest import write_archive as write

    def rows(images: np.ndarray) -> np.ndarray:
        return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)

    members = {}
    for number, part in enumerate(np.array_split(np.arange(len(train_y)), 5), start=1):
        members[f"{BATCH_DIR}/data_batch_{number}"] = batch_pickle(
            rows(train_x[part]), train_y[part].tolist(), f"training batch {number} of 5"
        )
    members[f"{BATCH_DIR}/test_batch"] = batch_pickle(rows(test_x), test_y.tolist(), "testing batch 1 of 1")
    members[f"{BATCH_DIR}/batches.meta"] = meta
    return write(path, members)


def precision_recall(ranked: list, truth: set, top: int) -> dict:
    hits = sum(1 for item in ranked[:top] if item in truth)
    return {"precision": round(hits / max(min(top, len(ranked)), 1), 4), "recall": round(hits / max(len(truth), 1), 4), "rows": top}


def phash_pairs(train_x, test_x, limit: int) -> list:
    """imagehash pHash of every image, every pair's Hamming distance, the closest `limit` pairs first."""
    import imagehash
    from PIL import Image

    named = [("train", n) for n in range(len(train_x))] + [("test", n) for n in range(len(test_x))]
    hashes = np.array(
        [np.packbits(imagehash.phash(Image.fromarray(image)).hash.ravel()) for image in np.concatenate([train_x, test_x])], np.uint8
    )
    bits = np.unpackbits(hashes, axis=1).astype(np.float32)
    best: list[tuple[float, int, int]] = []
    for start in range(0, len(bits), 2048):
        block = bits[start : start + 2048]
        distance = block.sum(1)[:, None] + bits.sum(1)[None, :] - 2 * block @ bits.T  # Hamming distance
        for row in range(len(block)):
            distance[row, : start + row + 1] = np.inf  # each pair once, never itself
        flat = np.argpartition(distance.ravel(), limit)[:limit]
        best += [(float(distance.ravel()[i]), start + i // len(bits), i % len(bits)) for i in flat]
    best.sort()
    return [frozenset({named[a], named[b]}) for _, a, b in best[:limit]]


def audit_benchmark(arguments) -> None:
    import pyarrow.parquet as pq

    from cifar_transfer.audit.stage import audit_feature_set
    from cifar_transfer.commit import commit_feature_set
    from cifar_transfer.config import PipelineConfig
    from cifar_transfer.dataset import decode_archive
    from cifar_transfer.download import fetch_archive
    from cifar_transfer.engines import choose_engine_for_dataset
    from cifar_transfer.extract import extract_shard, plan_extraction
    from cifar_transfer.head import train_head

    storage = Path(arguments.storage)
    storage.mkdir(parents=True, exist_ok=True)
    train_x, train_y, test_x, test_y, meta = read_cifar()
    train_x, train_y = train_x[: arguments.train].copy(), train_y[: arguments.train].copy()
    test_x, test_y = test_x[: arguments.test].copy(), test_y[: arguments.test].copy()
    pairs, flipped = inject(train_x, train_y, test_x, test_y)
    archive = storage / "cifar-10-faulty.tar.gz"
    md5 = write_archive(archive, train_x, train_y, test_x, test_y, meta)
    config = PipelineConfig(
        source=str(archive),
        md5=md5,
        storage=str(storage / "run"),
        backbone="MobileNetV2",
        weights=str(WEIGHTS),
        input_size=arguments.input_size,
        pooling=arguments.pooling,
        tsne_sample=0,
    )
    stages: dict[str, float] = {}

    def timed(name, work):
        started = time.perf_counter()
        value = work()
        stages[name] = round(time.perf_counter() - started, 2)
        return value

    storage_url = config.storage
    fetched = timed("download", lambda: fetch_archive(config.source, config.expected_md5, storage_url))
    dataset = timed("decode", lambda: decode_archive(storage_url, fetched.path, fetched.md5))
    settings = config.extraction_settings
    engine = timed("engine", lambda: choose_engine_for_dataset(settings, storage_url, dataset))
    spec = config.feature_spec(dataset.id, engine.engine, engine.precision)
    plan = plan_extraction(storage_url, spec, dataset, settings.shard_size, settings.flip)
    shards = timed(
        "extraction",
        lambda: [extract_shard(storage_url, spec, dataset, shard, settings.resolved_batch_size) for shard in plan.to_compute],
    )
    records = [shard.record for shard in plan.reused] + [shard.record for shard in shards]
    features = commit_feature_set(storage_url, spec, records, dataset.classes)
    head = timed(
        "head",
        lambda: train_head(storage_url, features.folder, config.head_key(features.fingerprint), config.head_settings, features.classes),
    )
    started = time.perf_counter()
    result = audit_feature_set(config.storage, features, head, config.audit_settings)
    audit_seconds = time.perf_counter() - started
    duplicates = pq.read_table(result.files.duplicates).to_pandas()
    issues = pq.read_table(result.files.label_issues).to_pandas()
    ranked_pairs = [frozenset({(r.split_a, int(r.index_a)), (r.split_b, int(r.index_b))}) for r in duplicates.itertuples()]
    truth_pairs = set(pairs)
    flagged_pairs = int(duplicates["near_duplicate"].sum())
    train_issues = issues[issues["split"] == "train"]
    ranked_rows = [int(row) for row in train_issues["index"]]
    flagged_rows = [int(row) for row in train_issues[train_issues["issue"]]["index"]]

    # cleanlab on the same out-of-fold probabilities (train rows, in index order)
    by_index = train_issues.sort_values("index")
    probabilities = np.stack(by_index["probabilities"].to_numpy()).astype(np.float64)
    given = np.array([features.classes.index(name) for name in by_index["given"]])
    cleanlab_result = {}
    try:
        from cleanlab.filter import find_label_issues

        started = time.perf_counter()
        ranked = find_label_issues(given, probabilities, return_indices_ranked_by="self_confidence")
        cleanlab_seconds = time.perf_counter() - started
        ranked_cleanlab = [int(by_index["index"].iloc[i]) for i in ranked]
        from cleanlab.rank import get_label_quality_scores

        quality = get_label_quality_scores(given, probabilities)
        order = [int(by_index["index"].iloc[i]) for i in np.argsort(quality, kind="stable")]
        cleanlab_result = {
            "flagged": {**precision_recall(ranked_cleanlab, flipped, len(ranked_cleanlab))},
            "top": precision_recall(order, flipped, len(flipped)),
            "seconds": round(cleanlab_seconds, 2),
        }
    except ImportError:
        cleanlab_result = {"error": "cleanlab is not installed (pip install cleanlab): the comparison was not run"}
    started = time.perf_counter()
    phash_ranked = phash_pairs(train_x, test_x, max(len(truth_pairs) * 3, 1000))
    phash_seconds = time.perf_counter() - started
    oof_only = [int(row) for row in train_issues.sort_values("out_of_fold_probability", kind="stable")["index"]]
    feature_only = [
        frozenset({(r.split_a, int(r.index_a)), (r.split_b, int(r.index_b))})
        for r in duplicates.sort_values("feature_similarity", ascending=False, kind="stable").itertuples()
    ]
    record(
        "audit",
        {
            "benchmark": "audit on CIFAR-10 with injected faults",
            "subset": {"train": arguments.train, "test": arguments.test, "input_size": arguments.input_size, "pooling": arguments.pooling},
            "faults": {
                "near_copies": len(pairs),
                "into_test": sum(1 for p in pairs if ("test" in {s for s, _ in p})),
                "label_flips": len(flipped),
            },
            "head": result.summary.head_kinds,
            "test_accuracy": head.test_accuracy,
            "duplicates": {
                "audit_top": precision_recall(ranked_pairs, truth_pairs, len(truth_pairs)),
                "audit_flagged": precision_recall(ranked_pairs, truth_pairs, flagged_pairs),
                "features_only_top": precision_recall(feature_only, truth_pairs, len(truth_pairs)),
                "phash_top": precision_recall(phash_ranked, truth_pairs, len(truth_pairs)),
                "phash_seconds": round(phash_seconds, 2),
                "threshold": result.record.threshold,
            },
            "label_issues": {
                "audit_top": precision_recall(ranked_rows, flipped, len(flipped)),
                "audit_flagged": precision_recall(flagged_rows, flipped, len(flagged_rows)),  # the flagged set itself
                "out_of_fold_only_top": precision_recall(oof_only, flipped, len(flipped)),
                "cleanlab": cleanlab_result,
            },
            "summary": result.summary.line(),
            "seconds": {
                **stages,
                "audit_total": round(audit_seconds, 1),
                **{f"audit_{name}": value for name, value in result.summary.seconds.items()},
            },
            "out_of_fold_accuracy": result.summary.out_of_fold_accuracy,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=10_000)
    parser.add_argument("--test", type=int, default=2_000)
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--pooling", default="avg", help="the features' pooling (default avg: MobileNetV2's 1,280 features)")
    parser.add_argument("--storage", default=os.path.join(tempfile.gettempdir(), "audit-bench"))
    audit_benchmark(parser.parse_args())


if __name__ == "__main__":
    main()
