"""What this machine offers the engine choice (CPU flags and model, cores, GPUs, OpenVINO), and how the pipeline's
processes use its memory."""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib.util
import os
import platform
import re
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from cifar_transfer.native import load_tensorflow

X = TypeVar("X")
T = TypeVar("T")


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


def cpu_has_int8_acceleration() -> bool:
    """VNNI or AMX-INT8: the instructions that make OpenVINO's int8 faster than its bf16 or float32."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


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
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "native_bf16": cpu_has_native_bf16(),
        "gpus": gpus(),
        "openvino": _openvino_version(),
        "machine": platform.machine(),
    }


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or "unknown"


def blas_kernels() -> list[str]:
    """The kernel family each loaded OpenBLAS runs (`Haswell`, `SkylakeX`, ...): what it detected, or what
    OPENBLAS_CORETYPE forced. On a Zen 5 EPYC, Haswell's kernels ran float32 products at 210 GFLOP/s on 2 cores and
    SkylakeX's at 430."""
    from threadpoolctl import threadpool_info

    return sorted({str(library.get("architecture")) for library in threadpool_info() if library["internal_api"] == "openblas"})


def cuda_ids(found: int) -> list[str]:
    """The CUDA ids of `found` usable GPUs, as CUDA_VISIBLE_DEVICES names them (its first `found`, else 0..found-1)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[:found] if visible else [str(number) for number in range(found)]


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which a container or `taskset` may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _openvino_version() -> str | None:
    if not openvino_available():
        return None
    import openvino

    return openvino.get_version()


THP_DEFRAG = "/sys/kernel/mm/transparent_hugepage/defrag"
# Kernel settings under which memory advised for huge pages is compacted while the faulting thread waits.
STALLING_DEFRAG = frozenset({"always", "madvise", "defer+madvise"})


def avoid_huge_page_stalls(defrag_setting: str = THP_DEFRAG) -> bool:
    """Stop numpy advising huge pages for its large arrays where the kernel serves that advice by compacting memory
    while the thread waits (`defrag_setting` names `always`, `madvise` or `defer+madvise`; numpy issue 31590).
    On this project's 2-core VM every new GiB cost 1.2-4.8 s that way against 0.3 s without the advice: the head's
    read of its train split, the map's sample and the archive's decode spent most of their time there. Returns
    whether it did; a user's own NUMPY_MADVISE_HUGEPAGE is left to numpy. Set in the environment too, so worker
    processes started from this one (a local Dask or Ray cluster) do the same."""
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return False
    try:
        with open(defrag_setting) as setting:
            chosen = re.search(r"\[([^\]]+)\]", setting.read())
    except OSError:  # not Linux, or no transparent huge pages
        return False
    if chosen is None or chosen.group(1) not in STALLING_DEFRAG:
        return False
    import numpy as np

    multiarray = importlib.import_module("numpy.core.multiarray" if np.__version__.startswith("1.") else "numpy._core.multiarray")
    multiarray._set_madvise_hugepage(False)  # numpy's own switch behind NUMPY_MADVISE_HUGEPAGE
    os.environ["NUMPY_MADVISE_HUGEPAGE"] = "0"
    return True


class _StagesRunning:
    """The CPU-heavy stages running in this process (`sharing_cores`), the optimizer loops among them
    (`quiet_scipy_blas`), and each OpenBLAS's thread count from before the first of them began."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.quiet = 0
        self.original: dict[str, int] = {}  # by the library's file

    def change(self, running: int = 0, quiet: int = 0) -> None:
        from threadpoolctl import ThreadpoolController

        with self.lock:
            if not self.running and not self.quiet:
                self.original = {}
            self.running += running
            self.quiet += quiet
            for library in ThreadpoolController().select(internal_api="openblas").lib_controllers:
                original = self.original.setdefault(library.filepath, library.get_num_threads())
                set_threads = _process_wide_setter(library.filepath) or library.set_num_threads
                set_threads(self.threads(library.filepath, original))

    def threads(self, library_file: str, original: int) -> int:
        if self.quiet and _private_to_scipy(library_file):
            return 1
        return max(1, original // self.running) if self.running else original


_stages_running = _StagesRunning()


@functools.cache
def _process_wide_setter(library_file: str) -> Callable[[int], int] | None:
    """What sets an OpenBLAS's thread count from any thread: its `openblas_set_num_threads_local` (0.3.27 on; despite
    its name, for the whole process), or None where it has none. Its plain setter, which threadpoolctl calls, is
    ignored in a thread other than the main one once the main thread has set the count, with numpy's and scipy's
    OpenBLAS both loaded (0.3.31)."""
    import ctypes

    setter = getattr(ctypes.CDLL(library_file), "openblas_set_num_threads_local", None)
    if setter is not None:
        setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
    return setter


@functools.cache
def _private_to_scipy(library_file: str) -> bool:
    """Whether an OpenBLAS is scipy's own copy (a wheel's `scipy.libs`, or `scipy/.dylibs` on macOS), which numpy does
    not call; where both share one library (conda, a distribution's packages) there is one pool and nothing to quiet."""
    import scipy

    package = os.path.dirname(os.path.realpath(scipy.__file__))
    return os.path.realpath(library_file).startswith((package + os.sep, package + ".libs" + os.sep))


def in_order_on_threads(items: Iterable[X], work: Callable[[X], T], threads: int, ahead: int, name: str) -> Iterator[T]:
    """`work(item)` for each of `items` on `threads` threads (named `name`), the results in the items' order, with at
    most `ahead` items taken beyond the one handed over: for work that releases the GIL (reads, decodes), with
    memory bounded by `ahead`. A failure is raised in its turn, once the work under way ends; items not begun are
    dropped, as they are when the caller stops early."""
    if threads <= 1:
        yield from map(work, items)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix=name) as pool:
        pending: deque[Future[T]] = deque()
        try:
            for item in items:
                if len(pending) >= ahead:
                    yield pending.popleft().result()
                pending.append(pool.submit(work, item))
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(cancel_futures=True)


