"""Which engine and precision run the backbone on this machine, and why.

`auto` picks the fastest combination this hardware runs well: TensorFlow with
mixed precision on a GPU; on a CPU, OpenVINO in int8 when the CPU has VNNI or
AMX-INT8, else in bfloat16 when it has native bf16 (AVX512-BF16 / AMX), each
only where it is safe on `PROBE_IMAGES` real training images of this dataset
(measured once, remembered in storage), else float32. Safe means both:
- its features stay within a cosine of `MIN_COSINE` of float32's;
- a ridge head's cross-validated accuracy on its features (`ridge.probe_answers`) is not below the same head's on
  float32's by more than `MAX_ACCURACY_DROP` and the comparison's noise (`precision_failure`).
Cosine alone misses a small change that moves the classes: a feature the classes differ by, lost to rounding, costs
accuracy and hardly any cosine.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from pydantic import BaseModel

from cifar_transfer import layout, records
from cifar_transfer.backbones import get_backbone
from cifar_transfer.config import ExtractionSettings, FeatureSpec, stable_hash
from cifar_transfer.errors import ConfigError, OpConversionFailure, StorageNotWritable
from cifar_transfer.extractors import INT8_CALIBRATION_IMAGES, float32_reference, forget_extractor, get_extractor
from cifar_transfer.feature_records import library_versions
from cifar_transfer.hardware import cpu_has_int8_acceleration, cpu_has_native_bf16, gpus, machine_description, openvino_available
from cifar_transfer.heads.base import spatial_mean
from cifar_transfer.ridge import probe_answers
from cifar_transfer.sources.prepared import SourceDataset
from cifar_transfer.storage import Storage

log = logging.getLogger(__name__)

BF16_MIN_COSINE = 0.9999
INT8_MIN_COSINE = 0.99
MIN_COSINE = {"bfloat16": BF16_MIN_COSINE, "float16": BF16_MIN_COSINE, "int8": INT8_MIN_COSINE}
MAX_ACCURACY_DROP = 0.01  # of the probe's ridge accuracy, below float32's (5 of 512 images)
PROBE_IMAGES = 512  # training images a reduced precision is checked on, after int8's calibration images
CHECKS = "cosine+head"  # what a remembered verdict was judged by: one judged by less is measured again

ReadCalibrationRows = Callable[[int], tuple[np.ndarray, np.ndarray]]  # the first `count` train images and labels


class EngineChoice(BaseModel):
    """The engine and precision a run uses, and why (shown in logs and the report)."""

    engine: str
    precision: str
    reason: str


def candidate_choice(settings: ExtractionSettings) -> EngineChoice:
    """Resolve `auto` from the hardware alone: the first of `candidate_choices`."""
    return candidate_choices(settings)[0]


def candidate_choices(settings: ExtractionSettings) -> list[EngineChoice]:
    """The engine and precision to try, fastest first: the configured one alone, else what this hardware runs fast.
    Every reduced precision but the last choice (float32, or a GPU's mixed precision) is checked by `choose_engine`."""
    engine, precision = settings.engine, settings.precision
    on_gpu = bool(gpus())
    if engine == "openvino" and not openvino_available():
        raise ConfigError("engine 'openvino' is not installed: pip install openvino, or pass --engine tensorflow")
    if engine == "auto":
        engine = "tensorflow" if on_gpu or not openvino_available() else "openvino"
    if precision == "int8" and engine != "openvino":
        raise ConfigError("precision 'int8' runs on OpenVINO only: pass --engine openvino, or another --precision")
    if precision != "auto":
        return [EngineChoice(engine=engine, precision=precision, reason="chosen in the configuration")]
    if on_gpu and engine == "tensorflow":
        capabilities = [gpu["compute_capability"] or (0, 0) for gpu in gpus()]
        precision = "bfloat16" if min(capabilities) >= (8, 0) else "float16"
        return [EngineChoice(engine=engine, precision=precision, reason=f"GPU compute capability {min(capabilities)}")]
    choices = []
    if engine == "openvino" and cpu_has_int8_acceleration():
        choices.append(EngineChoice(engine=engine, precision="int8", reason="CPU has VNNI/AMX-INT8"))
    if cpu_has_native_bf16():
        choices.append(EngineChoice(engine=engine, precision="bfloat16", reason="CPU has native bf16"))
    reason = "CPU without native bf16" if not choices else "; ".join(f"no {choice.precision}" for choice in choices)
    return [*choices, EngineChoice(engine=engine, precision="float32", reason=reason)]


def _choice_path(storage: Storage, spec: FeatureSpec, candidates: list[EngineChoice]) -> str:
    machine = {key: value for key, value in machine_description().items() if key != "cores"}
    described = {
        "spec": spec.model_dump(exclude={"engine", "precision"}),
        "engine": spec.engine,
        "machine": machine,
        "candidates": [choice.precision for choice in candidates],
        "checks": CHECKS,
    }
    return layout.engine_choice(storage, stable_hash(described, 16))


def choose_engine(
    settings: ExtractionSettings, storage_url: str, dataset_id: str, read_calibration_rows: ReadCalibrationRows
) -> EngineChoice:
    """The engine and precision of this run, logged; a reduced precision must earn its place.

    When `auto` proposes int8, bfloat16 or float16, it is checked on the `PROBE_IMAGES` training images after int8's
    calibration images (`read_calibration_rows(count)`: the first `count` of the train split, and their labels) by
    `precision_failure`; one that fails gives way to the next candidate. The verdict is stored, so reruns don't
    rebuild. An int8 backbone is quantized here, once for the whole run (`_int8_extractor`).
    """
    candidates = candidate_choices(settings)
    if candidates[0].engine == "openvino" and settings.engine == "auto" and get_backbone(settings.backbone).check_conversion:
        candidates = _converted_or_tensorflow(settings, storage_url, dataset_id, read_calibration_rows, candidates)
    if settings.precision != "auto" or len(candidates) == 1:
        choice = candidates[0]
        if choice.precision == "int8":
            _int8_extractor(settings.feature_spec(dataset_id, choice.engine, choice.precision), storage_url, read_calibration_rows)
        log.info("engine: %s %s (%s)", choice.engine, choice.precision, choice.reason)
        return choice
    storage = Storage(storage_url)
    path = _choice_path(storage, settings.feature_spec(dataset_id, candidates[0].engine, candidates[0].precision), candidates)
    if storage.exists(path):
        remembered = records.ENGINE_CHOICE.load(EngineChoice, storage.read_bytes(path), storage.uri(path))
        if remembered.precision == "int8":
            _int8_extractor(settings.feature_spec(dataset_id, remembered.engine, "int8"), storage_url, read_calibration_rows)
        log.info("engine: %s %s (%s; measured earlier, %s)", remembered.engine, remembered.precision, remembered.reason, storage.uri(path))
        return remembered
    images, labels = read_calibration_rows(INT8_CALIBRATION_IMAGES + PROBE_IMAGES)
    apart = len(images) >= INT8_CALIBRATION_IMAGES + PROBE_IMAGES // 4  # else the probe is every image read
    probe = slice(INT8_CALIBRATION_IMAGES if apart else 0, None)
    probe_images, probe_labels = images[probe], labels[probe]
    batch = settings.resolved_batch_size  # the run's own batches: a whole probe at 224 px would be the job's peak
    reference: ProbeReference | None = None
    failures: list[str] = []
    for candidate in candidates[:-1]:
        reduced_spec = settings.feature_spec(dataset_id, candidate.engine, candidate.precision)
        if candidate.precision == "int8":
            reduced = _int8_extractor(reduced_spec, storage_url, lambda count: (images[:count], labels[:count]))
        else:
            reduced = get_extractor(reduced_spec, images.shape[1:])
        if reference is None:
            reference = ProbeReference.of(float32_reference(reduced_spec, reduced, images.shape[1:])(probe_images, batch), probe_labels)
        failure, measured = precision_failure(candidate.precision, reduced(probe_images, batch), reference)
        if failure is None:
            choice = candidate.model_copy(update={"reason": "; ".join([*failures, f"{candidate.reason}; {measured}"])})
            break
        forget_extractor(reduced_spec, images.shape[1:], storage_url)
        failures.append(failure)
    else:
        choice = candidates[-1].model_copy(update={"reason": "; ".join(failures) + " on this backbone"})
    storage.write_atomic(path, records.ENGINE_CHOICE.dump(choice))
    log.info("engine: %s %s (%s)", choice.engine, choice.precision, choice.reason)
    return choice


class ProbeReference(NamedTuple):
    """Float32's side of the precision check, computed once for every candidate: its features of the probe images,
    their labels, and which of them the probe's head gets right."""

    features: np.ndarray
    labels: np.ndarray
    answers: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray, labels: np.ndarray) -> ProbeReference:
        return cls(features, labels, probe_answers(spatial_mean(features, list(features.shape[1:])), labels))


