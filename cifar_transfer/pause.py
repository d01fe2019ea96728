"""A test hook that holds extraction at a chosen shard, so a test can kill a run exactly while that shard is in flight.

`CIFAR_TRANSFER_PAUSE_AT=SHARD=FILE` (e.g. `train/00004=/tmp/t/paused`): when a process reaches shard SHARD, just
before computing its features (holding its claim; the pipeline first lets every shard it queued before finish and
commit, so what a kill leaves is the same whatever the machine's speed), it writes its pid to FILE and waits while
FILE exists. A test waits for FILE, then kills the run, or removes FILE to let it go
on: a condition to wait on instead of slow models and sleeps. Unset (as nothing but a test sets it), it does nothing.
"""

from __future__ import annotations

import os
import time

PAUSE_AT = "CIFAR_TRANSFER_PAUSE_AT"


def pausing_at(shard_name: str) -> bool:
    """Whether `PAUSE_AT` names this shard (the caller settles its work in flight before `pause_at`)."""
    wanted, _, marker = os.environ.get(PAUSE_AT, "").partition("=")
    return wanted == shard_name and bool(marker)


def pause_at(shard_name: str) -> None:
    """Hold here while the pause FILE exists, when `PAUSE_AT` names this shard."""
    wanted, _, marker = os.environ.get(PAUSE_AT, "").partition("=")
    if wanted != shard_name or not marker:
        return
    with open(marker, "w") as stream:
        stream.write(f"{os.getpid()}\n")
    while os.path.exists(marker):
        time.sleep(0.02)
