"""The pipeline as a team runs it, for real, on one machine standing in for several hosts:

- a `prefect server` on PostgreSQL (CIFAR_TRANSFER_TEST_POSTGRES, which .ci/run sets after installing PostgreSQL);
- deployments made from one clone of a commit of this working tree, pushed to a bare repository (the team's git server);
- a worker in another directory, with no checkout and a Python environment that holds the dependencies but not this
  project: each run gets the code through the deployment's own pull steps (git clone from the bare repository, install);
- shared storage on S3 (moto's server), opened with keys from a `cifar-transfer-storage-credentials` block: the
  worker's environment has none;
- the extract-only deployment's concurrency limit (a second run waits), the GPU queue's limit (a nightly run is not
  handed out while another run holds GPU 0), and the failure automation posting the run's reason to a webhook.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from test_deployments import ROOT, poll, prefect, prefect_server, start, stop
from test_html_report import chromium_executable
from test_remote_storage import BUCKET, object_sizes, s3  # noqa: F401  (s3: moto's S3 server, a fixture)

from conftest import http_client

POSTGRES = os.environ.get("CIFAR_TRANSFER_TEST_POSTGRES")  # postgresql://user:password@host:port/database, CI only
SECRET = f"block-secret-{uuid.uuid4().hex}"  # the storage key the block holds: it must appear nowhere else
SCREENSHOTS = os.environ.get("CIFAR_TRANSFER_UI_SCREENSHOTS")  # a folder: save pictures of the UI there (docs/ui)


@pytest.fixture
def postgres_database():
    """A database of its own on the PostgreSQL server, dropped afterwards: (SQLAlchemy URL for Prefect, server version)."""
    if not POSTGRES:
        pytest.skip("CIFAR_TRANSFER_TEST_POSTGRES is unset: .ci/run installs PostgreSQL and sets it (see its PostgreSQL lines)")
    import asyncpg
    from sqlalchemy.engine import make_url

    name = f"cifar_transfer_test_{uuid.uuid4().hex[:12]}"

    async def fetch(sql: str, database: str | None = None):
        connection = await asyncpg.connect(POSTGRES if database is None else POSTGRES.rsplit("/", 1)[0] + "/" + database)
        try:
            return await connection.fetchval(sql)
        finally:
            await connection.close()

    version = asyncio.run(fetch("SHOW server_version"))
    asyncio.run(fetch(f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES).set(drivername="postgresql+asyncpg", database=name).render_as_string(hide_password=False)
    try:
        yield url, version, lambda sql: asyncio.run(fetch(sql, name))
    finally:
        asyncio.run(fetch(f'DROP DATABASE IF EXISTS "{name}"'))  # the server has stopped: nothing is connected


@contextlib.contextmanager
def webhook_receiver():
    """An HTTP server on loopback that keeps the JSON body of every POST: (its URL, the bodies)."""
    received: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_):
            """Quiet: the test reads what the receiver got, not its access log."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts", received
    finally:
        server.shutdown()
        thread.join()


def git(*arguments, cwd: Path) -> str:
    environment = {
        **os.environ,
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "t@e",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "t@e",
    }
    return subprocess.run(["git", *arguments], cwd=cwd, env=environment, check=True, capture_output=True, text=True).stdout


def team_repository(folder: Path) -> tuple[Path, Path]:
    """A commit of this working tree (tracked and untracked files git does not ignore) on branch main, cloned bare as
    the team's repository, and a clone of that to deploy from: (bare repository, deploying clone)."""
    files = [name for name in git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).split("\0") if name]
    work = folder / "commit"
    for name in files:
        if (ROOT / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, work / name)
    git("init", "-q", "-b", "main", cwd=work)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "the code under test", cwd=work)
    git("clone", "-q", "--bare", str(work), str(folder / "origin.git"), cwd=folder)
    git("clone", "-q", str(folder / "origin.git"), str(folder / "deployer"), cwd=folder)
    return folder / "origin.git", folder / "deployer"


