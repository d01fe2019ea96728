"""A finished run as one self-contained model: uint8 images of any size in, class probabilities out.

The run's parts become one graph, so a consumer needs neither this library nor the storage:
`images (batch, H, W, 3) uint8 -> bilinear Resizing to input_size -> the backbone's preprocess_input ->
backbone -> Flatten (the features as stored: spatial maps in (height, width, channels) order) -> the head`.
For a run with `--flip` the head's probabilities are averaged with the mirrored image's, as the run's test
predictions were. CIFAR's 32px images are resized exactly as extraction resized them; a photo collection's
images were resized by Pillow before extraction (antialiased when shrinking), so photos much larger than
the input size get slightly different features from the export's plain bilinear resize.

The backbone always runs in float32 here, whatever engine and precision made the run's features (OpenVINO,
bfloat16): the run's own probabilities may differ from the export's in the last digits, rarely in the class.
OpenVINO's CPU plugin computes in bfloat16 by default on CPUs with native bf16, whatever the IR says (its
runtime info and per-node marks are not honoured for this): on the tiny test run that changed 13% of the classes.
Compile with `export.json`'s `openvino_compile_config` (`INFERENCE_PRECISION_HINT: f32`) for the float32 function.

The destination folder holds, per format:
- `model.keras`: `keras.models.load_model(...)` (no custom objects);
- `savedmodel/1/`: a SavedModel under a version folder, so `--model_base_path=<dest>/savedmodel` serves it
  with TF Serving; its `serving_default` signature maps `images` to `probabilities`, `class_index` and
  `class_name` (the names are constants in the graph);
- `openvino/model.xml` (+ `.bin`): float32 IR, output tensor `probabilities`, the class names as JSON in
  its runtime info (`model.get_rt_info(["cifar_transfer", "classes"])`);
- `export.json`, written last (a folder without it is an unfinished export): the class names in output
  order, the files, the feature spec, the head and where they came from. A `.keras` file cannot carry the
  names without a custom layer that every loader would then need, so for Keras this file is where they are.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from pydantic import BaseModel

from cifar_transfer import records
from cifar_transfer.errors import ConfigError, FeatureSetError, OpConversionFailure
from cifar_transfer.redact import redact
from cifar_transfer.storage import Storage

if TYPE_CHECKING:
    from cifar_transfer.trained import TrainedHead

log = logging.getLogger(__name__)

FORMATS = ("keras", "savedmodel", "openvino")
DESCRIPTION_NAME = "export.json"
ARTIFACTS = {"keras": "model.keras", "savedmodel": "savedmodel/1", "openvino": "openvino/model.xml"}
OPENVINO_CLASSES_KEY = ["cifar_transfer", "classes"]
OPENVINO_COMPILE_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}  # the CPU plugin's default is bf16 where the CPU has it


class ExportResult(BaseModel):
    """What an export wrote and what the model is: `export.json` holds the same (files relative to the folder)."""

    destination: str
    files: dict[str, str]  # format -> artifact path relative to `destination`
    sizes: dict[str, int]  # format -> bytes written
    classes: list[str]  # the names of the output columns, in order
    spec: dict  # the run's feature spec, with its weights and seed
    fingerprint: str
    head_key: str
    head_kind: str
    mirrored_average: bool  # probabilities averaged with the left-right mirrored image's (a `--flip` run)
    test_accuracy: float  # the run's, on its own features
    seconds: float

    def location(self, fmt: str) -> str:
        return posixpath.join(self.destination, self.files[fmt])

    @property
    def description(self) -> str:
        return posixpath.join(self.destination, DESCRIPTION_NAME)


def available_formats() -> tuple[str, ...]:
    """Every format this installation can write (OpenVINO only where it is installed)."""
    from cifar_transfer.hardware import openvino_available

    return tuple(fmt for fmt in FORMATS if fmt != "openvino" or openvino_available())


def export_model(
    storage_url: str,
    destination: str,
    formats: Sequence[str] | None = None,
    fingerprint: str | None = None,
    head_key: str | None = None,
) -> ExportResult:
    """Export the head `head_key` of feature set `fingerprint` (default: the newest finished head) into the folder
    `destination` (local or fsspec URL), in `formats` (default: every available one).

    Everything is written to a local scratch folder first and then copied file by file, each atomically;
    `export.json` goes last, and an older one is removed first, so it never describes half-written files.
    """
    from cifar_transfer.trained import find_head

    started = time.perf_counter()
    chosen = formats is not None
    formats = _checked_formats(formats)
    target = Storage(destination)
    check_destination(target)
    trained = find_head(storage_url, fingerprint, head_key)
    spec = trained.features.spec
    if spec.weights not in ("imagenet", "none") and not os.path.isfile(spec.weights):
        raise ConfigError(f"the run's backbone weights file {spec.weights!r} is gone: the export needs it; put it back there")
    with tempfile.TemporaryDirectory(prefix="cifar-transfer-export-") as scratch:
        model = exported_model(trained, _load_head(Storage(storage_url), trained.files.model, scratch))
        built = os.path.join(scratch, "export")
        for fmt in list(formats):
            try:
                _WRITERS[fmt](model, trained.metrics.classes, os.path.join(built, ARTIFACTS[fmt]))
            except OpConversionFailure as exc:  # an op OpenVINO's converter lacks (a Keras Hub preset's bicubic resizing)
                others = " ".join(f"--format {other}" for other in FORMATS if other != fmt)
                if chosen:
                    raise ConfigError(f"OpenVINO cannot convert this model ({exc.operations}): export {others}") from None
                log.warning("export: OpenVINO cannot convert this model (%s): the openvino format is left out", exc.operations)
                formats.remove(fmt)
        if target.exists(target.path(DESCRIPTION_NAME)):
            target.fs.rm(target.path(DESCRIPTION_NAME))
        sizes = {fmt: _copy_out(os.path.join(built, ARTIFACTS[fmt]), target, ARTIFACTS[fmt]) for fmt in formats}
    result = ExportResult(
        destination=target.uri(target.root),
        files={fmt: ARTIFACTS[fmt] for fmt in formats},
        sizes=sizes,
        classes=trained.metrics.classes,
        spec={**spec.model_dump(), "weights": spec.weights, "seed": spec.seed},
        fingerprint=trained.features.fingerprint,
        head_key=trained.key,
        head_kind=trained.metrics.chosen.head,
        mirrored_average=trained.metrics.settings.flip,
        test_accuracy=trained.metrics.test_accuracy,
        seconds=time.perf_counter() - started,
    )
    description = {
        **result.model_dump(exclude={"destination", "seconds"}),
        "input": {"dtype": "uint8", "shape": [None, None, None, 3], "resized_to": [spec.input_size, spec.input_size]},
        "output": "probabilities (batch, classes), columns in the order of `classes`",
        "source": redact(Storage(storage_url).uri(trained.files.folder)),
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    if "openvino" in formats:
        description["openvino_compile_config"] = OPENVINO_COMPILE_CONFIG
    target.write_atomic(target.path(DESCRIPTION_NAME), records.EXPORT.dump(description))
    return result


def check_destination(target: Storage) -> None:
    """An export goes into a new or empty folder, or one holding only an earlier export (recognised by its
    `export.json`), that can be written to; anything else is refused before any work, so no one's files are replaced."""
    folder = target.root
    shown = redact(target.uri(folder))
    if target.exists(folder) and not target.fs.isdir(folder):
        raise ConfigError(f"export destination {shown} is a file: name a new or empty folder")
    found = [posixpath.relpath(path, folder) for path in target.fs.find(folder)] if target.exists(folder) else []
    if found:
        if DESCRIPTION_NAME not in found:
            raise ConfigError(f"export destination {shown} holds other files ({found[0]}, ...): name a new or empty folder")
        ours = (DESCRIPTION_NAME, *ARTIFACTS.values(), ARTIFACTS["openvino"].removesuffix(".xml") + ".bin")
        foreign = [path for path in found if not any(path == name or path.startswith(name + "/") for name in ours)]
        if foreign:
            raise ConfigError(
                f"export destination {shown} holds an earlier export and other files ({foreign[0]}): name a new or empty folder"
            )
    target.check_writable(folder, "the export")


