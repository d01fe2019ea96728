"""Fetching the archive: verified, atomic, done once, retried on transient errors only."""

from __future__ import annotations

import http.server
import os
import threading

import pytest

from tasks.download import fetch_archive, fetch_archive_task
from tasks.errors import ArchiveError, ChecksumMismatch


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
