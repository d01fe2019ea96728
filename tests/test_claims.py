"""Claims: one writer per output among runs sharing a storage, on real files with real processes and threads.

A live holder is waited for; a dead, silent or stuck one is taken over, by exactly one of the
waiters however many race for it, and a holder that was taken over never touches its successor's claim.
Every test ends with nothing hidden left next to the output.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cifar_transfer import claims as claims_module
from cifar_transfer.claims import Claim
from cifar_transfer.storage import Storage
from conftest import wait_until

CONTENDERS = 8
HOLD_SECONDS = 0.2  # how long each contender keeps the claim: long enough for an overlap to show


def claim_file(storage: Storage, path: str, holder: dict) -> str:
    """A claim made by hand, as another writer would have left it."""
    claim = Claim(storage, path).path
    storage.fs.makedirs(storage.fs._parent(claim), exist_ok=True)
    storage.fs.pipe_file(claim, json.dumps({**holder, "beat": 0}).encode())
    return claim


def guard_file(storage: Storage, path: str, maker: dict) -> str:
    """The guard of `path`'s claim made by hand, as a writer changing the claim holds it."""
    guard = Claim(storage, path).guard
    storage.fs.pipe_file(guard, json.dumps(maker).encode())
    return guard


def claim_content(claim: Claim) -> dict:
    return json.loads(claim.storage.read_bytes(claim.path))


def hidden_files(folder: Path) -> list[Path]:
    """Claims, guards and temporary files: what must not outlive the writers."""
    return list(folder.rglob(".*"))


def a_finished_pid() -> int:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(ended.stdout)


def contend(storage_url: str, path: str, results: str, number: int, start, go) -> None:
    """One contender process: start with the others, take the claim, hold it a while, record when, and log what it did."""
    claims_module.HEARTBEAT_SECONDS = 0.05  # heartbeats take the guard too, while the others try to
    # Silent for this long means abandoned: as all start together and poll on the same schedule, all find out at once.
    claims_module.STALE_AFTER_SECONDS = 1.0
    handler = logging.FileHandler(os.path.join(results, f"{number}.log"))
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(claims_module.__name__)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    claim = Claim(Storage(storage_url), path, hold_seconds=60)
    claim.storage.fs.exists(path)  # whatever is slow the first time is done before the start
    if start.wait(60) == 0:
        go.value = time.monotonic() + 0.1
    start.wait(60)
    at = go.value
    while time.monotonic() < at:
        pass  # a start within microseconds of each other, where a barrier lets processes go milliseconds apart
    claim.acquire()
    acquired = time.monotonic()  # system-wide on Linux, so comparable between the contenders
    time.sleep(HOLD_SECONDS)  # the work done under the claim
    released = time.monotonic()
    claim.release()
    record = {"pid": os.getpid(), "acquired": acquired, "released": released, "lost": claim.lost}
    Path(results, f"{number}.json").write_text(json.dumps(record))


def log_lines(results: Path, number: int) -> list[str]:
    log = results / f"{number}.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.slow
def test_many_contenders_racing_on_one_abandoned_claim_take_it_over_once(tmp_path):
    """Eight processes wait on a claim whose holder went silent and find it abandoned at the same moment."""
    store, results = tmp_path / "store", tmp_path / "results"
    results.mkdir()
    storage, path = Storage(str(store)), str(store / "part-00000.parquet")
    claim_file(storage, path, {"id": "abandoned", "host": "another-machine", "pid": 1})
    context = multiprocessing.get_context("spawn")
    start, go = context.Barrier(CONTENDERS), context.Value("d", 0.0)
    contenders = [context.Process(target=contend, args=(str(store), path, str(results), number, start, go)) for number in range(CONTENDERS)]
    for contender in contenders:
        contender.start()
    try:
        for contender in contenders:
            contender.join(120)
    finally:
        for contender in contenders:
            if contender.is_alive():
                contender.kill()
    assert [contender.exitcode for contender in contenders] == [0] * CONTENDERS

    logs = [log_lines(results, number) for number in range(CONTENDERS)]
    assert all(lines[0].startswith("waiting for") and "'abandoned'" in lines[0] for lines in logs), f"not all waited on it: {logs}"
    holds = sorted(
        (json.loads((results / f"{number}.json").read_text()) for number in range(CONTENDERS)), key=lambda hold: hold["acquired"]
    )
    assert len({hold["pid"] for hold in holds}) == CONTENDERS and not any(hold["lost"] for hold in holds), (holds, logs)
    for earlier, later in itertools.pairwise(holds):
        assert earlier["released"] <= later["acquired"], f"two holders at once: {earlier} and {later}; {logs}"
    takeovers = [line for lines in logs for line in lines if line.startswith("took over")]
    assert len(takeovers) == 1, logs
    assert "'abandoned'" in takeovers[0] and "has not renewed it" in takeovers[0]
    assert hidden_files(store) == []