def precision_failure(precision: str, features: np.ndarray, reference: ProbeReference) -> tuple[str | None, str]:
    """(Why features computed in a reduced `precision` are not safe to use, or None; what was measured), against
    float32's features of the same labelled images.

    The head's accuracy is compared pairwise, image by image: a drop counts when it is over `MAX_ACCURACY_DROP` and
    over twice its standard error (McNemar's: the images one precision's head gets right and the other's wrong).
    On weak features many answers are near ties that any rounding flips both ways: seeded InceptionV3's features
    (36% accurate) moved by 2 points between two fold draws while int8's test accuracy equalled float32's."""
    cosine = mean_cosine(features, reference.features)
    right = probe_answers(spatial_mean(features, list(features.shape[1:])), reference.labels)
    accuracy, float32_accuracy = right.mean(), reference.answers.mean()
    noise = 2 * np.sqrt(np.sum(right != reference.answers)) / len(right)
    measured = (
        f"cosine to float32 {cosine:.6f}, probe accuracy {accuracy:.2%} (float32 {float32_accuracy:.2%}, "
        f"noise {noise:.2%}) on {len(right)} images"
    )
    if cosine < MIN_COSINE[precision]:
        return f"{precision} features were at cosine {cosine:.6f} < {MIN_COSINE[precision]} to float32", measured
    if float32_accuracy - accuracy > max(MAX_ACCURACY_DROP, noise):
        failure = f"{precision} features' probe accuracy was {accuracy:.2%} against float32's {float32_accuracy:.2%}"
        return f"{failure}: over {MAX_ACCURACY_DROP:.0%} and twice the noise ({noise:.2%}) below", measured
    return None, measured