def share_of_cores() -> int:
    """The threads a stage's own thread pools (openTSNE's) may start now: the usable cores divided among the CPU-heavy
    stages running (`sharing_cores`), as OpenBLAS's threads are. Asked again as the stage goes on, since the share
    grows when the other stage ends."""
    with _stages_running.lock:
        return max(1, usable_cores() // max(1, _stages_running.running))


@contextlib.contextmanager
def sharing_cores() -> Iterator[None]:
    """Run a CPU-heavy stage (the map, the head) with OpenBLAS's threads divided among the stages running at once.
    One OpenBLAS keeps one pool of threads for the whole process, and two stages calling it at once from their own
    threads wait on each other for it: on 2 cores the map and the head side by side took 40 s sharing a pool of 2
    threads and 29-30 s with a thread each, while the head alone is faster with both (20.5-22.3 s, not 25.9-28.2 s)."""
    _stages_running.change(running=+1)
    try:
        yield
    finally:
        _stages_running.change(running=-1)


@contextlib.contextmanager
def quiet_scipy_blas() -> Iterator[None]:
    """Run a loop that alternates scipy's light calls with numpy's matrix products (the head's L-BFGS-B, a randomized
    PCA's power iterations with their LU steps) with scipy's own OpenBLAS on one thread. After each call an
    OpenBLAS's idle threads spin for about 0.1 s before they sleep, so scipy's 2-thread pool left a spinning thread
    against every numpy product that followed: on 2 cores the head's passes over its rows took 0.19 s instead of
    0.12-0.14 s, and the map's PCA of 5,000 rows of 4,096 features 1.0 s instead of 0.46 s. Those scipy calls are
    light on one thread. (numpy's products still run on the stage's share of threads, and OpenBLAS's results change
    in the last bits with its thread count: see the guide's "Threads".)"""
    _stages_running.change(quiet=+1)
    try:
        yield
    finally:
        _stages_running.change(quiet=-1)
