"""Benchmark: InceptionV3 extraction on every visible GPU, the pipeline on Dask with one worker per GPU, and the
whole job on one GPU.

    .venv/bin/python bench/gpu.py                  # on a CUDA machine; done in under 8 minutes
    .venv/bin/python bench/gpu.py --smoke          # anywhere, CPU included: tiny sizes, 64 images, end to end

On a GPU machine with JAX but no TensorFlow and no package index (the device tool's), `bench/device_wheels.sh`
here first, then there, with .whl/ carried:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        && PYTHONPATH=/tmp/site:. python3 bench/gpu.py

1. Kernels: one process per GPU (CUDA_VISIBLE_DEVICES pinned), all GPUs at once. For each shape (139px
   batch 256, 299px batch 32, 139px batch 64), precision (float32, float16, bfloat16) and XLA
   (jit_compile off, on), the pipeline's own extractor (`cifar_transfer.backbones.build_extractor`: uint8 32x32
   in, resize, preprocess, backbone, pooled float32 out) is compiled, warmed up, then timed on seeded
   random images fed from host memory as the pipeline feeds them; images/s per GPU and summed.
2. Pipeline: `extract_features` with --task-runner dask, one worker per GPU (pinned, see
   tasks/runners.py), on a seeded synthetic CIFAR-10 archive of --images images (nothing downloaded).
3. Pipeline ceiling: the shards flow of the job's backbone with an engine that costs nothing
   (`bench/pipeline_ceiling.py`), on this machine's CPUs: the rate above which the GPUs would wait for the pipeline.
4. Job: the whole `cifar-transfer` flow with its defaults (thread runner, engine and precision `auto`, the map, the
   head, the explorer and the report) on the same archive into fresh storage: each stage's seconds and the job over
   its extraction (issue 25 goal 2), as `bench/full_run.py` records them.

On a machine with JAX but no TensorFlow (the device tool's GPU machine: `--backend jax`, the default there), step 1
runs the same backbone on Keras' JAX backend (always compiled by XLA) and steps 2-4, whose engines and heads need
TensorFlow, are reported as skipped.

Weights are seeded random (`none`) unless --weights imagenet (Keras' download or its cache): speed does
not depend on them. Work that would not fit in --budget-seconds is skipped and reported as skipped.
Prints a Markdown table; appends one JSON line to bench/results/gpu.jsonl (gpu-smoke.jsonl with --smoke).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.results_log import record  # noqa: E402

SHAPES = [(139, 256), (299, 32), (139, 64)]  # in order of interest: what does not fit the budget is cut from the end
SMOKE_SHAPES = [(75, 32)]
PRECISIONS = ["float32", "float16", "bfloat16"]
LONGEST_KERNEL_SECONDS = 45  # one shape, precision and XLA setting: build, XLA compile, warm-up, timing


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny run that works on a CPU: 75px, 64 images (checks the script, not the GPU)"
    )
    parser.add_argument("--weights", choices=["none", "imagenet"], default="none", help="backbone weights (default: seeded random)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and images")
    parser.add_argument("--timed-seconds", type=float, default=2.0, help="timed inference per kernel setting, after warm-up")
    parser.add_argument("--images", type=int, default=10_000, help="images in the pipeline's synthetic archive (1/6 of them test)")
    parser.add_argument("--pipeline-size", type=int, default=139, help="input size of the pipeline run")
    parser.add_argument("--pipeline-batch-size", type=int, default=256, help="batch size of the pipeline run")
    parser.add_argument("--pipeline-precision", default="auto", choices=["auto", *PRECISIONS], help="precision of the pipeline run")
    parser.add_argument("--budget-seconds", type=float, default=480, help="the whole benchmark's time limit")
    parser.add_argument("--pipeline-seconds", type=float, default=80, help="the part of the budget kept for the pipeline run")
    parser.add_argument("--job-seconds", type=float, default=150, help="the part of the budget kept for the whole job")
    parser.add_argument("--ceiling-seconds", type=float, default=45, help="the part of the budget kept for the pipeline ceiling")
    parser.add_argument(
        "--backend",
        choices=["tensorflow", "jax"],
        default="tensorflow" if importlib.util.find_spec("tensorflow") else "jax",
        help="Keras backend of the kernels (default: TensorFlow where it is installed, else JAX, which times the kernels only)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: the kernel plan of one GPU's process, as JSON
    arguments = parser.parse_args()
    if arguments.smoke:
        arguments.images, arguments.pipeline_size, arguments.timed_seconds = 64, 75, 0.5
    return arguments


def kernel_plan(arguments: argparse.Namespace, stop_at: float) -> dict:
    shapes = SMOKE_SHAPES if arguments.smoke else SHAPES
    return {
        "shapes": shapes,
        "weights": arguments.weights,
        "seed": arguments.seed,
        "timed_seconds": arguments.timed_seconds,
        "stop_at": stop_at,
        "backend": arguments.backend,
    }


def run_kernels(plan: dict) -> None:
    """In one GPU's process: time every setting of the plan, one JSON line each, until `stop_at`."""
    import keras
    import numpy as np

    from cifar_transfer.backbones import build_extractor

    for size, batch in plan["shapes"]:
        images = np.random.default_rng(plan["seed"]).integers(0, 256, size=(batch, 32, 32, 3), dtype=np.uint8)
        for precision in PRECISIONS:
            model = None
            for xla in (False, True) if plan["backend"] == "tensorflow" else (True,):  # JAX always compiles with XLA
                row = {"size": size, "batch": batch, "precision": precision, "xla": xla}
                if time.time() + LONGEST_KERNEL_SECONDS > plan["stop_at"]:
                    print(json.dumps(row | {"skipped": "time budget"}), flush=True)
                    continue
                try:
                    model = model or build_extractor(
                        "InceptionV3", weights=plan["weights"], input_size=size, pooling="avg", precision=precision, seed=plan["seed"]
                    )
                    row |= measure(model, images, xla, plan["timed_seconds"])
                except Exception as error:  # e.g. out of memory at one setting: report it, measure the others
                    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                print(json.dumps(row), flush=True)
            keras.backend.clear_session()


