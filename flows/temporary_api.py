"""The temporary Prefect API a command runs against when no PREFECT_API_URL names one.

It is Prefect's own server app under uvicorn, launched as Prefect's `SubprocessASGIServer` launches it, but without
importing Prefect's server modules in the command's process: the command is only the API's client, and that import
took 3.3 s of one core before the server's own start could begin. Once the server answers, PREFECT_API_URL names it
for the rest of the command and the processes it starts; the kernel stops it when the command's process dies,
however it dies (a `kill -9` included), through the parent-death signal.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

# Before Prefect reads its settings (this module imports none of Prefect's): no telemetry calls from the server
# (offline they log an error at every start), and time for a first start on a fresh PREFECT_HOME, which migrates its
# database (longer than Prefect's 20 s on 2 cores).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

log = logging.getLogger("prefect")  # where Prefect announces its temporary server

MEANWHILE_THREAD = "while the Prefect API starts"
# uvicorn's exit status when its start failed, a port taken between our probe and its bind among the reasons:
# launched again on another port, up to LAUNCHES times in all
PORT_TAKEN, LAUNCHES = 3, 3
STOP_SECONDS = 5  # after SIGTERM, before SIGKILL
_PR_SET_PDEATHSIG = 1


@dataclass
class TemporaryAPI:
    process: subprocess.Popen
    url: str  # the API's URL, ending in /api
    set_ui_url: bool  # whether `start` set PREFECT_UI_URL (to none), for `stop` to take back


_running: TemporaryAPI | None = None
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the loopback server, never through a proxy


def start(meanwhile: Callable[[], object] | None = None) -> None:
    """Start the temporary API, unless a server is given (PREFECT_API_URL, from the environment or a Prefect profile)
    or this is not Linux (no parent-death signal). Call it from the main thread: the kernel sends the parent-death
    signal when the thread that launched the server ends. `meanwhile` runs in a thread of its own (not a daemon: the
    interpreter waits for it at exit instead of tearing down a half-done import) once the server's process is
    launched, so that the fork never copies locks its imports hold."""
    global _running
    from prefect.context import refresh_global_settings_context
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or sys.platform != "linux":
        return
    ensure_logging_setup()  # Prefect's console handler, for the announcement
    environment = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **settings.to_environment_variables(exclude_unset=True),
    }
    deadline = time.monotonic() + settings.server.ephemeral.startup_timeout_seconds
    waiting = [meanwhile] if meanwhile is not None else []
    for launch in range(1, LAUNCHES + 1):
        port = _free_port()
        log.info("Starting temporary server on http://127.0.0.1:%d", port)
        process = _launch(port, environment)
        if waiting:
            threading.Thread(target=waiting.pop(), name=MEANWHILE_THREAD).start()
        url = f"http://127.0.0.1:{port}/api"
        if _answers(process, url, deadline):
            break
        if process.returncode != PORT_TAKEN or launch == LAUNCHES:
            reason = f"the temporary Prefect API exited with status {process.returncode} as it started (launch {launch})"
            raise RuntimeError(f"{reason}: its reason is above; or set PREFECT_API_URL to a running Prefect server")
    _running = TemporaryAPI(process, url, set_ui_url="PREFECT_UI_URL" not in os.environ)
    atexit.register(stop)
    os.environ["PREFECT_API_URL"] = url
    if _running.set_ui_url:
        os.environ["PREFECT_UI_URL"] = ""  # it serves no UI: no "View at" links to it
    refresh_global_settings_context()


def stop() -> None:
    """Stop the temporary API this process started, if it is running; the command's PREFECT_API_URL goes with it."""
    global _running
    from prefect.context import refresh_global_settings_context

    if _running is None:
        return
    running, _running = _running, None
    log.info("Stopping temporary server on %s", running.url.removesuffix("/api"))
    _end(running.process)
    if os.environ.get("PREFECT_API_URL") == running.url:
        del os.environ["PREFECT_API_URL"]
    if running.set_ui_url:
        os.environ.pop("PREFECT_UI_URL", None)
    refresh_global_settings_context()


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(port: int, environment: dict[str, str]) -> subprocess.Popen:
    import prefect  # the package only: its folder is the server app's

    parent = os.getpid()
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def die_with_parent() -> None:  # in the child, between fork and exec: only async-signal-safe calls
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory"]
    command += ["prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--log-level", "error", "--lifespan", "on"]
    return subprocess.Popen(command, env=environment, preexec_fn=die_with_parent)


def _answers(process: subprocess.Popen, url: str, deadline: float) -> bool:
    """Whether the server at `url` answers its health check before `deadline`; False once its process has ended."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with _DIRECT.open(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)  # polling a process that has no other way to say it is ready, as Prefect's own start does
    _end(process)
    raise RuntimeError("timed out waiting for the temporary Prefect API; raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")


def _end(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
