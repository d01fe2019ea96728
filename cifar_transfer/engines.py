"""Which engine and precision run the backbone, and the compiled extractors themselves.

An extractor is a callable `(uint8 images, batch_size) -> float32 features`; the
Keras model from `tasks.backbones` is the one source of truth, and OpenVINO
converts that same model, so both engines compute the same function.

`auto` picks the fastest combination this hardware runs well: TensorFlow with
mixed precision on a GPU; on a CPU, OpenVINO, in bfloat16 when the CPU has
native bf16 instructions (AVX512-BF16 / AMX) *and* the features stay within a
cosine of `BF16_MIN_COSINE` of float32 on real images of this dataset
(measured once, remembered in storage), else float32.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import io
import logging
import platform
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from typing import Protocol

import numpy as np
from pydantic import BaseModel

from cifar_transfer import layout, records
from cifar_transfer.backbones import build_extractor
from cifar_transfer.collection import CollectionDataset, collection_images, listing_of
from cifar_transfer.config import FeatureSpec, PipelineConfig, stable_hash
from cifar_transfer.dataset import DatasetInfo, shard_images
from cifar_transfer.errors import ConfigError, StorageNotWritable
from cifar_transfer.feature_records import library_versions
from cifar_transfer.native import load_tensorflow
from cifar_transfer.shard_files import features_folder
from cifar_transfer.shards import Shard
from cifar_transfer.storage import Storage

log = logging.getLogger(__name__)

BF16_MIN_COSINE = 0.9999
CALIBRATION_IMAGES = 64
_OPENVINO_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


class Extractor(Protocol):
    def __call__(self, images: np.ndarray, batch_size: int) -> np.ndarray: ...


class EngineChoice(BaseModel):
    """The engine and precision a run uses, and why (shown in logs and the report)."""

    engine: str
    precision: str
    reason: str


@functools.cache
def _cpuinfo(field: str) -> str:
    """The first `field` line of /proc/cpuinfo ("" where there is none, e.g. off Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo("flags").split())


def cpu_has_native_bf16() -> bool:
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.cache
def gpus() -> list[dict]:
    """Visible GPUs with their compute capability (empty on a CPU machine).

    Memory growth is switched on first, so several workers can share a GPU. A Linux machine without NVIDIA
    device files has nothing TensorFlow could use, so it is not loaded just to find that out (a rerun with
    nothing to compute then never imports it).
    """
    if sys.platform.startswith("linux") and not glob.glob("/dev/nvidia[0-9]*"):
        return []
    tf = load_tensorflow()
    found = []
    for device in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(device, True)
        except RuntimeError:  # the GPU is already initialised in this process
            pass
        details = tf.config.experimental.get_device_details(device)
        found.append({"name": details.get("device_name", device.name), "compute_capability": details.get("compute_capability")})
    return found


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def machine_description() -> dict:
    """What the engine choice depends on; also quoted by benchmarks."""
    return {
        "cpu": _cpu_model(),
        "cores": len(_affinity()),
        "native_bf16": cpu_has_native_bf16(),
        "gpus": gpus(),
        "openvino": _openvino_version(),
        "machine": platform.machine(),
    }


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or "unknown"


def _affinity() -> set[int]:
    import os

    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def _openvino_version() -> str | None:
    if not openvino_available():
        return None
    import openvino

    return openvino.get_version()


def candidate_choice(config: PipelineConfig) -> EngineChoice:
    """Resolve `auto` from the hardware alone; a bf16 candidate is then checked by `choose_engine`."""
    engine, precision = config.engine, config.precision
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


def choose_engine(config: PipelineConfig, dataset_md5: str, calibration_images: Callable[[], np.ndarray]) -> EngineChoice:
    """The engine and precision of this run, logged; a reduced precision must earn its place.

    When `auto` proposes bfloat16/float16, the features of `calibration_images`
    in that precision are compared with float32's; below `BF16_MIN_COSINE` the
    run falls back to float32. The verdict is stored, so reruns don't rebuild.
    """
    choice = candidate_choice(config)
    if config.precision != "auto" or choice.precision == "float32":
        log.info("engine: %s %s (%s)", choice.engine, choice.precision, choice.reason)
        return choice
    storage = Storage(config.storage)
    path = _choice_path(storage, config.feature_spec(dataset_md5, choice.engine, choice.precision))
    if storage.exists(path):
        remembered = records.ENGINE_CHOICE.load(EngineChoice, storage.read_bytes(path), storage.uri(path))
        log.info("engine: %s %s (%s; measured earlier, %s)", remembered.engine, remembered.precision, remembered.reason, storage.uri(path))
        return remembered
    reduced_spec = config.feature_spec(dataset_md5, choice.engine, choice.precision)
    calibration_images = calibration_images()
    reduced = get_extractor(reduced_spec, calibration_images.shape[1:])
    exact = float32_reference(reduced_spec, reduced, calibration_images.shape[1:])
    batch = config.resolved_batch_size  # the run's own batches: a whole 64-image batch at 224 px would be the job's peak
    cosine = float(mean_cosine(reduced(calibration_images, batch), exact(calibration_images, batch)))
    if cosine < BF16_MIN_COSINE:
        with _build_lock:  # the run will build its float32 extractor: this one's memory goes back
            _extractors.pop((reduced_spec.fingerprint, tuple(calibration_images.shape[1:])), None)
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