def test_a_stuck_holder_is_taken_over_after_its_deadline_and_never_touches_the_new_claim(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(claims_module, "HEARTBEAT_SECONDS", 0.05)
    storage, path = Storage(str(tmp_path)), str(tmp_path / "part-00000.parquet")
    stuck = Claim(storage, path, hold_seconds=1.0)
    stuck.acquire()
    wait_until(lambda: claim_content(stuck)["beat"] >= 2, 30, "two beats", interval=0.01)  # alive and renewing, but making no progress
    taker = Claim(storage, path, hold_seconds=60)
    with caplog.at_level(logging.INFO, logger=claims_module.__name__):
        taker.acquire()
        assert time.time() >= stuck.deadline
        wait_until(lambda: stuck.lost, 30, "the claim lost", interval=0.01)  # its next heartbeat found the claim taken over
        stuck.release()
        beat_when_released = claim_content(taker)["beat"]
        wait_until(lambda: claim_content(taker)["beat"] >= beat_when_released + 2, 30, "two beats of the taker", interval=0.01)
    assert claim_content(taker)["id"] == taker.holder["id"] and claim_content(taker)["deadline"] == taker.deadline
    messages = [record.getMessage() for record in caplog.records]
    takeovers = [message for message in messages if message.startswith("took over")]
    assert len(takeovers) == 1 and stuck.holder["id"] in takeovers[0] and "deadline" in takeovers[0], messages
    assert sum(message.startswith("lost") for message in messages) == 1, messages
    taker.release()
    assert not taker.lost and hidden_files(tmp_path) == []


def test_a_live_holder_is_waited_for_and_renews_its_claim(tmp_path, monkeypatch):
    monkeypatch.setattr(claims_module, "HEARTBEAT_SECONDS", 0.05)
    storage, path = Storage(str(tmp_path)), str(tmp_path / "part-00000.parquet")
    holder = Claim(storage, path)
    holder.acquire()
    wait_until(lambda: claim_content(holder)["beat"] >= 2, 30, "two beats", interval=0.01)

    acquired = threading.Event()
    waiting = Claim(storage, path)

    def wait_for_claim():
        waiting.acquire()
        acquired.set()

    waiter = threading.Thread(target=wait_for_claim)
    waiter.start()
    wait_until(lambda: claim_content(holder)["beat"] >= 4, 30, "four beats", interval=0.01)  # beats went on while the waiter polled
    assert not acquired.is_set()
    holder.release()
    waiter.join(timeout=30)
    assert acquired.is_set()
    waiting.release()
    assert not holder.lost and not waiting.lost and hidden_files(tmp_path) == []


def test_the_claim_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    storage, path = Storage(str(tmp_path)), str(tmp_path / "part-00000.parquet")
    claim_file(storage, path, {"id": "killed", "host": socket.gethostname(), "pid": a_finished_pid()})
    started = time.monotonic()
    taker = Claim(storage, path)
    taker.acquire()
    assert time.monotonic() - started < claims_module.STALE_AFTER_SECONDS / 2
    assert claim_content(taker)["id"] == taker.holder["id"]
    taker.release()
    assert hidden_files(tmp_path) == []


def test_a_guard_left_by_a_dead_process_does_not_block_a_takeover(tmp_path):
    storage, path = Storage(str(tmp_path)), str(tmp_path / "part-00000.parquet")
    died_while_taking_over = {"id": "taker", "host": socket.gethostname(), "pid": a_finished_pid()}
    claim_file(storage, path, {"id": "killed", "host": socket.gethostname(), "pid": died_while_taking_over["pid"]})
    guard_file(storage, path, died_while_taking_over)
    started = time.monotonic()
    taker = Claim(storage, path)
    taker.acquire()
    assert time.monotonic() - started < claims_module.STALE_AFTER_SECONDS / 2
    assert claim_content(taker)["id"] == taker.holder["id"]
    taker.release()
    assert hidden_files(tmp_path) == []


def test_a_claim_that_stopped_changing_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(claims_module, "STALE_AFTER_SECONDS", 0.5)
    storage, path = Storage(str(tmp_path)), str(tmp_path / "part-00000.parquet")
    claim_file(storage, path, {"id": "elsewhere", "host": "another-machine", "pid": 1})
    started = time.monotonic()
    taker = Claim(storage, path)
    taker.acquire()
    assert time.monotonic() - started >= 0.5
    assert claim_content(taker)["id"] == taker.holder["id"]
    taker.release()
    assert hidden_files(tmp_path) == []
