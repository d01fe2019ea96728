"""The compiled extractors: a callable `(uint8 images, batch_size) -> float32 features` per engine, built once per
process and input shape.

The Keras model from `backbones` is the one source of truth, and OpenVINO converts that same model (kept in the
feature set's folder, so later runs and workers skip TensorFlow), so both engines compute the same function.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import platform
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

import numpy as np

from cifar_transfer import layout
from cifar_transfer.backbones import build_extractor
from cifar_transfer.config import FeatureSpec, stable_hash
from cifar_transfer.errors import FeatureSetError, OpConversionFailure, StorageNotWritable
from cifar_transfer.feature_records import library_versions
from cifar_transfer.native import compiled_forward
from cifar_transfer.resize_graph import PRODUCT_PRECISIONS, RESIZE_NODES, resize_as_matmuls
from cifar_transfer.shard_files import features_folder
from cifar_transfer.storage import Storage

log = logging.getLogger(__name__)

# int8: the quantized layers run in int8 whatever the hint; the layers NNCF leaves alone stay in float32.
_OPENVINO_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int8": "f32"}

INT8_CALIBRATION_IMAGES = 300  # NNCF's default subset: activation ranges settle well before it
# Calibration images per NNCF statistics step. Seeded InceptionV3 139 px, one image a step: 7.4 s, cosine to float32
# 0.99961, probe accuracy 34.57% (float32 36.52%); 20 a step: 5.2 s, 0.99982, 36.72%. ImageNet MobileNetV2 64 px:
# 4.0 s and 0.925 against 2.3 s and 0.951 (refused by `auto` either way).
INT8_CALIBRATION_BATCH = 20
IN_FLIGHT_BATCHES = 4  # TensorFlow batches handed to the device before the first of them is read back


class ComputedFeatures(Future[np.ndarray]):
    """A shard's features to come; once they are there, `engine_seconds` is the engine's time on them alone (from
    their submission, or the end of the shard queued before them, to their last batch), whichever run or thread
    submitted the shards around them."""

    engine_seconds = 0.0


class Extractor(Protocol):
    """`submit` queues a shard's batches behind those already submitted (waiting only for free requests) and returns
    its features' future, so the engine goes from one shard to the next without draining; calling it waits for the
    features. `into` is an array the caller is done with, which the engine may fill rather than a new one: memory
    touched before costs far less than new memory (on a VM that hands freed memory back, 4-12 s a GiB)."""

    def __call__(self, images: np.ndarray, batch_size: int) -> np.ndarray: ...

    def submit(self, images: np.ndarray, batch_size: int, into: np.ndarray | None = None) -> ComputedFeatures: ...


class KerasExtractor:
    """TensorFlow: one compiled graph for every batch, no `predict` loop overhead."""

    def __init__(self, model):
        self.model = model
        self.forward = compiled_forward(model)
        self._computing = threading.Lock()  # one shard at a time: TensorFlow already spreads each batch over every core

    def __call__(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        """Each batch's features, read back `IN_FLIGHT_BATCHES` batches after it was handed over: on a GPU TensorFlow
        runs a call's kernels after the call returns, until `.numpy()` waits for them, so the device computes the next
        batches while the host reads one back (on a CPU a call has computed its batch when it returns)."""
        handed: deque = deque()
        outputs = []
        for start in range(0, len(images), batch_size):
            handed.append(self.forward(images[start : start + batch_size]))
            if len(handed) > IN_FLIGHT_BATCHES:
                outputs.append(handed.popleft().numpy())
        outputs += [features.numpy() for features in handed]
        return np.concatenate(outputs) if outputs else np.zeros((0, *self.model.output.shape[1:]), np.float32)

    def submit(self, images: np.ndarray, batch_size: int, into: np.ndarray | None = None) -> ComputedFeatures:
        """TensorFlow runs a batch at a time on every core, so there is nothing to keep in flight: computed now (into
        arrays of its own)."""
        done = ComputedFeatures()
        try:
            with self._computing:
                started = time.perf_counter()
                features = self(images, batch_size)
                done.engine_seconds = time.perf_counter() - started
            done.set_result(features)
        except Exception as error:
            done.set_exception(error)
        return done


class OpenVINOExtractor:
    """OpenVINO on the CPU: the converted backbone compiled once, batches kept in flight on every core."""

    def __init__(self, model, precision: str, float_model=None):
        import openvino as ov

        self.compiled = ov.Core().compile_model(
            model, "CPU", {"INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[precision], "PERFORMANCE_HINT": "THROUGHPUT"}
        )
        self.requests = ov.AsyncInferQueue(self.compiled)
        self.requests.set_callback(_OpenVINOJob.collect)
        self.output_shape = tuple(dimension.get_length() for dimension in self.compiled.output(0).get_partial_shape()[1:])
        self.float_model = float_model  # the float OpenVINO model it was made from, when converted in this process
        self._submitting = threading.Lock()  # one shard's batches enter the queue together, in order
        self._last_job: _OpenVINOJob | None = None  # the shard queued last: the next one's engine time starts at its end

    def __call__(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        return self.submit(images, batch_size).result()

    def submit(self, images: np.ndarray, batch_size: int, into: np.ndarray | None = None) -> ComputedFeatures:
        """Queue every batch of `images` behind those in flight (waiting only for free requests) and return."""
        shape = (len(images), *self.output_shape)
        features = into if into is not None and into.shape == shape and into.dtype == np.float32 else np.empty(shape, np.float32)
        job = _OpenVINOJob(features, -(-len(images) // batch_size))
        with self._submitting:
            # Its engine time starts now or when the shard queued before it is done, whichever is later (set before
            # the first batch goes in: a one-batch shard can be done before `start_async` returns).
            job.behind, self._last_job, job.started_at = self._last_job, job, time.perf_counter()
            for start in range(0, len(images), batch_size):
                self.requests.start_async({0: np.ascontiguousarray(images[start : start + batch_size])}, userdata=(job, start))
        if not len(images):
            job.done.set_result(job.features)
        return job.done


class _OpenVINOJob:
    """One submitted shard: its features, filled in by the requests' callbacks, done when its last batch is."""

    def __init__(self, features: np.ndarray, batches: int):
        self.features = features
        self.batches_left = batches
        self.done = ComputedFeatures()
        self.lock = threading.Lock()
        self.behind: _OpenVINOJob | None = None  # the shard queued before it, until this one is done
        self.started_at = self.finished_at = 0.0

    @staticmethod
    def collect(request, userdata: tuple[_OpenVINOJob, int]) -> None:
        job, start = userdata
        try:
            result = request.get_output_tensor(0).data
            job.features[start : start + len(result)] = result
        except Exception as error:  # an engine error: the shard's waiter raises it, the engine goes on
            if not job.done.done():
                job.done.set_exception(error)
            return
        with job.lock:
            job.batches_left -= 1
            finished = job.batches_left == 0
        if finished and not job.done.done():
            job.finished_at = time.perf_counter()
            before = job.behind.finished_at if job.behind is not None else 0.0
            job.done.engine_seconds, job.behind = job.finished_at - max(job.started_at, before), None
            job.done.set_result(job.features)


