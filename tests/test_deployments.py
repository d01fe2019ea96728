"""The pipeline as a service: a real `prefect server`, `prefect deploy --all`, a real worker,
and the downstream deployment started by the features-completed event."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_collections import write_tree

from conftest import http_client

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def last_error(log: Path) -> str:
    """The last exception line a server or worker logged, to say why a wait timed out."""
    errors = [line for line in log.read_text(errors="replace").splitlines() if "Error:" in line or "Exception:" in line]
    return errors[-1] if errors else "no error logged"


def poll(condition, what: str, timeout: float, processes=(), log: Path | None = None):
    """Wait on a condition read from the API (no fixed sleeps as synchronization)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for process in processes:
            if process.poll() is not None:
                raise AssertionError(f"{process.args[:4]} exited with {process.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what}" + (f"; {log.name}: {last_error(log)}" if log else "")
            )
        time.sleep(0.5)


def assert_completed(runs: list[dict], worker_log: Path) -> None:
    """Every run completed; otherwise say which did not, its state's message and the worker's last error."""
    failed = [f"{run['name']}: {run['state_type']} {run['state'].get('message')!r}" for run in runs if run["state_type"] != "COMPLETED"]
    assert runs and not failed, f"{failed}; worker.log: {last_error(worker_log)}"


def start(command, environment, log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=environment, start_new_session=True, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def prefect_server(tmp_path: Path, **settings: str):
    """A real Prefect server on a free loopback port, with its own PREFECT_HOME (and database: SQLite there unless
    `settings` name another): its environment, for the commands and workers that use it."""
    port = free_port()
    environment = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PWD": str(ROOT),
        **settings,
    }
    process = start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], environment, tmp_path / "server.log")

    def healthy():
        try:
            return http_client().get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        poll(healthy, "the Prefect server to answer", 300, [process], tmp_path / "server.log")
        yield environment
    finally:
        stop(process)


@pytest.fixture
def server(tmp_path):
    """A real Prefect server (SQLite)."""
    with prefect_server(tmp_path) as environment:
        yield environment


def prefect(environment, *arguments, cwd: Path = ROOT) -> str:
    done = subprocess.run([PREFECT, *arguments], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def flow_runs(environment) -> list[dict]:
    response = http_client().post(f"{environment['PREFECT_API_URL']}/flow_runs/filter", json={}, timeout=10)
    response.raise_for_status()
    return response.json()


def one_machine(folder: Path) -> Path:
    """prefect.yaml's one-machine variant, as its header says to make it: workers run this checkout."""
    text = (ROOT / "prefect.yaml").read_text()
    assert text.count("\npull: *from-git\n") == 1
    variant = folder / "prefect-one-machine.yaml"
    variant.write_text(text.replace("\npull: *from-git\n", "\npull: *from-checkout\n"))
    return variant


@pytest.mark.long
def test_deploy_run_and_trigger_downstream(server, tiny_archive, tmp_path):
    path, md5 = tiny_archive
    prefect(server, "work-pool", "create", "cifar-transfer", "--type", "process")
    prefect(server, "--no-prompt", "deploy", "--all", "--prefect-file", str(one_machine(tmp_path)))
    response = http_client().post(f"{server['PREFECT_API_URL']}/deployments/filter", json={}, timeout=10)
    assert sorted(deployment["name"] for deployment in response.json()) == [
        "analyze-new-features",
        "audit-new-head",
        "extract-on-change",
        "extract-only",
        "nightly",
        "on-demand",
        "predict-new-head",
        "watch-photos",
    ]

    worker = start([PREFECT, "worker", "start", "--pool", "cifar-transfer"], server, tmp_path / "worker.log")
    try:
        storage = tmp_path / "storage"
        config = {
            "source": str(path),
            "md5": md5,
            "storage": str(storage),
            "backbone": "MobileNetV2",
            "weights": "none",
            "input_size": 32,
            "shard_size": 100,
        }
        prefect(server, "deployment", "run", "extract-features/extract-only", "--param", f"config={json.dumps(config)}")

        def finished(flow_name):
            def check():
                runs = [run for run in flow_runs(server) if run["name"].startswith(flow_name)]
                return runs if runs and all(run["state_type"] in ("COMPLETED", "FAILED", "CRASHED") for run in runs) else None

            return check

        extracted = poll(finished("extract-"), "the extract-only run", 300, [worker])
        assert_completed(extracted, tmp_path / "worker.log")
        analyzed = poll(finished("analyze-"), "the triggered analyze-new-features run", 300, [worker])
        assert_completed(analyzed, tmp_path / "worker.log")
        assert analyzed[0]["parameters"]["config"]["storage"] == str(storage)
        assert list(storage.glob("features/*/heads/*/metrics.json"))
        artifacts = (
            http_client()
            .post(
                f"{server['PREFECT_API_URL']}/artifacts/filter",
                timeout=10,
                json={"artifacts": {"key": {"any_": ["cifar-transfer-summary"]}}},
            )
            .json()
        )
        assert artifacts and "MobileNetV2 at 32px" in artifacts[0]["data"]
        audited = poll(finished("audit-"), "the audit-new-head run the head's event starts", 300, [worker])
        assert_completed(audited, tmp_path / "worker.log")
        assert list(storage.glob("features/*/audit/duplicates.parquet"))

        nightly = http_client().get(f"{server['PREFECT_API_URL']}/deployments/name/cifar-transfer/nightly", timeout=10).json()

        def nightly_runs_scheduled():
            return [run for run in flow_runs(server) if run["deployment_id"] == nightly["id"] and run["state_type"] == "SCHEDULED"]

        scheduled = poll(nightly_runs_scheduled, "the scheduler to create nightly runs", 120, [worker], tmp_path / "server.log")
        assert all(run["expected_start_time"].split("T")[1].startswith("02:00:00") for run in scheduled)

        photos = tmp_path / "photos"
        write_tree(photos, {"train": 4, "test": 2})
        watched = {**config, "source": str(photos), "md5": None, "shard_size": 10}
        prefect(server, "deployment", "run", "watch-collection/watch-photos", "--param", f"config={json.dumps(watched)}")
        poll(finished("watch-"), "the watch-photos run", 300, [worker])

        def extracted_on_change():
            runs = [run for run in finished("extract-")() or [] if run["parameters"]["config"].get("source") == str(photos)]
            return runs if runs and runs[0]["state_type"] in ("COMPLETED", "FAILED", "CRASHED") else None

        changed = poll(extracted_on_change, "the extract-on-change run the watch's event starts", 300, [worker])
        assert_completed(changed, tmp_path / "worker.log")
        assert changed[0]["parameters"]["config"]["backbone"] == "MobileNetV2", "the extraction did not get the watched config"
        assert len(list(storage.glob("features/*/train/part-*.parquet"))) == 2 + 2  # the archive's 2, the folder's 2 (12 images)
    finally:
        stop(worker)