def measure(model, images, xla: bool, timed_seconds: float) -> dict:
    """Compile time (first call) and images/s after warm-up, each batch fetched to host as the pipeline does."""
    forward = compiled(model, xla)
    started = time.perf_counter()
    forward(images)
    compile_seconds = time.perf_counter() - started
    forward(images)
    done, started = 0, time.perf_counter()
    while done < 3 or time.perf_counter() - started < timed_seconds:
        forward(images)
        done += 1
    return {
        "compile_seconds": round(compile_seconds, 1),
        "images_per_second": round(done * len(images) / (time.perf_counter() - started), 1),
    }


def compiled(model, xla: bool):
    """The model's inference on a batch, compiled on its Keras backend, its features fetched to host memory."""
    import keras
    import numpy as np

    if keras.backend.backend() == "jax":
        import jax

        weights = [[variable.value for variable in variables] for variables in (model.trainable_variables, model.non_trainable_variables)]
        call = jax.jit(lambda trainable, fixed, batch: model.stateless_call(trainable, fixed, batch, training=False)[0])
        return lambda batch: np.asarray(call(*weights, batch))
    import tensorflow as tf

    call = tf.function(lambda batch: model(batch, training=False), jit_compile=xla)
    return lambda batch: call(batch).numpy()


def gpus_of(backend: str) -> list[dict]:
    """The GPUs the kernels' backend sees: TensorFlow's (`hardware.gpus`), or JAX's in a process of their own (JAX would
    hold on to them here, beside the kernels' processes)."""
    if backend == "tensorflow":
        from cifar_transfer.hardware import gpus

        return gpus()
    if importlib.util.find_spec("jax") is None:
        sys.exit("bench/gpu.py: error: --backend jax needs JAX, which is not installed: install it, or use --backend tensorflow")
    listed = "import jax, json; print(json.dumps([d.device_kind for d in jax.devices() if d.platform == 'gpu']))"
    found = subprocess.run([sys.executable, "-c", listed], capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    return [{"name": name} for name in json.loads(found)]


def kernels_on_every_gpu(devices: list[str | None], plan: dict, kill_at: float) -> list[list[dict]]:
    """One process per GPU (or one CPU process when `devices` is [None]), all at once; their rows per device."""
    processes = []
    for device in devices:
        environment = {**os.environ, "KERAS_BACKEND": plan["backend"]} | ({} if device is None else {"CUDA_VISIBLE_DEVICES": device})
        command = [sys.executable, __file__, "--child", json.dumps(plan)]
        processes.append(subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, text=True))
    rows = []
    for process in processes:
        try:
            output, _ = process.communicate(timeout=max(kill_at - time.time(), 1))
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        rows.append([json.loads(line) for line in output.splitlines() if line.startswith("{")])
    return rows