def float32_reference(spec: FeatureSpec, extractor: Extractor, image_shape: tuple[int, int, int]) -> Extractor:
    """Features of `spec` in float32 to check a reduced precision against: the float model OpenVINO's was made from
    compiled in float32 (no second conversion; at 512 images of InceptionV3 at 139 px a third of TensorFlow's time),
    else a float32 build."""
    if isinstance(extractor, OpenVINOExtractor) and extractor.float_model is not None:
        return OpenVINOExtractor(extractor.float_model, "float32")
    return build_engine_extractor(spec.model_copy(update={"precision": "float32"}), image_shape)


Calibration = Callable[[], np.ndarray]  # the training images an int8 backbone is quantized on, read only when needed


def openvino_model(spec: FeatureSpec, image_shape: tuple[int, int, int], storage: Storage | None, calibration: Calibration | None = None):
    """The backbone of `spec` converted to OpenVINO: read from `storage` when a run before converted it (no
    TensorFlow then: a rerun's start drops from seconds to a tenth of one), else converted from Keras (in float32 and
    int8 its bilinear resize as matrix products: `resize_graph`) and kept there.
    An int8 backbone is also quantized (`quantized_model`) on `calibration()` before it is kept, so every shard and
    every worker runs the same quantized model, and a resumed run computes the same features bit for bit.

    Kept in the feature set's folder as a zip of the IR (`model.xml`, `model.bin`) named by the input shape and the
    library versions; a damaged copy (the zip's checksums) is converted again and replaced. Returns the OpenVINO
    model and the float model it was made from (itself unless quantized; None when read).
    """
    key = _conversion_key(image_shape, spec.precision)
    path = layout.converted_extractor(features_folder(storage, spec), key) if storage else None
    if storage is not None and path is not None and storage.exists(path):
        try:
            return _read_converted(storage.read_bytes(path)), None
        except (zipfile.BadZipFile, KeyError, OSError, RuntimeError) as exc:
            log.warning("converted backbone %s is damaged (%s); converting it again", storage.uri(path), exc)
    if spec.precision == "int8" and calibration is None:
        where = storage.uri(path) if storage is not None and path is not None else "storage"
        raise FeatureSetError(
            f"the int8 backbone of {spec.backbone} is not at {where}: it is quantized when a run chooses its engine, "
            "so run `cifar-transfer extract` with the same options (not a worker on its own) first"
        )
    model = converted_keras_model(_keras_extractor(spec, image_shape, "float32"))  # OpenVINO takes the precision when it compiles
    if spec.precision in PRODUCT_PRECISIONS:
        model = resize_as_matmuls(model)
    converted = model
    if calibration is not None and spec.precision == "int8":
        model = quantized_model(converted, calibration())
    if storage is not None and path is not None:
        try:
            storage.write_atomic(path, _packed_converted(model))
        except (OSError, StorageNotWritable) as exc:  # a read-only storage (a predict job's): the next run converts again
            log.warning("could not keep the converted backbone at %s (%s)", storage.uri(path), exc)
    return model, converted


