"""Benchmark: Keras Hub backbones at their published sizes and native input size, seeded weights, on each engine.

    .venv/bin/python bench/hub.py [--images 64] [--families dinov2 clip siglip vit]

For DINOv2 ViT-S/14, CLIP ViT-B/16, SigLIP ViT-B/16 and ViT-B/16 (`seeded_presets.PUBLISHED`: real architectures
and converters, seeded weights, as no weights can be fetched here), each in a fresh process: the extractor the
pipeline builds (uint8 images in, already at the native 224 px, so no resizing runs: a collection's images reach
the backbone so), on TensorFlow float32, OpenVINO float32 and, where the CPU has native bf16, OpenVINO bfloat16
(with its cosine to float32). Records images/s (the best of `PASSES` timed passes after a warm-up), the peak RSS
of that process, the feature width and the build time, to bench/results/hub.jsonl. `--poolings` also times DINOv2's
poolings on OpenVINO float32: one forward pass serves them all, so the choice costs width, not time.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_log import record  # noqa: E402

PASSES = 3


def point(preset: str, family: str, engine: str, precision: str, pooling: str, images: int) -> dict:
    """One engine's throughput on one preset, in this (fresh) process."""
    import numpy as np

    from cifar_transfer.config import load_config
    from cifar_transfer.engines import mean_cosine
    from cifar_transfer.extractors import build_engine_extractor

    config = load_config(backbone=f"hub:{preset}", source="/bench/none.tar.gz", md5="none", pooling=pooling)
    spec = config.feature_spec("bench", engine, precision)
    size = spec.input_size
    pixels = np.random.default_rng(0).integers(0, 256, size=(images, size, size, 3), dtype=np.uint8)
    batch = config.extraction_settings.resolved_batch_size
    started = time.perf_counter()
    extractor = build_engine_extractor(spec, (size, size, 3))
    features = extractor(pixels[:batch], batch)  # warm-up: compilation and first allocations
    built = time.perf_counter() - started
    rates = []
    for _ in range(PASSES):
        started = time.perf_counter()
        features = extractor(pixels, batch)
        rates.append(images / (time.perf_counter() - started))
    result = {
        "family": family,
        "preset": f"{family} (seeded {spec.weights_id})",
        "input_size": size,
        "pooling": pooling,
        "engine": engine,
        "precision": precision,
        "feature_width": int(np.prod(features.shape[1:])),
        "images_per_second": round(max(rates), 2),
        "passes": [round(rate, 2) for rate in rates],
        "build_seconds": round(built, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    if precision != "float32":
        reference = build_engine_extractor(spec.model_copy(update={"precision": "float32"}), (size, size, 3))
        result["cosine_to_float32"] = round(mean_cosine(features, reference(pixels, batch)), 6)
    return result


def in_fresh_process(*arguments) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(point, *arguments).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images per timed pass")
    parser.add_argument("--families", nargs="+", default=["dinov2", "clip", "siglip", "vit"])
    parser.add_argument("--poolings", action="store_true", help="also time DINOv2's avg, cls and none poolings on OpenVINO float32")
    arguments = parser.parse_args()

    from cifar_transfer.backbones.seeded_presets import PUBLISHED
    from cifar_transfer.hardware import cpu_has_native_bf16, machine_description

    engines = [("tensorflow", "float32"), ("openvino", "float32")]
    if cpu_has_native_bf16():
        engines.append(("openvino", "bfloat16"))
    else:
        print("bfloat16 not measured: this CPU has no native bf16 (AVX512-BF16 / AMX); OpenVINO would emulate it", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-hub-") as scratch:
        for family in arguments.families:
            preset = f"{scratch}/{family}"
            in_fresh_process_write(preset, family, PUBLISHED[family])
            poolings = ["stages", "avg", "cls", "none"] if arguments.poolings and family == "dinov2" else ["stages"]
            for engine, precision in engines:
                for pooling in poolings if engine == "openvino" and precision == "float32" else ["stages"]:
                    result = in_fresh_process(preset, family, engine, precision, pooling, arguments.images)
                    record("hub", {**result, "cpu": machine_description().get("cpu"), "native_bf16": cpu_has_native_bf16()})


def write(folder: str, family: str, sizes) -> str:
    from cifar_transfer.backbones.seeded_presets import write_seeded_preset

    return write_seeded_preset(folder, family, sizes)


def in_fresh_process_write(folder: str, family: str, sizes) -> str:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(write, folder, family, sizes).result()


if __name__ == "__main__":
    main()