def synthetic_archive(folder: Path, images: int, seed: int) -> tuple[Path, str]:
    """A CIFAR-10 python archive of seeded random images in the official layout: (path, md5)."""
    import numpy as np

    from cifar_transfer.cifar import CLASS_NAMES, META_MEMBER, SPLIT_MEMBERS

    rng = np.random.default_rng(seed)
    test = max(images // 6, 1)
    train_batches = np.array_split(np.arange(images - test), len(SPLIT_MEMBERS["train"]))
    sizes = dict(zip(SPLIT_MEMBERS["train"], map(len, train_batches), strict=True)) | {SPLIT_MEMBERS["test"][0]: test}
    members = {
        name: pickle.dumps(
            {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, count).tolist()}, protocol=2
        )
        for name, count in sizes.items()
    } | {META_MEMBER: pickle.dumps({b"label_names": [name.encode() for name in CLASS_NAMES]}, protocol=2)}
    path = folder / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path, hashlib.md5(path.read_bytes()).hexdigest()


def pipeline_run(arguments: argparse.Namespace, workers: int, folder: Path, archive: tuple[Path, str]) -> dict:
    """The extraction flow on Dask, one worker per GPU, into a fresh storage folder."""
    from cifar_transfer.config import load_config
    from cifar_transfer.flows.pipeline import extract_features

    path, md5 = archive
    config = load_config(
        source=str(path),
        md5=md5,
        storage=str(folder / "storage"),
        backbone="InceptionV3",
        weights=arguments.weights,
        input_size=arguments.pipeline_size,
        engine="tensorflow",
        precision=arguments.pipeline_precision,
        seed=arguments.seed,
        shard_size=max(arguments.images // (4 * workers), 16),
        batch_size=arguments.pipeline_batch_size,
        task_runner="dask",
        workers=workers,
    )
    started = time.perf_counter()
    features, stats = extract_features(config)
    return {
        "task_runner": f"dask x{workers}",
        "images": stats.images,
        "shards": stats.shards,
        "input_size": config.extraction_settings.resolved_input_size,
        "batch_size": config.batch_size,
        "precision": features.spec.precision,
        "worker_processes": len(stats.processes),
        "total_seconds": round(time.perf_counter() - started, 1),
        "shard_phase_seconds": round(stats.seconds, 1),
        "images_per_second": round(stats.images_per_second, 1),  # includes each worker's start and backbone build
    }


def ceiling_run(arguments: argparse.Namespace, archive: tuple[Path, str]) -> dict:
    """The pipeline's own ceiling: the shards flow of InceptionV3 at the pipeline's input size with an engine that
    costs nothing, in a process of its own (`bench/pipeline_ceiling.py`)."""
    from bench.heads import REPO
    from bench.pipeline_ceiling import run_child

    path, md5 = archive
    options = {"source": str(path), "md5": md5, "backbone": "InceptionV3", "weights": arguments.weights}
    options["input_size"] = arguments.pipeline_size
    measured = run_child(REPO, options, 2)
    return measured | {"images_per_second": round(max(measured["rates"]), 1)}


def job_run(arguments: argparse.Namespace, folder: Path, archive: tuple[Path, str]) -> dict:
    """The whole default job (every option at its default but the source, weights, input size and precision asked
    for) into a fresh storage folder: its stages' seconds and the job over its extraction."""
    from bench.full_run import run_job
    from cifar_transfer.config import load_config

    path, md5 = archive
    config = load_config(
        source=str(path),
        md5=md5,
        storage=str(folder / "job-storage"),
        weights=arguments.weights,
        input_size=arguments.pipeline_size,
        precision=arguments.pipeline_precision,
        seed=arguments.seed,
    )
    return run_job(config)[1]


def markdown(devices: list[dict], kernels: list[dict], pipeline: dict, ceiling: dict, job: dict) -> str:
    names = [f"GPU{number}" for number in range(len(devices))] or ["CPU"]
    lines = [
        "| input | batch | precision | XLA | " + " | ".join(f"{name} img/s" for name in names) + " | total img/s | compile s | notes |",
        "|---|---|---|---|" + "---|" * len(names) + "---|---|---|",
    ]
    for row in kernels:
        cells = [str(value) if value is not None else "-" for value in row["per_device"]]
        lines.append(
            f"| {row['size']}px | {row['batch']} | {row['precision']} | {'on' if row['xla'] else 'off'} | "
            + " | ".join(cells)
            + f" | {row['total'] or '-'} | {row['compile_seconds'] or '-'} | {'; '.join(row['notes'])} |"
        )
    if "skipped" in pipeline:
        return "\n".join([*lines, "", f"Pipeline, its ceiling and the whole job: skipped ({pipeline['skipped']})."])
    lines += [
        "",
        "| pipeline | images | precision | shard phase s | total s | img/s |",
        "|---|---|---|---|---|---|",
        f"| {pipeline['task_runner']} | {pipeline['images']} | {pipeline['precision']} | {pipeline['shard_phase_seconds']} "
        f"| {pipeline['total_seconds']} | {pipeline['images_per_second']} |",
        "",
        f"Pipeline ceiling (an engine that costs nothing, {ceiling['width']} features a row): {ceiling['images_per_second']} img/s "
        f"over {ceiling['images']} images.",
        "",
        "| whole job | engine | extraction s (img/s) | t-SNE s | head s | not extraction s | total s | job / extraction |",
        "|---|---|---|---|---|---|---|---|",
        f"| {sum(job['images'].values())} images | {job['engine']} | {job['seconds']['extraction']} "
        f"({job['extraction_images_per_second']}) | {job['seconds']['tsne']} | {job['seconds']['head']} "
        f"| {job['seconds']['not_extraction']} | {job['seconds']['total']} | {job['job_over_extraction']} |",
    ]
    return "\n".join(lines)


def merge(rows_per_device: list[list[dict]]) -> list[dict]:
    """One row per setting with every device's images/s (None where skipped or failed) and their sum."""
    merged: dict[tuple, dict] = {}
    for device, rows in enumerate(rows_per_device):
        for row in rows:
            key = (row["size"], row["batch"], row["precision"], row["xla"])
            entry = merged.setdefault(
                key,
                {
                    "size": key[0],
                    "batch": key[1],
                    "precision": key[2],
                    "xla": key[3],
                    "per_device": [None] * len(rows_per_device),
                    "compile_seconds": None,
                    "notes": [],
                },
            )
            entry["per_device"][device] = row.get("images_per_second")
            entry["compile_seconds"] = entry["compile_seconds"] or row.get("compile_seconds")
            entry["notes"] += [f"device {device}: {row[note]}" for note in ("skipped", "error") if note in row]
    for entry in merged.values():
        measured = [value for value in entry["per_device"] if value is not None]
        entry["total"] = round(sum(measured), 1) if measured else None
    return list(merged.values())


def main() -> None:
    arguments = parse_arguments()
    if arguments.child:
        run_kernels(json.loads(arguments.child))
        return
    started = time.time()
    from cifar_transfer.hardware import cuda_ids

    devices = gpus_of(arguments.backend)
    if not devices and not arguments.smoke:
        where = "run it on a CUDA machine, or pass --smoke to check it on a CPU"
        sys.exit(f"bench/gpu.py: error: no GPU visible to {arguments.backend}: {where}")
    pipeline_parts = arguments.pipeline_seconds + arguments.job_seconds + arguments.ceiling_seconds
    kernels_end = started + arguments.budget_seconds - (pipeline_parts if arguments.backend == "tensorflow" else 0)
    plan = kernel_plan(arguments, stop_at=kernels_end)
    kernels = merge(kernels_on_every_gpu(cuda_ids(len(devices)) or [None], plan, kill_at=kernels_end))
    pipeline = ceiling = job = {"skipped": "the pipeline's engines and heads need TensorFlow"}
    if arguments.backend == "tensorflow":
        from cifar_transfer.flows import temporary_api

        temporary_api.start()  # one temporary Prefect API for the pipeline and the job, as a command has (none under PREFECT_API_URL)
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
            archive = synthetic_archive(Path(scratch), arguments.images, arguments.seed)
            pipeline = pipeline_run(arguments, max(len(devices), 1), Path(scratch), archive)
            ceiling = ceiling_run(arguments, archive)
            job = job_run(arguments, Path(scratch), archive)
    print(markdown(devices, kernels, pipeline, ceiling, job))
    options = {key: value for key, value in vars(arguments).items() if key != "child"}
    record(
        "gpu-smoke" if arguments.smoke else "gpu",
        {
            "options": options,
            "devices": devices,
            "kernels": kernels,
            "pipeline": pipeline,
            "pipeline_ceiling": ceiling,
            "job": job,
            "seconds": round(time.time() - started, 1),
        },
    )


if __name__ == "__main__":
    main()
