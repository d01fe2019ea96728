"""TensorFlow, loaded once per process with its C++ start-up notices kept off the console.

TensorFlow's native code writes notices (oneDNN on, no CUDA drivers, absl's "before InitializeLog") straight
to file descriptor 2 while it loads and first lists devices; TF_CPP_MIN_LOG_LEVEL no longer silences them.
They go to the `cifar_transfer.native` logger at DEBUG instead (the command line's log file keeps them);
anything else written to the console meanwhile is written back.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's own Python-side INFO and WARNING lines

# absl's prefix: severity, date, time (before its log is set up, "00:00:" and the seconds since the epoch), thread
_NATIVE_NOTICE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ |WARNING: All log messages before absl::InitializeLog)")


@contextlib.contextmanager
def native_notices_to_log() -> Iterator[None]:
    """Capture file descriptor 2 while the block runs; native notices go to the log, other lines back to stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured = sink.read().decode(errors="replace")
    for line in captured.splitlines():
        if _NATIVE_NOTICE.match(line):
            log.debug("%s", line)
        else:
            print(line, file=sys.stderr)


_FIRST_LOAD = threading.Lock()  # the notices' capture swaps the process's stderr: two threads at once would lose it


def load_tensorflow():
    """`tensorflow`, imported and its devices listed once, quietly; threads that ask at once wait for the first."""
    with _FIRST_LOAD:
        return _loaded_tensorflow()


@functools.cache
def _loaded_tensorflow():
    with native_notices_to_log():
        import tensorflow as tf

        tf.config.list_physical_devices()
    return tf


def load_keras():
    """`keras` on its TensorFlow backend, loaded quietly the first time; on the backend KERAS_BACKEND names when it
    names another (`bench/gpu.py --backend jax`: the backbones are Keras layers and ops only, so they run on a GPU
    machine that has JAX but no TensorFlow), without loading TensorFlow."""
    if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
        load_tensorflow()
    import keras

    return keras


def compiled_forward(model):
    """`model`'s inference as one TensorFlow graph for every batch size: traced once, on the model's input with the
    batch dimension left open. Traced per batch shape instead, a shard's last, shorter batch cost a second trace of
    the whole network (as long as the first) and a third shape a third; the features are the same bit for bit."""
    tf = load_tensorflow()
    (inputs,) = model.inputs
    signature = [tf.TensorSpec((None, *inputs.shape[1:]), inputs.dtype)]
    # No autograph: a plain call needs no source conversion, and autograph's parsing raced with another thread's in
    # CPython 3.11 once here ("SystemError: AST constructor recursion depth mismatch").
    return tf.function(lambda rows: model(rows, training=False), input_signature=signature, autograph=False)