def _int8_extractor(spec: FeatureSpec, storage_url: str, read_calibration_rows: ReadCalibrationRows):
    """The run's int8 extractor, quantized on the first `INT8_CALIBRATION_IMAGES` training images and kept in storage
    (a rerun reads it back)."""
    calibration, _ = read_calibration_rows(INT8_CALIBRATION_IMAGES)
    return get_extractor(spec, calibration.shape[1:], storage_url, calibration=lambda: calibration)


def _converted_or_tensorflow(
    settings: ExtractionSettings,
    storage_url: str,
    dataset_id: str,
    read_calibration_rows: ReadCalibrationRows,
    candidates: list[EngineChoice],
) -> list[EngineChoice]:
    """`candidates` if OpenVINO converts this backbone, else the same precisions on TensorFlow (int8, OpenVINO's
    alone, left out), said in the log and remembered in storage.

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
        images, _ = read_calibration_rows(1)
        try:
            get_extractor(spec, images.shape[1:], storage_url)
            verdict = EngineChoice(engine="openvino", precision="float32", reason="OpenVINO converts this backbone")
        except OpConversionFailure as exc:
            reason = f"OpenVINO cannot convert {spec.backbone} ({exc.operations})"
            verdict = EngineChoice(engine="tensorflow", precision="float32", reason=reason)
        with contextlib.suppress(StorageNotWritable, OSError):  # a read-only storage measures again next time
            storage.write_atomic(path, records.ENGINE_CHOICE.dump(verdict))
    if verdict.engine == "openvino":
        return candidates
    if settings.precision == "int8":
        raise ConfigError(f"{verdict.reason}, and precision 'int8' runs on OpenVINO only: pass another --precision")
    log.warning("%s: TensorFlow runs it", verdict.reason)
    reason = f"{verdict.reason}; TensorFlow runs it"
    on_tensorflow = [choice for choice in candidates if choice.precision != "int8"]
    return [EngineChoice(engine="tensorflow", precision=choice.precision, reason=reason) for choice in on_tensorflow]


def mean_cosine(features: np.ndarray, reference: np.ndarray) -> float:
    """Mean over rows of the cosine similarity; rows are scaled first, so tiny activations don't underflow."""

    def unit(rows: np.ndarray) -> np.ndarray:
        rows = rows.reshape(len(rows), -1).astype(np.float64)
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), np.finfo(np.float64).tiny)

    return float(np.mean(np.sum(unit(features) * unit(reference), axis=1)))


def choose_engine_for_dataset(settings: ExtractionSettings, storage_url: str, dataset: SourceDataset) -> EngineChoice:
    """`choose_engine`, calibrated on the first train images of the source (only read when a reduced precision must
    be checked or quantized, or a conversion tried)."""
    return choose_engine(
        settings,
        storage_url,
        dataset.id,
        lambda count: dataset.calibration_rows(storage_url, count, settings.resolved_input_size),
    )