def float32_reference(spec: FeatureSpec, extractor: Extractor, image_shape: tuple[int, int, int]) -> Extractor:
    """Features of `spec` in float32 to check a reduced precision against: OpenVINO's own source model run by
    TensorFlow (no second conversion and compilation), else a float32 build."""
    if isinstance(extractor, OpenVINOExtractor) and extractor.source_model is not None:
        return KerasExtractor(extractor.source_model)
    return build_engine_extractor(spec.model_copy(update={"precision": "float32"}), image_shape)


def mean_cosine(features: np.ndarray, reference: np.ndarray) -> float:
    """Mean over rows of the cosine similarity; rows are scaled first, so tiny activations don't underflow."""

    def unit(rows: np.ndarray) -> np.ndarray:
        rows = rows.reshape(len(rows), -1).astype(np.float64)
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), np.finfo(np.float64).tiny)

    return float(np.mean(np.sum(unit(features) * unit(reference), axis=1)))


class KerasExtractor:
    """TensorFlow: one compiled graph per batch shape, no `predict` loop overhead."""

    def __init__(self, model):
        tf = load_tensorflow()

        self.model = model
        # No autograph: a plain call needs no source conversion, and autograph's parsing raced with another
        # thread's in CPython 3.11 once here ("SystemError: AST constructor recursion depth mismatch").
        self.forward = tf.function(lambda images: model(images, training=False), reduce_retracing=True, autograph=False)

    def __call__(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        outputs = [self.forward(images[start : start + batch_size]).numpy() for start in range(0, len(images), batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0, *self.model.output.shape[1:]), np.float32)


class OpenVINOExtractor:
    """OpenVINO on the CPU: the converted backbone compiled once, batches kept in flight on every core."""

    def __init__(self, model, precision: str, source_model=None):
        import openvino as ov

        self.compiled = ov.Core().compile_model(
            model, "CPU", {"INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[precision], "PERFORMANCE_HINT": "THROUGHPUT"}
        )
        self.requests = ov.AsyncInferQueue(self.compiled)
        self.output_shape = tuple(dimension.get_length() for dimension in self.compiled.output(0).get_partial_shape()[1:])
        self.source_model = source_model  # the float32 Keras model it was converted from, when built in this process

    def __call__(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        features = np.empty((len(images), *self.output_shape), np.float32)

        def collect(request, start: int) -> None:
            result = request.get_output_tensor(0).data
            features[start : start + len(result)] = result

        self.requests.set_callback(collect)
        for start in range(0, len(images), batch_size):
            self.requests.start_async({0: np.ascontiguousarray(images[start : start + batch_size])}, userdata=start)
        self.requests.wait_all()
        return features


def openvino_model(spec: FeatureSpec, image_shape: tuple[int, int, int], storage: Storage | None):
    """The backbone of `spec` converted to OpenVINO: read from `storage` when a run before converted it (no
    TensorFlow then: a rerun's start drops from seconds to a tenth of one), else converted from Keras and kept there.

    Kept in the feature set's folder as a zip of the IR (`model.xml`, `model.bin`) named by the input shape and the
    library versions; a damaged copy (the zip's checksums) is converted again and replaced. Returns the OpenVINO
    model and the Keras model it was converted from (None when read).
    """
    import openvino as ov

    path = layout.converted_extractor(features_folder(storage, spec), _conversion_key(image_shape)) if storage else None
    if path is not None and storage.exists(path):
        try:
            return _read_converted(storage.read_bytes(path)), None
        except (zipfile.BadZipFile, KeyError, OSError, RuntimeError) as exc:
            log.warning("converted backbone %s is damaged (%s); converting it again", storage.uri(path), exc)
    source = _keras_extractor(spec, image_shape, "float32")  # OpenVINO takes the precision when it compiles
    _mend_openvino_tensorflow_frontend()
    model = ov.convert_model(source)
    if path is not None:
        try:
            storage.write_atomic(path, _packed_converted(model))
        except (OSError, StorageNotWritable) as exc:  # a read-only storage (a predict job's): the next run converts again
            log.warning("could not keep the converted backbone at %s (%s)", storage.uri(path), exc)
    return model, source


def _mend_openvino_tensorflow_frontend() -> None:
    """On Python 3.13 OpenVINO's TensorFlow frontend fails every conversion with `NameError: name 'tensorflow' is not
    defined`: its `get_environment_setup` imports and deletes a name through two `exec` calls, and since PEP 667 each
    `exec` in a function sees its own copy of the locals. The same function without `exec` replaces it (it only
    reads the Python and TensorFlow versions)."""
    if sys.version_info < (3, 13):
        return
    from openvino.frontend.tensorflow import utils

    def get_environment_setup(framework: str) -> dict:
        setup = {"python_version": platform.python_version(), "sys_platform": sys.platform}
        if framework == "tf":
            import tensorflow

            setup["tensorflow"] = utils.get_imported_module_version(tensorflow)
        return setup

    utils.get_environment_setup = get_environment_setup


def _packed_converted(model) -> bytes:
    """The OpenVINO model's IR, weights exactly as converted (no float16 compression), as the bytes of one zip."""
    import openvino as ov

    packed = io.BytesIO()
    with tempfile.TemporaryDirectory() as scratch, zipfile.ZipFile(packed, "w") as archive:
        ov.save_model(model, f"{scratch}/{_IR_GRAPH}", compress_to_fp16=False)
        for name in (_IR_GRAPH, _IR_WEIGHTS):
            archive.write(f"{scratch}/{name}", name)
    return packed.getvalue()


def _read_converted(packed: bytes):
    """The OpenVINO model from `_packed_converted`'s bytes; a damaged zip raises (its CRCs are checked on read)."""
    import openvino as ov

    with zipfile.ZipFile(io.BytesIO(packed)) as archive:
        graph, weights = archive.read(_IR_GRAPH).decode(), archive.read(_IR_WEIGHTS)
    return ov.Core().read_model(graph, ov.Tensor(np.frombuffer(weights, np.uint8)))


_IR_GRAPH, _IR_WEIGHTS = "model.xml", "model.bin"


def _conversion_key(image_shape: tuple[int, int, int]) -> str:
    return stable_hash({"image_shape": list(image_shape), "versions": library_versions()}, 16)


_extractors: dict[tuple[str, tuple[int, ...]], Extractor] = {}
_build_lock = threading.Lock()


def built_extractors() -> list[str]:
    """Fingerprints of the extractors built in this process (so tests can see builds)."""
    return [fingerprint for fingerprint, _ in _extractors]


def release_extractors() -> None:
    """Drop this process's extractors (once its shards are done, the memory goes to t-SNE and the heads)."""
    with _build_lock:
        _extractors.clear()


def get_extractor(spec: FeatureSpec, image_shape: tuple[int, int, int], storage_url: str | None = None) -> Extractor:
    """The compiled extractor for `spec`, built on first use in this process, then reused; with `storage_url`, an
    OpenVINO backbone converted by an earlier run is read from there (see `openvino_model`)."""
    with _build_lock:
        key = (spec.fingerprint, tuple(image_shape))  # one model per input shape: an archive's 32px, a collection's S
        if key not in _extractors:
            started = time.perf_counter()
            _extractors[key] = build_engine_extractor(spec, image_shape, Storage(storage_url) if storage_url else None)
            log.info(
                "built %s at %dpx on %s %s in %.1f s",
                spec.backbone,
                spec.input_size,
                spec.engine,
                spec.precision,
                time.perf_counter() - started,
            )
        return _extractors[key]


def build_engine_extractor(spec: FeatureSpec, image_shape: tuple[int, int, int], storage: Storage | None = None) -> Extractor:
    """A new extractor for `spec` on images of `image_shape` (uncached: benchmarks build their own)."""
    if spec.engine == "openvino":
        model, source = openvino_model(spec, image_shape, storage)
        return OpenVINOExtractor(model, spec.precision, source)
    return KerasExtractor(_keras_extractor(spec, image_shape, spec.precision))


def _keras_extractor(spec: FeatureSpec, image_shape: tuple[int, int, int], precision: str):
    return build_extractor(
        spec.backbone,
        weights=spec.weights,
        input_size=spec.input_size,
        pooling=spec.pooling,
        precision=precision,
        seed=spec.seed,
        image_shape=image_shape,
    )


def choose_engine_for_dataset(config: PipelineConfig, dataset: DatasetInfo | CollectionDataset) -> EngineChoice:
    """`choose_engine`, calibrated on the first train images of the source (only listed and read when a reduced
    precision must be checked and no verdict is remembered)."""
    return choose_engine(config, dataset.id, lambda: _first_train_images(config, dataset))


def _first_train_images(config: PipelineConfig, dataset: DatasetInfo | CollectionDataset) -> np.ndarray:
    if isinstance(dataset, DatasetInfo):
        first = Shard(split="train", number=0, start=0, stop=min(CALIBRATION_IMAGES, dataset.sizes["train"]))
        return shard_images(config.storage, dataset, first)[0]
    listing = listing_of(dataset)
    first = Shard(split="train", number=0, start=0, stop=CALIBRATION_IMAGES, items=listing.splits["train"][:CALIBRATION_IMAGES])
    return collection_images(dataset, first, config.resolved_input_size).images
