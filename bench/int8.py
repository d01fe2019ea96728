"""Benchmark: int8 (NNCF post-training quantization) against float32 and bf16: rate, feature cosine, test accuracy.

    .venv/bin/python bench/int8.py [--train 5000] [--test 1000] [--input-size 96] [--backbone MobileNetV2]

On the real CIFAR-10 archive and MobileNetV2's real ImageNet weights (../shared/data; another `--backbone` runs on
seeded weights, so its rates and cosines count and its accuracy does not), the extractor the pipeline
builds for each precision (`extractors.build_engine_extractor`; int8 calibrated on the first 300 training images,
as a run does) computes the features of the first `--train` training and `--test` test images. Each row: the
engine's rate on preloaded batches, the mean cosine of the features to float32's, and the test accuracy of
scikit-learn's standardized logistic regression (C=0.01) trained on them, and the verdict of `auto`'s check
(`engines.precision_failure`, on the training images after the calibration ones, as a run checks). bf16 is measured only where the CPU has
native bf16 (elsewhere OpenVINO emulates it and the rate means nothing). Rows go to bench/results/int8.jsonl.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_log import record  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.00_224_imagenet_no_top.weights.h5"


def cifar(split_batches: list[str], count: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    with tarfile.open(SHARED / "cifar-10-python.tar.gz") as archive:
        for name in split_batches:
            batch = pickle.load(archive.extractfile(f"cifar-10-batches-py/{name}"), encoding="bytes")
            images.append(batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[b"labels"]))
            if sum(map(len, labels)) >= count:
                break
    return np.concatenate(images)[:count].copy(), np.concatenate(labels)[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--pooling", default="stages")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--backbone", default="MobileNetV2", help="another keras.applications backbone runs on seeded weights: rates count, not accuracy"
    )
    args = parser.parse_args()

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from cifar_transfer.config import load_config
    from cifar_transfer.engines import PROBE_IMAGES, ProbeReference, mean_cosine, precision_failure
    from cifar_transfer.extractors import INT8_CALIBRATION_IMAGES, build_engine_extractor
    from cifar_transfer.hardware import cpu_has_int8_acceleration, cpu_has_native_bf16, machine_description

    train, train_labels = cifar([f"data_batch_{number}" for number in range(1, 6)], args.train)
    test, test_labels = cifar(["test_batch"], args.test)
    precisions = ["float32", "int8"] + (["bfloat16"] if cpu_has_native_bf16() else [])
    weights = str(WEIGHTS) if args.backbone == "MobileNetV2" else "none"
    rows: dict[str, dict] = {}
    reference: dict[str, np.ndarray] = {}
    probe = slice(INT8_CALIBRATION_IMAGES, INT8_CALIBRATION_IMAGES + PROBE_IMAGES)  # a run's probe: after the calibration
    probe_reference: ProbeReference | None = None
    for precision in precisions:
        spec = load_config(
            source="x",
            md5="none",
            backbone=args.backbone,
            weights=weights,
            input_size=args.input_size,
            pooling=args.pooling,
            engine="openvino",
            precision=precision,
        ).feature_spec("a" * 32)
        started = time.perf_counter()
        extractor = build_engine_extractor(spec, train.shape[1:], None, lambda: train[:INT8_CALIBRATION_IMAGES])
        built = time.perf_counter() - started
        extractor(train[: args.batch * 2], args.batch)  # warm-up
        started = time.perf_counter()
        features = {"train": extractor(train, args.batch), "test": extractor(test, args.batch)}
        seconds = time.perf_counter() - started
        flat = {split: values.reshape(len(values), -1) for split, values in features.items()}
        reference = reference or flat
        head = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=1000)).fit(flat["train"], train_labels)
        rows[precision] = {
            "images_per_second": round((len(train) + len(test)) / seconds, 1),
            "build_seconds": round(built, 1),
            "cosine_to_float32": round(mean_cosine(flat["test"], reference["test"]), 5),
            "test_accuracy": round(float(head.score(flat["test"], test_labels)), 4),
        }
        if probe_reference is None:  # float32, measured first
            probe_reference = ProbeReference.of(features["train"][probe], train_labels[probe])
        else:  # what `auto` judges a reduced precision by
            failure, measured = precision_failure(precision, features["train"][probe], probe_reference)
            rows[precision]["auto_check"] = {"passes": failure is None, "measured": measured, "failure": failure}
        print(precision, rows[precision], flush=True)
    record(
        "int8",
        {
            "backbone": f"{args.backbone} ({'ImageNet' if weights != 'none' else 'seeded'} weights)",
            "input_size": args.input_size,
            "pooling": args.pooling,
            "train": len(train),
            "test": len(test),
            "cpu": machine_description(),
            "int8_acceleration": cpu_has_int8_acceleration(),
            "precisions": rows,
            "int8_speedup": round(rows["int8"]["images_per_second"] / rows["float32"]["images_per_second"], 2),
            "int8_accuracy_delta_points": round(100 * (rows["int8"]["test_accuracy"] - rows["float32"]["test_accuracy"]), 2),
            "int8_over_bfloat16": (
                round(rows["int8"]["images_per_second"] / rows["bfloat16"]["images_per_second"], 2) if "bfloat16" in rows else None
            ),
        },
    )


if __name__ == "__main__":
    main()
