"""Fetching the archive: verified, atomic, done once, retried on transient errors only."""

from __future__ import annotations

import glob
import http.server
import json
import logging
import os
import threading
import time

import pytest

from cifar_transfer.download import fetch_archive
from cifar_transfer.errors import ArchiveError, ChecksumMismatch, FetchDeadlineExceeded, is_transient
from cifar_transfer.tasks.download import fetch_archive_task


def test_local_source_is_copied_verified_and_fetched_once(tiny_archive, tmp_path):
    path, md5 = tiny_archive
    storage = tmp_path / "storage"
    info = fetch_archive(str(path), md5, str(storage))
    assert (info.md5, info.bytes) == (md5, path.stat().st_size)
    assert open(info.path, "rb").read() == path.read_bytes()
    stamp = os.stat(info.path).st_mtime_ns
    assert fetch_archive(str(path), md5, str(storage)) == info
    assert os.stat(info.path).st_mtime_ns == stamp


def test_skipped_checksum_is_still_recorded_and_fetched_once(tiny_archive, tmp_path, caplog):
    path, md5 = tiny_archive
    storage = tmp_path / "storage"
    info = fetch_archive(str(path), None, str(storage))
    assert info.md5 == md5
    assert "MD5 check DISABLED" in caplog.text
    stamp = os.stat(info.path).st_mtime_ns
    fetch_archive(str(path), None, str(storage))
    assert os.stat(info.path).st_mtime_ns == stamp


def test_checksum_mismatch_names_both_and_leaves_nothing(tiny_archive, tmp_path):
    path, md5 = tiny_archive
    storage = tmp_path / "storage"
    with pytest.raises(ChecksumMismatch, match=f"has MD5 {md5}, expected {'0' * 32}: .* --md5 {md5}"):
        fetch_archive(str(path), "0" * 32, str(storage))
    assert os.listdir(storage / "raw") == []


def test_missing_source_is_a_permanent_error(tmp_path):
    with pytest.raises(ArchiveError, match="does not exist: check --source"):
        fetch_archive(str(tmp_path / "nope.tar.gz"), None, str(tmp_path / "storage"))


class FlakyServer(http.server.ThreadingHTTPServer):
    """Serves one file over HTTP, answering 503 to the first `failures` requests."""

    def __init__(self, payload: bytes, failures: int):
        self.payload, self.failures, self.requests = payload, failures, 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), FlakyHandler)


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    def _answer(self, with_body: bool):
        with self.server.lock:
            self.server.requests += 1
            failing = self.server.requests <= self.server.failures
        if failing:
            self.send_error(503, "try again later")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.payload)))
        self.send_header("Content-Type", "application/gzip")
        self.end_headers()
        if with_body:
            self.wfile.write(self.server.payload)

    def do_GET(self):
        self._answer(True)

    def do_HEAD(self):
        self._answer(False)

    def log_message(self, *args):
        """Keep the test output quiet."""


