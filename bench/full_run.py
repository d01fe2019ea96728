"""Benchmark: the whole flow on one configuration, with wall time per stage and peak memory.

    .venv/bin/python bench/full_run.py --source ../shared/data/cifar-10-python.tar.gz \
        --md5 3fa5040838d1a02829aec1f95cc5c67f --backbone MobileNetV2 \
        --weights ../shared/data/weights/mobilenet_v2_1.00_224_imagenet_no_top.weights.h5

Any `cifar-transfer run` option is accepted. Results are appended as one JSON
line to bench/results/full_run.jsonl (and printed).
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_log import record  # noqa: E402
from cifar_transfer.config import PipelineConfig, load_config  # noqa: E402
from cifar_transfer.flows.cli import build_parser  # noqa: E402
from cifar_transfer.report import RunSummary  # noqa: E402


def run_job(config: PipelineConfig) -> tuple[RunSummary, dict]:
    """The whole job, started as `cifar-transfer run` starts it, and `job_stages` of it."""
    from cifar_transfer.flows import temporary_api
    from cifar_transfer.flows.cli import load_run_modules
    from cifar_transfer.flows.pipeline import cifar_transfer

    started = time.perf_counter()
    temporary_api.start(meanwhile=load_run_modules)  # none under PREFECT_API_URL, or once one is running
    summary = cifar_transfer(config)
    return summary, job_stages(summary, time.perf_counter() - started)


def job_stages(summary: RunSummary, wall: float) -> dict:
    """What one whole job did and how long each stage took, with the job over its extraction (issue 25 goal 2)."""
    extraction, spec = summary.extraction, summary.features.spec
    return {
        "engine": f"{spec.engine} {spec.precision}",
        "head": summary.head.kind,
        "head_selection": {candidate.head: candidate.validation_accuracy for candidate in summary.head.metrics.candidates},
        "images": summary.features.splits,
        "shards_computed": f"{extraction.shards_computed}/{extraction.shards}",
        "seconds": {
            "total": round(wall, 1),
            "extraction": round(extraction.seconds, 1),
            "tsne": round(summary.tsne.seconds, 1) if summary.tsne else None,
            "head": round(summary.head.seconds, 1),
            "not_extraction": round(wall - extraction.seconds, 1),
        },
        "job_over_extraction": round(wall / extraction.seconds, 2) if extraction.seconds else None,
        "extraction_images_per_second": round(extraction.images_per_second, 1),
        "test_accuracy": summary.test_accuracy,
        "validation_accuracy": summary.head.validation_accuracy,
    }


def main() -> None:
    arguments = build_parser().parse_args(["run", *sys.argv[1:]])
    config = load_config(**{k: v for k, v in vars(arguments).items() if k not in ("command", "verbose") and v is not None})
    summary, stages = run_job(config)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "backbone": config.extraction_settings.backbone_name,
        "input_size": config.extraction_settings.resolved_input_size,
        "pooling": config.pooling,
        "weights": config.weights,
        **stages,
        "peak_rss_mib": round(peak_mib),
        "features": summary.features.folder,
    }
    record("full_run", result)


if __name__ == "__main__":
    main()