def quantized_model(model, images: np.ndarray):
    """NNCF's post-training int8 quantization of `model`, its activation ranges measured on `images`
    (`INT8_CALIBRATION_BATCH` at a time). The mixed preset gives activations a zero point (ReLU6 ranges start at 0); the
    overflow fix keeps weights to 7 bits in every layer, so the kept model is exact on CPUs without VNNI too (AVX2's
    8-bit multiply-add saturates): a feature set's workers may run on any x86 CPU. Measured on MobileNetV2 at 64 px
    without VNNI, it lifts the features' cosine to float32 from 0.84 to 0.93."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    # Its notes would flood a run's log. The logger's level, not `nncf.set_log_level`, which also sets the level of
    # every handler on NNCF's logger: handlers shared with other loggers (a test's log capture) went deaf to INFO.
    logging.getLogger("nncf").setLevel(logging.ERROR)
    started = time.perf_counter()
    batches = [images[row : row + INT8_CALIBRATION_BATCH] for row in range(0, len(images), INT8_CALIBRATION_BATCH)]
    quantized = nncf.quantize(
        model,
        nncf.Dataset(batches),
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(batches),  # items of the dataset: every image
        advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE),
        ignored_scope=nncf.IgnoredScope(patterns=[f"^{RESIZE_NODES}"], validate=False),  # the resize stays in float
    )
    log.info("quantized the backbone to int8 on %d training images in %.1f s", len(images), time.perf_counter() - started)
    return quantized


def converted_keras_model(model):
    """A Keras model as an OpenVINO model, by OpenVINO's TensorFlow frontend (mended first on Python 3.13); ops it cannot
    convert raise `OpConversionFailure`. Every conversion goes through here, the run's backbones and `export` alike."""
    import openvino as ov

    _mend_openvino_tensorflow_frontend()
    with warnings.catch_warnings():  # Keras notes, every time, that the converter passes the one input as a tuple
        warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")
        try:
            return ov.convert_model(model)
        except ov.frontend.OpConversionFailure as exc:
            raise OpConversionFailure(str(exc)) from exc


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


