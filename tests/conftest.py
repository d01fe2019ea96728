"""Shared fixtures: tiny CIFAR-10 archives in the official format, and a Prefect test API."""

from __future__ import annotations

import atexit
import collections
import functools
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Isolate Prefect's home (cache records, local results, profiles) from the user's; removed when this process exits.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="cifar-transfer-prefect-")
# The test servers send nothing out (and log no failed attempt where there is no network).
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

import numpy as np
import pytest

from cifar_transfer.cifar import CLASS_NAMES

# Each test process's Prefect home holds about 35 MB of Prefect's database after a suite. Registered before Prefect
# registers the stop of a temporary server it starts, so it runs after that stop.
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)

BATCH_DIR = "cifar-10-batches-py"
# The command line as a user runs it, in a process of its own.
CLI = [sys.executable, "-m", "cifar_transfer.flows.cli"]
# The smallest real backbone the command line runs: seeded random MobileNetV2 weights at its minimum input size.
TINY_CLI = ["--backbone", "MobileNetV2", "--weights", "none", "--input-size", "32"]


def cifar_images(count: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Rows in CIFAR-10's channel-major layout whose colour depends on the label, so heads can learn."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=count)
    base = np.array([[(label * 25) % 256, (label * 70) % 256, (255 - label * 25) % 256] for label in range(10)], np.float64)
    pixels = base[labels][:, :, None] + rng.normal(0, 30, size=(count, 3, 1024))
    return np.clip(pixels, 0, 255).astype(np.uint8).reshape(count, 3072), [int(label) for label in labels]


def batch_pickle(data: np.ndarray, labels: list[int], name: str) -> bytes:
    """A batch pickled the way the official files are (protocol 2, bytes keys)."""
    batch = {
        b"batch_label": name.encode(),
        b"labels": labels,
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    return pickle.dumps(batch, protocol=2)


def write_archive(path: Path, members: dict[str, bytes] | list[tuple[str, bytes | tarfile.TarInfo]]) -> str:
    """Write a tar.gz of (name, payload) members in order (a TarInfo payload is added as it is); return its MD5.

    The gzip header carries no time or name, so the same members give the same bytes and MD5 in every test and session:
    feature sets computed once per session (`reference_features`) have the fingerprint each test's own run has.
    """
    with open(path, "wb") as file, gzip.GzipFile("", "wb", fileobj=file, mtime=0) as packed, tarfile.open(fileobj=packed, mode="w") as tar:
        for name, payload in members.items() if isinstance(members, dict) else members:
            if isinstance(payload, tarfile.TarInfo):
                tar.addfile(payload)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return hashlib.md5(path.read_bytes()).hexdigest()


def cifar_members(train_per_batch: int = 40, test_count: int = 100, seed: int = 0) -> dict[str, bytes]:
    members = {}
    for number in range(1, 6):
        data, labels = cifar_images(train_per_batch, seed + number)
        members[f"{BATCH_DIR}/data_batch_{number}"] = batch_pickle(data, labels, f"training batch {number} of 5")
    data, labels = cifar_images(test_count, seed + 100)
    members[f"{BATCH_DIR}/test_batch"] = batch_pickle(data, labels, "testing batch 1 of 1")
    members[f"{BATCH_DIR}/batches.meta"] = pickle.dumps({b"label_names": [name.encode() for name in CLASS_NAMES]}, protocol=2)
    return members


IN_CI = os.environ.get("CI") == "true"


def pytest_collection_modifyitems(config, items):
    """A test that runs flows against the Prefect API is `slow`: `pytest -m "not slow"` is the fast loop. Under
    pytest-xdist a module runs whole in one worker, in this order: those that hold a `long` test first, then the others
    by their count of slow tests (a stable sort), so that the quick modules fill the workers' ends rather than a module
    of flow runs ending the session alone while the other workers wait."""
    for item in items:
        if "prefect_api" in item.fixturenames or item.get_closest_marker("long"):
            item.add_marker(pytest.mark.slow)
    long_modules = {item.module for item in items if item.get_closest_marker("long")}
    slow_tests = collections.Counter(item.module for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: (item.module not in long_modules, -slow_tests[item.module]))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI every test must run: a skip (a missing browser, mount rights, data) fails it there, with the reason."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome, report.longrepr = "failed", f"skipped in CI, where every test must run: {reason}"


@pytest.fixture
def tiny_archive(tmp_path) -> tuple[Path, str]:
    """A 200 train + 100 test image archive in the official layout: (path, md5)."""
    path = tmp_path / "cifar-10-python.tar.gz"
    return path, write_archive(path, cifar_members())


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MOBILENET_WEIGHTS = SHARED_DATA / "weights" / "mobilenet_v2_1.00_224_imagenet_no_top.weights.h5"


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker per core, at least 3 (many tests wait on a server, a worker or a child process, so a third
    worker keeps 2 cores busy) and at most 8 (each worker holds TensorFlow, about 1.5 GB)."""
    return max(3, min(os.cpu_count() or 1, 8))


SHARED_API = "CIFAR_TRANSFER_TEST_SHARED_PREFECT_API"  # set by the pytest-xdist controller for its workers


def pytest_configure(config):
    """Under pytest-xdist the controller starts the session's one Prefect API and hands its URL down to the workers: a
    run a session fixture made in one worker is then in the API every test reads. Its port is chosen first and the
    server starts in the background, so that the workers import and collect meanwhile (`prefect_api` waits for it)."""
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", None) or SHARED_API in os.environ:
        return
    if "not slow" in (config.getoption("markexpr") or ""):
        return  # the fast loop runs no flow
    import threading

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.testing.utilities import _find_available_port

    server = SubprocessASGIServer(port=_find_available_port())  # its database: PREFECT_HOME's, this session's own
    os.environ["PREFECT_API_URL"] = os.environ[SHARED_API] = server.api_url
    starting = threading.Thread(target=server.start, kwargs={"timeout": 120}, name="shared Prefect API", daemon=True)
    starting.start()
    config._shared_prefect_api = (server, starting)


def pytest_unconfigure(config):
    if hasattr(config, "_shared_prefect_api"):
        server, starting = config._shared_prefect_api
        starting.join()
        server.stop()


# Under the shared API, the flow runs a test starts in its own process carry its worker's tag, so that what a test
# reads back from the API (`this_workers_runs`) is its own runs, not another worker's made meanwhile.
WORKER_TAG = f"pytest-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"


@pytest.fixture(autouse=True)
def _tag_this_workers_runs():
    if not os.environ.get(SHARED_API):
        yield
        return
    from prefect import tags

    with tags(WORKER_TAG):
        yield


def this_workers_runs():
    """A flow-run filter field for the runs this worker started (None, all runs, outside the shared API)."""
    from prefect.client.schemas.filters import FlowRunFilterTags

    return FlowRunFilterTags(all_=[WORKER_TAG]) if os.environ.get(SHARED_API) else None


@functools.cache
def http_client():
    """One HTTP client per test process for the tests' calls to an API: `httpx.get` and `httpx.post` build a client,
    and with it an SSL context, per call, which added up to a minute of CPU across the suite's polling loops."""
    import httpx

    return httpx.Client()


def wait_until(condition, timeout: float, what: str, interval: float = 0.1):
    """`condition()`'s first true value, read again every `interval` seconds (polling a condition with a deadline, not
    a sleep standing in for one); an AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_for_api(url: str, timeout: float = 180) -> None:
    """Poll `url`'s health until it answers (the controller starts the shared API while the workers start)."""
    import httpx

    def healthy() -> bool:
        try:
            return http_client().get(f"{url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout, f"the session's Prefect API at {url}", interval=0.2)


@pytest.fixture(scope="session")
def prefect_api():
    """A real, temporary Prefect API (server + database) for the whole test session: the one the xdist controller
    started, or one of this process's own."""
    if os.environ.get(SHARED_API):
        wait_for_api(os.environ[SHARED_API])
        yield
        return
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def made_once(tmp_path_factory, name: str, make):
    """`make(folder)`'s result, made once per test session, in `folder`, even when pytest-xdist runs the session in
    several workers: the first to ask makes it under a lock in the session's shared temporary folder and pickles it
    there (the objects whole, fields no dump shows included); the others wait for the lock and read it back."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the session's workers
    made = root / f"{name}.pickle"
    with FileLock(str(root / f"{name}.lock")):
        if made.exists():
            return pickle.loads(made.read_bytes())
        result = make(root / name)
        made.write_bytes(pickle.dumps(result))
    return result


@pytest.fixture(scope="session")
def finished_run(prefect_api, tmp_path_factory):
    """One whole run (`cifar_transfer`) of `tiny_config`'s settings on the tiny archive, in an empty storage, made once
    per session: its RunSummary. Its archive has the bytes and MD5 of `tiny_archive`'s, so a test's own config names
    the same feature set, map and head. Read it, never write to it: `copy_of_finished_run` gives a test its own."""
    from test_flow import tiny_config

    from cifar_transfer.flows.pipeline import cifar_transfer
    from cifar_transfer.report import RunSummary

    def make(folder: Path) -> RunSummary:
        folder.mkdir()
        md5 = write_archive(folder / "cifar-10-python.tar.gz", cifar_members())
        return cifar_transfer(tiny_config((folder / "cifar-10-python.tar.gz", md5), folder / "storage"))

    return made_once(tmp_path_factory, "finished-run", make)


@pytest.fixture(scope="session")
def ridge_run(prefect_api, tmp_path_factory):
    """One run of `tiny_config`'s settings with a ridge head and no map, made once per session: what `predict` and
    the audit start from (a ridge head is exact and quick to refit). Its RunSummary; read it, never write to it
    (copy its storage to change it)."""
    from test_flow import tiny_config

    from cifar_transfer.flows.pipeline import cifar_transfer
    from cifar_transfer.report import RunSummary

    def make(folder: Path) -> RunSummary:
        folder.mkdir()
        md5 = write_archive(folder / "cifar-10-python.tar.gz", cifar_members())
        return cifar_transfer(tiny_config((folder / "cifar-10-python.tar.gz", md5), folder / "storage", head="ridge", tsne_sample=0))

    return made_once(tmp_path_factory, "ridge-run", make)


def copy_of_finished_run(finished_run, archive: tuple[Path, str], storage: Path, **options):
    """`tiny_config(archive, storage, **options)` over a copy of `finished_run`'s storage (its records name places
    relative to their storage, so the copy's point into the copy)."""
    from test_flow import tiny_config

    shutil.copytree(finished_run.config.storage, storage)
    return tiny_config(archive, storage, **options)


@pytest.fixture(scope="session")
def reference_features(finished_run, tmp_path_factory):
    """`reference(**options)`: the tiny archive's features extracted uninterrupted with `tiny_config`'s settings and
    `options`, computed once per session and returned as (FeatureSetInfo, ExtractionStats); without options, those
    of `finished_run`. Its archive has the bytes and MD5 of `tiny_archive`'s, so a test's own run has the same
    fingerprint. Read it, never write to it."""
    from test_flow import tiny_config

    from cifar_transfer.feature_records import FeatureSetInfo
    from cifar_transfer.flows.pipeline import extract_features
    from cifar_transfer.progress import ExtractionStats

    def reference(**options):
        if not options:
            return finished_run.features, finished_run.extraction

        def make(folder: Path) -> tuple[FeatureSetInfo, ExtractionStats]:
            folder.mkdir()
            md5 = write_archive(folder / "cifar-10-python.tar.gz", cifar_members())
            return extract_features(tiny_config((folder / "cifar-10-python.tar.gz", md5), folder / "storage", **options))

        name = "reference-" + hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
        return made_once(tmp_path_factory, name, make)

    return reference


def cifar100_class_names() -> tuple[list[str], list[str]]:
    """100 fine and 20 coarse class names, as a CIFAR-100 meta member lists them (decoded)."""
    return [f"fine_{i:02d}" for i in range(100)], [f"coarse-{i:02d}" for i in range(20)]


def cifar100_batch_pickle(data: np.ndarray, fine: list[int], coarse: list[int], name: str) -> bytes:
    """A CIFAR-100 member pickled the way the official files are (protocol 2, bytes keys, both label lists)."""
    batch = {
        b"filenames": [f"img_{i}.png".encode() for i in range(len(fine))],
        b"batch_label": name.encode(),
        b"fine_labels": fine,
        b"coarse_labels": coarse,
        b"data": data,
    }
    return pickle.dumps(batch, protocol=2)


def cifar100_members(train_count: int = 60, test_count: int = 20, seed: int = 0) -> dict[str, bytes]:
    """The official CIFAR-100 layout: train, test and meta under cifar-100-python/ (coarse label = fine // 5)."""
    rng = np.random.default_rng(seed)
    members = {}
    for split, count in (("train", train_count), ("test", test_count)):
        fine = [int(label) for label in rng.integers(0, 100, size=count)]
        data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
        members[f"cifar-100-python/{split}"] = cifar100_batch_pickle(data, fine, [label // 5 for label in fine], f"{split} batch")
    fine_names, coarse_names = cifar100_class_names()
    meta = {b"fine_label_names": [name.encode() for name in fine_names], b"coarse_label_names": [name.encode() for name in coarse_names]}
    members["cifar-100-python/meta"] = pickle.dumps(meta, protocol=2)
    return members
