"""Which engine and precision run the backbone on this machine, and why.

`auto` picks the fastest combination this hardware runs well: TensorFlow with
mixed precision on a GPU; on a CPU, OpenVINO, in bfloat16 when the CPU has
native bf16 instructions (AVX512-BF16 / AMX) *and* the features stay within a
cosine of `BF16_MIN_COSINE` of float32 on real images of this dataset
(measured once, remembered in storage), else float32.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import numpy as np
from pydantic import BaseModel

from cifar_transfer import layout, records
from cifar_transfer.backbones import get_backbone
from cifar_transfer.config import ExtractionSettings, FeatureSpec, stable_hash
from cifar_transfer.errors import ConfigError, OpConversionFailure, StorageNotWritable
from cifar_transfer.extractors import float32_reference, forget_extractor, get_extractor
from cifar_transfer.feature_records import library_versions
from cifar_transfer.hardware import cpu_has_native_bf16, gpus, machine_description, openvino_available
from cifar_transfer.sources.prepared import SourceDataset
from cifar_transfer.storage import Storage

log = logging.getLogger(__name__)

BF16_MIN_COSINE = 0.9999

CALIBRATION_IMAGES = 64


class EngineChoice(BaseModel):
    """The engine and precision a run uses, and why (shown in logs and the report)."""

    engine: str
    precision: str
    reason: str


def candidate_choice(settings: ExtractionSettings) -> EngineChoice:
    """Resolve `auto` from the hardware alone; a bf16 candidate is then checked by `choose_engine`."""
    engine, precision = settings.engine, settings.precision
    on_gpu = bool(gpus())
    if engine == "openvino" and not openvino_available():
        raise ConfigError("engine 'openvino' is not installed: pip install openvino, or pass --engine tensorflow")
    if engine == "auto":
        engine = "tensorflow" if on_gpu or not openvino_available() else "openvino"
    if precision != "auto":
        return EngineChoice(engine=engine, precision=precision, reason="chosen in the configuration")
    if on_gpu and engine == "tensorflow":
        capabilities = [gpu["compute_capability"] or (0, 0) for gpu in gpus()]
        precision = "bfloat16" if min(capabilities) >= (8, 0) else "float16"
        return EngineChoice(engine=engine, precision=precision, reason=f"GPU compute capability {min(capabilities)}")
    if cpu_has_native_bf16():
        return EngineChoice(engine=engine, precision="bfloat16", reason="CPU has native bf16")
    return EngineChoice(engine=engine, precision="float32", reason="CPU without native bf16")


def _choice_path(storage: Storage, spec: FeatureSpec) -> str:
    machine = {key: value for key, value in machine_description().items() if key != "cores"}
    key = stable_hash({"spec": spec.model_dump(exclude={"engine", "precision"}), "engine": spec.engine, "machine": machine}, 16)
    return layout.engine_choice(storage, key)


def choose_engine(
    settings: ExtractionSettings, storage_url: str, dataset_id: str, read_calibration_images: Callable[[], np.ndarray]
) -> EngineChoice:
    """The engine and precision of this run, logged; a reduced precision must earn its place.

    When `auto` proposes bfloat16/float16, the features of `read_calibration_images()`
    in that precision are compared with float32's; below `BF16_MIN_COSINE` the
    run falls back to float32. The verdict is stored, so reruns don't rebuild.
    """
    choice = candidate_choice(settings)
    if choice.engine == "openvino" and settings.engine == "auto" and get_backbone(settings.backbone).check_conversion:
        choice = _converted_or_tensorflow(settings, storage_url, dataset_id, read_calibration_images, choice)
    if settings.precision != "auto" or choice.precision == "float32":
        log.info("engine: %s %s (%s)", choice.engine, choice.precision, choice.reason)
        return choice
    storage = Storage(storage_url)
    path = _choice_path(storage, settings.feature_spec(dataset_id, choice.engine, choice.precision))
    if storage.exists(path):
        remembered = records.ENGINE_CHOICE.load(EngineChoice, storage.read_bytes(path), storage.uri(path))
        log.info("engine: %s %s (%s; measured earlier, %s)", remembered.engine, remembered.precision, remembered.reason, storage.uri(path))
        return remembered
    reduced_spec = settings.feature_spec(dataset_id, choice.engine, choice.precision)
    calibration_images = read_calibration_images()
    reduced = get_extractor(reduced_spec, calibration_images.shape[1:])
    exact = float32_reference(reduced_spec, reduced, calibration_images.shape[1:])
    batch = settings.resolved_batch_size  # the run's own batches: a whole 64-image batch at 224 px would be the job's peak
    cosine = float(mean_cosine(reduced(calibration_images, batch), exact(calibration_images, batch)))
    if cosine < BF16_MIN_COSINE:
        forget_extractor(reduced_spec, calibration_images.shape[1:])
    if cosine >= BF16_MIN_COSINE:
        choice = choice.model_copy(
            update={"reason": f"{choice.reason}; cosine to float32 {cosine:.6f} on {len(calibration_images)} images"}
        )
    else:
        choice = EngineChoice(
            engine=choice.engine,
            precision="float32",
            reason=f"{choice.precision} features were at cosine {cosine:.6f} < {BF16_MIN_COSINE} to float32 on this backbone",
        )
    storage.write_atomic(path, records.ENGINE_CHOICE.dump(choice))
    log.info("engine: %s %s (%s)", choice.engine, choice.precision, choice.reason)
    return choice


def _converted_or_tensorflow(
    settings: ExtractionSettings, storage_url: str, dataset_id: str, read_calibration_images: Callable[[], np.ndarray], choice: EngineChoice
) -> EngineChoice:
    """`choice` if OpenVINO converts this backbone, else TensorFlow, said in the log and remembered in storage.

    Asked of families whose models may hold ops OpenVINO's TensorFlow frontend lacks (a Keras Hub preset's
    bicubic or antialiased resizing: `ResizeBicubic`, `ScaleAndTranslate`). The conversion made here is the
    run's own: kept in the feature set's folder and in this process, the shards reuse it.
    """
    storage = Storage(storage_url)
    spec = settings.feature_spec(dataset_id, "openvino", "float32")
    key = stable_hash({"conversion": spec.model_dump(exclude={"engine", "precision"}), "versions": library_versions()}, 16)
    path = layout.engine_choice(storage, key)
    if storage.exists(path):
        verdict = records.ENGINE_CHOICE.load(EngineChoice, storage.read_bytes(path), storage.uri(path))
    else:
        images = read_calibration_images()
        try:
            get_extractor(spec, images.shape[1:], storage_url)
            verdict = EngineChoice(engine="openvino", precision="float32", reason="OpenVINO converts this backbone")
        except OpConversionFailure as exc:
            reason = f"OpenVINO cannot convert {spec.backbone} ({exc.operations})"
            verdict = EngineChoice(engine="tensorflow", precision="float32", reason=reason)
        with contextlib.suppress(StorageNotWritable, OSError):  # a read-only storage measures again next time
            storage.write_atomic(path, records.ENGINE_CHOICE.dump(verdict))
    if verdict.engine == "openvino":
        return choice
    log.warning("%s: TensorFlow runs it", verdict.reason)
    return EngineChoice(engine="tensorflow", precision=choice.precision, reason=f"{verdict.reason}; TensorFlow runs it")


def mean_cosine(features: np.ndarray, reference: np.ndarray) -> float:
    """Mean over rows of the cosine similarity; rows are scaled first, so tiny activations don't underflow."""

    def unit(rows: np.ndarray) -> np.ndarray:
        rows = rows.reshape(len(rows), -1).astype(np.float64)
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), np.finfo(np.float64).tiny)

    return float(np.mean(np.sum(unit(features) * unit(reference), axis=1)))


def choose_engine_for_dataset(settings: ExtractionSettings, storage_url: str, dataset: SourceDataset) -> EngineChoice:
    """`choose_engine`, calibrated on the first train images of the source (only read when a reduced precision must
    be checked and no verdict is remembered)."""
    return choose_engine(
        settings,
        storage_url,
        dataset.id,
        lambda: dataset.calibration_images(storage_url, CALIBRATION_IMAGES, settings.resolved_input_size),
    )