def _checked_formats(formats: Sequence[str] | None) -> list[str]:
    available = available_formats()
    if formats is None:
        return list(available)
    unknown = [fmt for fmt in formats if fmt not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown export format {unknown[0]!r}: use {', '.join(FORMATS)}")
    if "openvino" in formats and "openvino" not in available:
        raise ConfigError("export format 'openvino' needs OpenVINO: pip install openvino, or leave that format out")
    if not formats:
        raise ConfigError(f"no export format given: use one or more of {', '.join(available)}")
    return list(dict.fromkeys(formats))


def _load_head(storage: Storage, path: str, scratch: str):
    """The run's head, read through the storage (any fsspec URL) into a local file Keras can load."""
    from cifar_transfer.native import load_keras

    local = os.path.join(scratch, "head.keras")
    with open(local, "wb") as stream:
        stream.write(storage.read_bytes(path))
    return load_keras().models.load_model(local, compile=False)  # its optimizer is of no use here


def exported_model(trained: TrainedHead, head):
    """The Keras model of the whole classifier: the run's backbone (rebuilt from its spec, in float32) before `head`."""
    from cifar_transfer.backbones import build_extractor
    from cifar_transfer.backbones.base import keras_name
    from cifar_transfer.native import load_keras

    keras = load_keras()
    spec = trained.features.spec
    # image_shape (None, None, 3): build_extractor then always resizes, as the pipeline does when sizes differ.
    extractor = build_extractor(
        spec.backbone,
        weights=spec.weights,
        input_size=spec.input_size,
        pooling=spec.pooling,
        precision="float32",
        seed=spec.seed,
        image_shape=(None, None, 3),
    )
    if list(extractor.output.shape[1:]) != list(trained.features.feature_shape):
        raise FeatureSetError(
            f"the rebuilt {spec.backbone} gives features of shape {list(extractor.output.shape[1:])}, "
            f"the run stored {trained.features.feature_shape}: export with the library version that made the run"
        )
    images = keras.Input((None, None, 3), dtype="uint8", name="images")
    flatten = keras.layers.Flatten()

    def probabilities(pixels):
        return head(flatten(extractor(pixels)))

    outputs = probabilities(images)
    if trained.metrics.settings.flip:  # the run averaged each test image's two views
        outputs = keras.layers.Average()([outputs, probabilities(keras.ops.flip(images, axis=2))])
    return keras.Model(images, outputs, name=keras_name(f"{spec.backbone}_{trained.metrics.chosen.head}_classifier"))


def _write_keras(model, classes: list[str], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    model.save(path)


def _write_savedmodel(model, classes: list[str], folder: str) -> None:
    """A plain `tf.Module`: Keras' ExportArchive (`model.export`) stored every weight twice (20 MB for MobileNetV2's 9).
    The signature also names the class, so TF Serving's answer reads on its own. The module keeps the model's
    variables, not the model: saving walks every object the module holds, and a Keras Hub model's layers made that
    walk half of the export's time (about 7 s of 14 for a three-block ViT)."""
    from cifar_transfer.native import load_tensorflow

    tf = load_tensorflow()
    names = tf.constant(classes)

    def serve(images):
        probabilities = model(images, training=False)
        best = tf.argmax(probabilities, axis=1)
        return {"probabilities": probabilities, "class_index": best, "class_name": tf.gather(names, best)}

    module = tf.Module()
    module.variables_of_model = list(model.variables)  # what `serve` reads
    module.serve = tf.function(serve, input_signature=[tf.TensorSpec((None, None, None, 3), tf.uint8, name="images")], autograph=False)
    tf.saved_model.save(module, folder, signatures={"serving_default": module.serve})


def _write_openvino(model, classes: list[str], path: str) -> None:
    """float32 weights (save_model would halve them to float16 by default): the IR computes what the Keras model does."""
    import openvino as ov

    from cifar_transfer.extractors import converted_keras_model

    converted = converted_keras_model(model)
    converted.output(0).get_tensor().set_names({"probabilities"})
    converted.set_rt_info(json.dumps(classes), OPENVINO_CLASSES_KEY)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ov.save_model(converted, path, compress_to_fp16=False)


_WRITERS = {"keras": _write_keras, "savedmodel": _write_savedmodel, "openvino": _write_openvino}


def _copy_out(local: str, target: Storage, relative: str) -> int:
    """Copy a written artifact (a file, or a folder file by file) under `target`; the bytes copied.

    An IR's .bin goes before its .xml, so a reader that finds the .xml finds its weights."""
    if os.path.isfile(local):
        files = [(local, relative)]
        if local.endswith(".xml") and os.path.isfile(local[:-4] + ".bin"):
            files.insert(0, (local[:-4] + ".bin", relative[:-4] + ".bin"))
    else:
        files = [
            (os.path.join(folder, name), posixpath.join(relative, os.path.relpath(os.path.join(folder, name), local).replace(os.sep, "/")))
            for folder, _, names in sorted(os.walk(local))
            for name in sorted(names)
        ]
    for source_path, name in files:
        size = os.path.getsize(source_path)
        with open(source_path, "rb") as source, target.open_atomic(target.path(name), size) as stream:
            shutil.copyfileobj(source, stream, 4 << 20)
    return sum(os.path.getsize(source_path) for source_path, _ in files)
