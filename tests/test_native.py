"""TensorFlow's native start-up notices: kept off the console, in the log."""

from __future__ import annotations

import logging
import os

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
