"""Stages side by side share the cores: OpenBLAS's threads are divided among the CPU-heavy stages running at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# A fresh interpreter with numpy's and scipy's OpenBLAS both loaded, as in a run. The main thread sets the count first
# (after which OpenBLAS ignores its plain setter in other threads); a stage then runs in the main thread, as the head
# does in a flow, and another in a worker thread, as the map does.
PROBE = """
import json, threading
import numpy, scipy.optimize
from threadpoolctl import ThreadpoolController
from cifar_transfer.hardware import sharing_cores

def counts():
    return sorted(library.get_num_threads() for library in ThreadpoolController().select(internal_api="openblas").lib_controllers)

ThreadpoolController().limit(limits=ThreadpoolController().select(internal_api="openblas").lib_controllers[0].get_num_threads())
seen = {"before": counts()}
entered, leave, left = threading.Event(), threading.Event(), threading.Event()

def second_stage():
    with sharing_cores():
        seen["worker_inside"] = counts()
        entered.set()
        leave.wait()
    left.set()

with sharing_cores():
    seen["alone"] = counts()
    worker = threading.Thread(target=second_stage)
    worker.start()
    entered.wait()
    seen["together"] = counts()
    leave.set()
    left.wait()
    seen["alone_again"] = counts()
worker.join()
seen["after"] = counts()
print(json.dumps(seen))
"""


def run_probe(code: str) -> dict:
    """What a probe printed, run by a fresh interpreter with two OpenBLAS threads, whatever an earlier test in this
    process left in the environment (Dask and Ray set OMP_NUM_THREADS=1, which OpenBLAS also reads)."""
    threads = {"OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "GOTO_NUM_THREADS"}
    environment = {name: value for name, value in os.environ.items() if name not in threads} | {"OPENBLAS_NUM_THREADS": "2"}
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=environment)
    return json.loads(finished.stdout)


def test_two_stages_at_once_divide_openblas_threads_and_one_alone_gets_them_all():
    seen = run_probe(PROBE)
    before = seen["before"]
    assert len(before) == 2, f"numpy's and scipy's OpenBLAS were not both loaded: {before}"
    assert min(before) >= 2, f"OpenBLAS runs {before} threads here: the division needs a machine of 2 cores or more"
    halved = [count // 2 for count in before]
    assert seen["together"] == seen["worker_inside"] == halved
    assert seen["alone"] == seen["alone_again"] == seen["after"] == before


# The head's optimizer loop: scipy's own OpenBLAS (the wheel's private copy) keeps one thread, numpy's all of its own,
# also while the map's stage starts and ends beside it in another thread.
QUIET_PROBE = """
import json, threading
import numpy, scipy, scipy.optimize
from threadpoolctl import ThreadpoolController
from cifar_transfer.hardware import quiet_scipy_blas, sharing_cores

def counts():
    libraries = ThreadpoolController().select(internal_api="openblas").lib_controllers
    return {("scipy" if "scipy.libs" in library.filepath else "numpy"): library.get_num_threads() for library in libraries}

ThreadpoolController().limit(limits=2, user_api="blas")
seen = {"before": counts()}
with sharing_cores():
    with quiet_scipy_blas():
        seen["quiet"] = counts()
        second_stage = sharing_cores()  # held here: it begins in another thread and does not end before this one
        beside = threading.Thread(target=second_stage.__enter__)
        beside.start()
        beside.join()
        seen["quiet_beside_another"] = counts()
    seen["loud_beside_another"] = counts()
    second_stage.__exit__(None, None, None)
    seen["loud_alone"] = counts()
seen["after"] = counts()
print(json.dumps(seen))
"""


def test_an_optimizer_loop_keeps_scipys_own_openblas_on_one_thread_and_numpys_on_its_share():
    seen = run_probe(QUIET_PROBE)
    assert seen["before"] == {"numpy": 2, "scipy": 2}, f"numpy's and scipy's own OpenBLAS were not both loaded with 2 threads: {seen}"
    assert seen["quiet"] == {"numpy": 2, "scipy": 1}
    assert seen["quiet_beside_another"] == {"numpy": 1, "scipy": 1}
    assert seen["loud_beside_another"] == {"numpy": 1, "scipy": 1}
    assert seen["loud_alone"] == seen["after"] == seen["before"]