def worker_host(folder: Path) -> Path:
    """A Python environment with the dependencies (this one's packages, read through a path file) but not this
    project, as an image built from another commit would be: its interpreter."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder / "venv")], check=True)
    (site_packages,) = (folder / "venv" / "lib").glob("python*/site-packages")
    shared = [path for path in sys.path if path.endswith("site-packages") and Path(path).is_dir()]
    (site_packages / "zz-dependencies.pth").write_text("\n".join(shared) + "\n")  # a path file's paths, not its imports
    python = folder / "venv" / "bin" / "python"
    check = subprocess.run([python, "-c", "import cifar_transfer"], cwd=folder, capture_output=True)
    assert check.returncode != 0, "the worker's environment must not hold the project"
    return python


def flow_run(api: str, run_id: str) -> dict:
    return http_client().get(f"{api}/flow_runs/{run_id}", timeout=10).json()


def run_deployment(api: str, name: str, parameters: dict, **options) -> str:
    deployment = http_client().get(f"{api}/deployments/name/{name}", timeout=10).json()
    body = {"parameters": parameters, **options}
    response = http_client().post(f"{api}/deployments/{deployment['id']}/create_flow_run", json=body, timeout=10)
    response.raise_for_status()
    return response.json()["id"]


def everything_said(api: str, log_files: list[Path]) -> str:
    """Every log line, parameter, artifact and event the server holds, and the processes' own logs, as one text."""
    said = [file.read_text(errors="replace") for file in log_files]
    for kind in ("logs", "flow_runs", "artifacts", "task_runs"):
        said.append(http_client().post(f"{api}/{kind}/filter", json={}, timeout=30).text)
    said.append(http_client().post(f"{api}/events/filter", json={"limit": 50}, timeout=30).text)
    return "\n".join(said)


def save_screenshots(api: str, folder: Path, run_id: str) -> None:
    """The UI's deployments, the work pool's workers, the runs, and the run `run_id` with its logs, as PNG files."""
    from playwright.sync_api import sync_playwright

    executable = chromium_executable()
    assert executable, "no Chromium to take the UI's screenshots with"
    ui = api.removesuffix("/api")
    folder.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            for name, path, shown in (
                ("team-deployments.png", "/deployments", "extract-only"),
                ("team-work-pool.png", "/work-pools/work-pool/cifar-transfer?tab=Workers", "Online"),
                ("team-runs.png", "/runs", "Completed"),
                ("team-run.png", f"/runs/flow-run/{run_id}", "git_clone"),
            ):
                page.goto(ui + path, wait_until="load")
                page.get_by_text(shown).first.wait_for(timeout=60_000)
                page.screenshot(path=str(folder / name))
        finally:
            browser.close()


