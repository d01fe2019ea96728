"""TensorFlow's native start-up notices: kept off the console, in the log; its compiled forward pass: traced once."""

from __future__ import annotations

import logging
import os

import numpy as np

from cifar_transfer.native import native_notices_to_log

NOTICES = [
    "I0000 00:00:1796288028.538899   12293 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.",
    "E0000 00:00:1796281633.952002   13306 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error",
    "W1203 07:07:03.123456 4711 cpu_feature_guard.cc:210] This TensorFlow binary is optimized to use available CPU instructions",
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
]


def test_native_notices_go_to_the_log_and_other_lines_back_to_stderr(capfd, caplog):
    """What native code writes to file descriptor 2 while TensorFlow loads: absl's notices (timed, or stamped with the
    seconds since the epoch before its log is set up) go to the DEBUG log; any other line is written back to stderr."""
    with caplog.at_level(logging.DEBUG, logger="cifar_transfer.native"), native_notices_to_log():
        for line in [*NOTICES[:2], "a line of the program's own", *NOTICES[2:]]:
            os.write(2, (line + "\n").encode())
    assert capfd.readouterr().err == "a line of the program's own\n"
    assert [record.getMessage() for record in caplog.records if record.name == "cifar_transfer.native"] == NOTICES


def test_a_compiled_forward_traces_once_for_every_batch_size():
    """A shard's last batch is shorter than the others; the graph must not be traced again for it (a second trace of a
    whole backbone costs as much as the first), and every batch's result is the model's."""
    from cifar_transfer.extractors import KerasExtractor
    from cifar_transfer.native import load_keras

    keras = load_keras()
    keras.utils.set_random_seed(3)
    images = keras.Input((8, 8, 3), dtype="uint8")
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(keras.ops.cast(images, "float32")))
    model = keras.Model(images, features)
    extractor = KerasExtractor(model)
    rows = np.random.default_rng(3).integers(0, 256, (100, 8, 8, 3), dtype=np.uint8)

    shard, tail = extractor(rows, 64), extractor(rows[:17], 64)  # batches of 64, 36 and 17 rows

    assert extractor.forward.experimental_get_tracing_count() == 1
    np.testing.assert_allclose(shard, model(rows, training=False).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tail, shard[:17], rtol=1e-6, atol=1e-6)


def test_batches_handed_to_the_engine_ahead_of_their_read_back_come_back_in_order():
    """`KerasExtractor` reads each batch back `IN_FLIGHT_BATCHES` batches after handing it over: with many more batches
    than that, the shard's features are each batch's own, in order, bit for bit."""
    from cifar_transfer.extractors import IN_FLIGHT_BATCHES, KerasExtractor
    from cifar_transfer.native import load_keras

    keras = load_keras()
    keras.utils.set_random_seed(4)
    images = keras.Input((8, 8, 3), dtype="uint8")
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(keras.ops.cast(images, "float32")))
    extractor = KerasExtractor(keras.Model(images, features))
    rows = np.random.default_rng(4).integers(0, 256, (100, 8, 8, 3), dtype=np.uint8)
    batches = [rows[start : start + 8] for start in range(0, len(rows), 8)]
    assert len(batches) > 2 * IN_FLIGHT_BATCHES

    one_by_one = np.concatenate([extractor.forward(batch).numpy() for batch in batches])

    assert np.array_equal(extractor(rows, 8), one_by_one)