@pytest.fixture
def flaky_server(tiny_archive):
    path, md5 = tiny_archive
    server = FlakyServer(path.read_bytes(), failures=2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz", md5
    server.shutdown()
    server.server_close()


def test_http_download_survives_transient_failures_through_task_retries(prefect_api, flaky_server, tmp_path):
    server, url, md5 = flaky_server
    info = fetch_archive_task(url, md5, str(tmp_path / "storage"))
    assert info.md5 == md5
    assert server.requests > server.failures


def test_permanent_errors_are_not_retried(prefect_api, flaky_server, tmp_path):
    server, url, md5 = flaky_server
    server.failures = 0
    with pytest.raises(ChecksumMismatch):
        fetch_archive_task(url, "0" * 32, str(tmp_path / "storage"))
    first_attempt_requests = server.requests
    assert 0 < first_attempt_requests <= 3  # one download attempt (fsspec may HEAD first), no retry storm


class StreamingServer(http.server.ThreadingHTTPServer):
    """Serves `size` bytes per GET, `piece` bytes every `pause` seconds; `framing` says how the length is told.

    "length": an honest Content-Length; "chunked": chunked transfer encoding; "close": no length, the end of
    the body is the end of the connection. A handler stops when the client hangs up or after `lifetime` seconds.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self, size: int, piece: int, pause: float, framing: str, lifetime: float = 30.0):
        self.size, self.piece, self.pause, self.framing, self.lifetime = size, piece, pause, framing, lifetime
        super().__init__(("127.0.0.1", 0), StreamingHandler)


class StreamingHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        server, started, sent = self.server, time.monotonic(), 0
        self.send_response(200)
        if server.framing == "length":
            self.send_header("Content-Length", str(server.size))
        elif server.framing == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            while sent < server.size and time.monotonic() - started < server.lifetime:
                piece = b"x" * min(server.piece, server.size - sent)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if server.framing == "chunked" else piece)
                self.wfile.flush()
                sent += len(piece)
                time.sleep(server.pause)
            if server.framing == "chunked":
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should
        self.close_connection = True

    def log_message(self, *args):
        """Keep the test output quiet."""


@pytest.fixture
def streaming_server():
    servers = []

    def serve(**settings) -> str:
        server = StreamingServer(**settings)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def assert_nothing_left(storage):
    """No archive, no temporary file, no claim: only (possibly) the empty raw folder."""
    assert [path for path in glob.glob(f"{storage}/**", recursive=True, include_hidden=True) if os.path.isfile(path)] == []


@pytest.mark.slow
def test_a_trickling_source_fails_at_the_deadline_with_one_line_and_leaves_nothing(streaming_server, tmp_path):
    url = streaming_server(size=1 << 20, piece=16, pause=0.02, framing="length")  # 800 B/s: never a read timeout
    started = time.monotonic()
    with pytest.raises(FetchDeadlineExceeded) as error:
        fetch_archive(url, None, str(tmp_path / "storage"), deadline_s=2)
    assert 2 <= time.monotonic() - started < 10
    message = str(error.value)
    assert "\n" not in message and url in message and "2 s deadline" in message and "--source PATH --md5 HEX" in message
    assert not is_transient(error.value)
    assert_nothing_left(tmp_path / "storage")


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_a_source_over_the_size_cap_fails_with_one_line_and_leaves_nothing(streaming_server, tmp_path, framing):
    url = streaming_server(size=5_000_000, piece=64 << 10, pause=0, framing=framing)
    with pytest.raises(ArchiveError, match="is over the 1,000,000 byte cap .*: check --source") as error:
        fetch_archive(url, None, str(tmp_path / "storage"), max_bytes=1_000_000)
    assert "\n" not in str(error.value) and url in str(error.value)
    assert ("5,000,000 bytes by its Content-Length" in str(error.value)) == (framing == "length")
    assert_nothing_left(tmp_path / "storage")


def test_a_signed_source_leaves_no_trace_of_its_secrets(flaky_server, tmp_path, caplog):
    server, url, md5 = flaky_server
    server.failures = 0
    secrets = ("SECRETSIG", "AKIASECRETKEY", "SESSIONSECRET")
    signed = (
        f"{url}?X-Amz-Expires=60&X-Amz-Signature=SECRETSIG&X-Amz-Credential=AKIASECRETKEY%2F20240101&X-Amz-Security-Token=SESSIONSECRET"
    )
    storage = tmp_path / "storage"
    caplog.set_level(logging.DEBUG)  # httpx and httpcore too, which log every request
    with pytest.raises(ChecksumMismatch) as error:
        fetch_archive(signed, "0" * 32, str(storage))
    info = fetch_archive(signed, md5, str(storage))
    assert fetch_archive(signed, None, str(storage)) == info  # found again through its (redacted) source record
    assert os.path.basename(info.path) == "cifar-10-python.tar.gz"
    record = json.loads((storage / "raw" / "cifar-10-python.tar.gz.source.json").read_text())
    assert record["source"] == f"{url}?X-Amz-Expires=60&X-Amz-Signature=***&X-Amz-Credential=***&X-Amz-Security-Token=***"
    assert "X-Amz-Signature=***" in str(error.value) and "fetched" in caplog.text
    for secret in secrets:
        assert secret not in caplog.text and secret not in str(error.value)
        assert all(secret not in open(path, errors="replace").read() for path in glob.glob(f"{storage}/**/*.json", recursive=True))


def test_http_errors_name_a_signed_source_redacted(flaky_server, tmp_path):
    server, url, _ = flaky_server
    server.failures = 10  # HTTP 503 on every request: httpx's error quotes the URL
    with pytest.raises(Exception, match="Server error") as error:
        fetch_archive(f"{url}?sig=SECRETSIG", None, str(tmp_path / "storage"))
    assert "SECRETSIG" not in str(error.value) and "sig=***" in str(error.value)
    assert is_transient(error.value)