@pytest.mark.long
def test_a_team_server_on_postgres_with_a_worker_on_another_host(tmp_path, postgres_database, s3, tiny_archive):  # noqa: F811
    database_url, version, query = postgres_database
    print(f"PostgreSQL server version {version}")
    origin, deployer = team_repository(tmp_path / "git")
    worker_python = worker_host(tmp_path / "worker-host")
    archive, md5 = tiny_archive
    endpoint = os.environ["AWS_ENDPOINT_URL"]  # moto's, from the s3 fixture: given to the block, not to the worker

    # A run refused a slot retries after 2 s instead of 30.
    settings = {"PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url, "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2"}
    with prefect_server(tmp_path, **settings) as server, webhook_receiver() as (hook, alerts):
        api = server["PREFECT_API_URL"]
        from prefect.blocks.notifications import CustomWebhookNotificationBlock
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from cifar_transfer.tasks.credentials import StorageCredentials

        with temporary_settings({PREFECT_API_URL: api}):
            options = {"key": "team-key", "secret": SECRET, "endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"}}
            StorageCredentials(options=options).save("team-s3")
            CustomWebhookNotificationBlock(name="alerts", url=hook, json_data={"text": "{{body}}"}).save("cifar-transfer-alerts")
        for name, value in {
            "cifar-transfer-repository": str(origin),
            "cifar-transfer-branch": "main",
            "cifar-transfer-storage": f"s3://{BUCKET}/team",
            "cifar-transfer-storage-credentials": "team-s3",
        }.items():
            http_client().post(f"{api}/variables/", json={"name": name, "value": value}, timeout=10).raise_for_status()

        # The deploying clone: the server's setup (queues gpu-0 and gpu-1, limit 1 each; the automation), then the deployments.
        setup = subprocess.run(
            [sys.executable, "-m", "cifar_transfer.flows.server_setup", "--gpus", "2"],
            cwd=deployer,
            env=server,
            capture_output=True,
            text=True,
        )
        assert setup.returncode == 0, setup.stdout + setup.stderr
        prefect(server, "--no-prompt", "deploy", "--all", cwd=deployer)
        extract_only = http_client().get(f"{api}/deployments/name/extract-features/extract-only", timeout=10).json()
        assert extract_only["parameters"]["config"] == {"storage": f"s3://{BUCKET}/team", "storage_credentials": "team-s3"}
        assert extract_only["global_concurrency_limit"]["limit"] == 1
        assert extract_only["concurrency_options"]["collision_strategy"] == "ENQUEUE"
        assert [list(step) for step in extract_only["pull_steps"]][0] == ["prefect.deployments.steps.git_clone"]

        # The worker's host: no checkout, no AWS credentials or endpoint, no package index; its environment first on PATH.
        runs_folder = tmp_path / "worker-host" / "runs"
        runs_folder.mkdir()
        paused = tmp_path / "paused"
        worker_environment = {
            **{name: value for name, value in server.items() if not name.startswith("AWS_")},
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "PIP_NO_INDEX": "1",
            "PREFECT_HOME": str(tmp_path / "worker-host" / "prefect-home"),
            "PATH": f"{worker_python.parent}{os.pathsep}{os.environ['PATH']}",
            "PWD": str(runs_folder),
            "CIFAR_TRANSFER_PAUSE_AT": f"train/00001={paused}",
        }
        worker_log = tmp_path / "worker.log"
        worker = start(
            [str(worker_python), "-m", "prefect", "worker", "start", "--pool", "cifar-transfer"],
            worker_environment,
            worker_log,
            cwd=runs_folder,
        )
        try:
            config = {**extract_only["parameters"]["config"], "source": str(archive), "md5": md5, "weights": "none"}
            config |= {"backbone": "MobileNetV2", "input_size": 32, "shard_size": 100}
            first = run_deployment(api, "extract-features/extract-only", {"config": config})
            poll(paused.exists, "the first extract-only run to reach shard train/00001 on the worker", 300, [worker], worker_log)

            # GPU 0 is held: a nightly run (queue gpu-0) is not handed out. A second extract-only run sent to GPU 1 is, and
            # waits on the deployment's limit. Its config fails the download: the nightly failure the automation reports.
            broken = tmp_path / "broken.tar.gz"
            broken.write_bytes(b"not an archive")
            nightly = run_deployment(api, "cifar-transfer/nightly", {"config": {**config, "source": str(broken), "md5": "0" * 32}})
            second = run_deployment(
                api,
                "extract-features/extract-only",
                {"config": config},
                work_queue_name="gpu-1",
                job_variables={"env": {"CUDA_VISIBLE_DEVICES": "1"}},
            )
            poll(
                lambda: flow_run(api, second)["state_name"] == "AwaitingConcurrencySlot", "the second run to wait for a slot", 120, [worker]
            )
            assert flow_run(api, first)["state_type"] == "RUNNING"
            assert flow_run(api, nightly)["state_type"] == "SCHEDULED", "a second run was handed GPU 0"

            paused.unlink()
            done = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
            poll(
                lambda: all(flow_run(api, run)["state_type"] in done for run in (first, second, nightly)),
                "the three runs",
                300,
                [worker],
                worker_log,
            )
            states = {run: flow_run(api, run)["state_type"] for run in (first, second, nightly)}
            assert states == {first: "COMPLETED", second: "COMPLETED", nightly: "FAILED"}, worker_log.read_text()[-3000:]
            history = http_client().get(f"{api}/flow_run_states/", params={"flow_run_id": second}, timeout=10).json()
            assert "AwaitingConcurrencySlot" in [state["name"] for state in history]

            # The failure reached a person: the nightly run's one-line reason, from the automation the file made.
            (alert,) = poll(lambda: [alert for alert in alerts if "nightly" in alert["text"]], "the failure notification", 120)
            print(f"webhook received: {alert['text']}")
            assert "failed" in alert["text"] and "has MD5" in alert["text"] and "\n" not in alert["text"].strip()

            # The code came through the deployment's pull steps; the outputs are on the shared S3.
            logs = http_client().post(f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [first]}}}, timeout=10).json()
            steps = [log["message"] for log in logs if log["message"].startswith("Executing deployment step")]
            assert steps == [
                f"Executing deployment step: {name}" for name in ("git_clone", "run_shell_script", "addsitedir", "set_working_directory")
            ]
            listing = object_sizes(s3)
            assert len([key for key in listing if key.startswith("team/features/") and "/train/part-" in key]) == 2
            assert {"team/raw/cifar-10-python.tar.gz", "team/raw/cifar-10-python.tar.gz.source.json"} <= listing.keys()

            assert query("SELECT count(*) FROM flow_run") >= 3, "the server's runs are not in PostgreSQL"
            assert SECRET not in everything_said(api, [tmp_path / "server.log", worker_log])
            if SCREENSHOTS:
                save_screenshots(api, ROOT / SCREENSHOTS, first)
        finally:
            stop(worker)
