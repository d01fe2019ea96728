"""A test hook that holds a run at a chosen point, so a test can kill it exactly while that work is in flight.

`CIFAR_TRANSFER_PAUSE_AT=POINT=FILE` (e.g. `train/00004=/tmp/t/paused`): when a process reaches POINT, it writes its
pid to FILE and waits while FILE exists. The points: a shard's name, just before computing its features (holding
its claim; the extraction pipeline first lets every shard it queued before finish and commit, so what a kill
leaves is the same whatever the machine's speed); `tsne` and `head`, once the map or head has written its
settings (its first output) and before it computes. A test waits for FILE, then kills the run, or removes FILE
to let it go on: a condition to wait on instead of slow models and sleeps. Unset (as nothing but a test sets it),
it does nothing.
"""

from __future__ import annotations

import os
import time

PAUSE_AT = "CIFAR_TRANSFER_PAUSE_AT"


def pausing_at(point: str) -> bool:
    """Whether `PAUSE_AT` names this point (the caller settles its work in flight before `pause_at`)."""
    wanted, _, marker = os.environ.get(PAUSE_AT, "").partition("=")
    return wanted == point and bool(marker)


def pause_at(point: str) -> None:
    """Hold here while the pause FILE exists, when `PAUSE_AT` names this point."""
    wanted, _, marker = os.environ.get(PAUSE_AT, "").partition("=")
    if wanted != point or not marker:
        return
    from cifar_transfer.storage import Storage

    path = os.path.abspath(marker)  # whole when it appears: a test that sees FILE reads the pid it waits for
    Storage(os.path.dirname(path)).write_atomic(path, f"{os.getpid()}\n".encode())
    while os.path.exists(marker):
        time.sleep(0.02)