def _conversion_key(image_shape: tuple[int, int, int], precision: str) -> str:
    described: dict = {"image_shape": list(image_shape), "versions": library_versions()}
    # int8: the calibration's batch is not in the key, so a feature set quantized one image at a time (before
    # `INT8_CALIBRATION_BATCH`) keeps reading the model its shards were computed with.
    if precision == "int8":  # float32, bf16 and f16 share one conversion: OpenVINO takes the precision when it compiles
        described["quantization"] = {"nncf": _version("nncf"), "images": INT8_CALIBRATION_IMAGES, "preset": "mixed", "overflow_fix": "all"}
    return stable_hash(described, 16)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


_extractors: dict[tuple[str, tuple[int, ...]], Extractor] = {}

_build_lock = threading.Lock()


def built_extractors() -> list[str]:
    """Fingerprints of the extractors built in this process (so tests can see builds)."""
    return [fingerprint for fingerprint, _ in _extractors]


def release_extractors() -> None:
    """Drop this process's extractors (once its shards are done, the memory goes to t-SNE and the heads)."""
    with _build_lock:
        for extractor in _extractors.values():
            if isinstance(extractor, OpenVINOExtractor):
                extractor.requests.wait_all()  # every callback has run: no engine thread asks for Python after this
        _extractors.clear()


# Before the interpreter is torn down, every OpenVINO request has run its Python callback: an engine thread that asks
# for the interpreter while it finalizes is ended by it mid-C++ and aborts the process ("terminate called without an
# active exception", exit status -6 after the work was done; one rerun in two in the engines tests).
atexit.register(release_extractors)


def get_extractor(
    spec: FeatureSpec, image_shape: tuple[int, int, int], storage_url: str | None = None, calibration: Calibration | None = None
) -> Extractor:
    """The compiled extractor for `spec`, built on first use in this process, then reused; with `storage_url`, an
    OpenVINO backbone converted by an earlier run is read from there (see `openvino_model`, and for `calibration`)."""
    with _build_lock:
        key = (spec.fingerprint, tuple(image_shape))  # one model per input shape: an archive's 32px, a collection's S
        if key not in _extractors:
            started = time.perf_counter()
            _extractors[key] = build_engine_extractor(spec, image_shape, Storage(storage_url) if storage_url else None, calibration)
            log.info(
                "built %s at %dpx on %s %s in %.1f s",
                spec.backbone,
                spec.input_size,
                spec.engine,
                spec.precision,
                time.perf_counter() - started,
            )
        return _extractors[key]


def build_engine_extractor(
    spec: FeatureSpec, image_shape: tuple[int, int, int], storage: Storage | None = None, calibration: Calibration | None = None
) -> Extractor:
    """A new extractor for `spec` on images of `image_shape` (uncached: benchmarks build their own)."""
    if spec.engine == "openvino":
        model, converted = openvino_model(spec, image_shape, storage, calibration)
        return OpenVINOExtractor(model, spec.precision, converted)
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


def forget_extractor(spec: FeatureSpec, image_shape: tuple[int, int, int], storage_url: str | None = None) -> None:
    """Drop one built extractor (a precision that failed its calibration: the run builds another, and this one's
    memory goes back); with `storage_url`, also the backbone kept for it there when that is all its folder holds.

    Only an int8 candidate keeps one (its quantized model, `choose_engine`): once it failed its check the verdict is
    remembered and it is never read again, and a folder with nothing else in it would sit among the feature sets
    like an unfinished one. A folder holding anything more (features computed in int8 on purpose) keeps its backbone."""
    with _build_lock:
        _extractors.pop((spec.fingerprint, tuple(image_shape)), None)
    if storage_url is None:
        return
    storage = Storage(storage_url)
    folder = features_folder(storage, spec)
    kept = layout.converted_extractor(folder, _conversion_key(image_shape, spec.precision))
    with contextlib.suppress(FileNotFoundError):  # another run turning down the same candidate got there first
        if storage.exists(folder) and storage.fs.find(folder) == [kept]:
            storage.fs.rm(folder, recursive=True)
